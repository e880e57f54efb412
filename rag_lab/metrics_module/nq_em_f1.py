"""NQ-open EM / F1 / answer-match as a Hugging Face `evaluate` module.

Load it from its local path (no Hub access, works with HF_HUB_OFFLINE=1):

    import evaluate
    from rag_lab.metrics import evaluate_module_path
    nq = evaluate.load(evaluate_module_path())
    nq.compute(predictions=["Paris"], references=[["Paris", "Paris, France"]])

`evaluate` copies this script into its modules cache and imports the copy, so a relative
import would break; the scoring therefore comes from the installed `rag_lab.metrics`
(one implementation, identical numbers to `rag_lab.metrics.score_predictions`).
"""
import datasets
import evaluate

from rag_lab.metrics import score_predictions

_DESCRIPTION = """\
Exact match, token F1 and answer match for open-domain QA with several gold answers per
question (Natural Questions open). Answers are normalised as in the official SQuAD /
NQ-open script (lower-case, strip punctuation, drop a/an/the, squeeze white space); each
score is the max over gold answers, and gold answers that normalise to an empty string
are ignored. answer_match is 1 when a gold answer is a contiguous token span of the
prediction (FlashRAG `acc`, BERGEN `Match`).
"""

_CITATION = """\
@article{kwiatkowski-etal-2019-natural,
  title   = {Natural Questions: A Benchmark for Question Answering Research},
  author  = {Kwiatkowski, Tom and Palomaki, Jennimaria and Redfield, Olivia and others},
  journal = {Transactions of the Association for Computational Linguistics},
  volume  = {7}, pages = {452--466}, year = {2019}
}
@inproceedings{lee-etal-2019-latent,
  title     = {Latent Retrieval for Weakly Supervised Open Domain Question Answering},
  author    = {Lee, Kenton and Chang, Ming-Wei and Toutanova, Kristina},
  booktitle = {Proceedings of ACL}, pages = {6086--6096}, year = {2019}
}
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: list of predicted answer strings, one per question.
    references: list of lists of gold answer strings, one list per question.
Returns:
    exact_match: mean exact match in [0, 1].
    f1: mean token F1 in [0, 1].
    answer_match: mean answer match in [0, 1].
Examples:
    >>> nq = evaluate.load(evaluate_module_path())
    >>> nq.compute(predictions=["the Eiffel Tower"], references=[["Eiffel Tower"]])
    {'exact_match': 1.0, 'f1': 1.0, 'answer_match': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NqEmF1(evaluate.Metric):
    """Mean EM / F1 / answer match over questions; see rag_lab.metrics for per-question scores."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        scores = score_predictions(predictions, references)
        return {
            "exact_match": float(scores["em"].mean()),
            "f1": float(scores["f1"].mean()),
            "answer_match": float(scores["match"].mean()),
        }
