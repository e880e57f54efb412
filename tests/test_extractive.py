"""Extractive reader: best_span against a brute-force reference, the reader end to end with a
mock QA model whose logits we choose, tiny random BERT checkpoints on disk, bad input."""
import itertools
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertForQuestionAnswering, BertModel, PreTrainedTokenizerFast

from rag_lab.data.records import Passage, QAExample
from rag_lab.generators.extractive import EMPTY_SPAN, ExtractiveReader, Span, best_span
from rag_lab.data.records import passage_text

NEG = float("-inf")


# ---------------------------------------------------------------- best_span

def brute_force_best_span(start, end, mask, max_answer_tokens):
    """The definition, loop by loop: candidates in (start, end) order, strict > keeps the first best."""
    best = (-1, -1, NEG)
    for s, e in itertools.product(range(len(start)), repeat=2):
        if s <= e < s + max_answer_tokens and mask[s] and mask[e] and start[s] + end[e] > best[2]:
            best = (s, e, float(start[s] + end[e]))
    return best


def test_best_span_picks_the_obvious_best():
    start = np.array([0.0, 5.0, 0.0, 0.0, 0.0])
    end = np.array([0.0, 0.0, 0.0, 4.0, 0.0])
    assert best_span(start, end, np.ones(5, bool), 10) == (1, 3, 9.0)


def test_length_limit_excludes_a_longer_higher_scoring_span():
    start = np.array([9.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    end = np.array([0.0, 0.0, 0.0, 1.0, 0.0, 9.0])
    mask = np.ones(6, bool)
    assert best_span(start, end, mask, 6) == (0, 5, 18.0)  # 6 tokens: allowed
    assert best_span(start, end, mask, 5) == (0, 3, 10.0)  # the 6-token span is now too long
    assert best_span(start, end, mask, 1) == (0, 0, 9.0)  # single tokens only


def test_end_before_start_is_never_chosen():
    start = np.array([0.0, 0.0, 0.0, 9.0])
    end = np.array([9.0, 0.0, 0.0, 1.0])
    # (3, 0) would score 18; the best allowed span is (3, 3) at 10.
    assert best_span(start, end, np.ones(4, bool), 10) == (3, 3, 10.0)


def test_positions_outside_the_context_are_never_chosen():
    # [CLS] q q [SEP] c c c [SEP]: the huge logits sit on the question and special tokens.
    start = np.array([100.0, 50.0, 50.0, 100.0, 1.0, 2.0, 0.0, 100.0])
    end = np.array([100.0, 50.0, 50.0, 100.0, 0.0, 0.0, 3.0, 100.0])
    mask = np.array([0, 0, 0, 0, 1, 1, 1, 0], bool)
    assert best_span(start, end, mask, 10) == (5, 6, 5.0)
    # A span may not straddle the boundary either: start in the question, end in the passage.
    assert best_span(start, end, mask, 10)[0] >= 4


def test_ties_go_to_the_lowest_start_then_the_lowest_end():
    assert best_span(np.zeros(4), np.zeros(4), np.ones(4, bool), 3) == (0, 0, 0.0)
    start, end = np.array([1.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0])
    # (0, 1), (0, 2) and (2, 2) all score 2: the lowest start wins, then the lowest end.
    assert best_span(start, end, np.ones(3, bool), 3) == (0, 1, 2.0)
    # Same end, different starts: (0, 2) and (1, 2) both score 4.
    assert best_span(np.array([1.0, 1.0, 0.0]), np.array([0.0, 0.0, 3.0]), np.ones(3, bool), 3) == (0, 2, 4.0)


def test_no_context_tokens_means_no_span():
    assert best_span(np.ones(3), np.ones(3), np.zeros(3, bool), 5) == (-1, -1, NEG)
    assert best_span(np.zeros(0), np.zeros(0), np.zeros(0, bool), 5) == (-1, -1, NEG)


def test_best_span_matches_brute_force_on_random_logits_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 12))
        start, end = rng.integers(-3, 4, n).astype(float), rng.integers(-3, 4, n).astype(float)  # small ints: many ties
        mask = rng.random(n) < 0.7
        max_len = int(rng.integers(1, 6))
        assert best_span(start, end, mask, max_len) == brute_force_best_span(start, end, mask, max_len)


@pytest.mark.parametrize("bad", [dict(max_answer_tokens=0), dict(end=np.zeros(3)), dict(start=np.array([np.nan, 0, 0, 0]))])
def test_best_span_rejects_bad_input(bad):
    args = dict(start=np.zeros(4), end=np.zeros(4), mask=np.ones(4, bool), max_answer_tokens=2) | bad
    with pytest.raises(ValueError):
        best_span(args["start"], args["end"], args["mask"], args["max_answer_tokens"])


# ---------------------------------------------------------------- the reader, with a mock model

WORDS = ("what is the capital of france paris city in germany berlin who was king louis xiv born river seine "
         "flows through and on a . , ?").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_bert_style_tokenizer() -> PreTrainedTokenizerFast:
    """Lower-casing word-level tokenizer with BERT's pair template, so sequence_ids() marks the passage."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)  # offsets still point into the original text
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                   unk_token="[UNK]", mask_token="[MASK]")


class TokenLogitQA(torch.nn.Module):
    """A mock QA model: each token's start/end logit is looked up by its id, so the test decides the answer."""

    def __init__(self, tokenizer, start: dict[str, float], end: dict[str, float] | None = None):
        super().__init__()
        vocab = tokenizer.get_vocab()
        self.register_buffer("start_table", torch.zeros(len(vocab)))
        self.register_buffer("end_table", torch.zeros(len(vocab)))
        for table, weights in ((self.start_table, start), (self.end_table, start if end is None else end)):
            for word, logit in weights.items():
                table[vocab[word]] = logit
        self.batch_sizes = []

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        self.batch_sizes.append(input_ids.shape[0])
        return SimpleNamespace(start_logits=self.start_table[input_ids], end_logits=self.end_table[input_ids])


def mock_reader(start, end=None, **kwargs) -> ExtractiveReader:
    tokenizer = make_bert_style_tokenizer()
    return ExtractiveReader("mock", model=TokenLogitQA(tokenizer, start, end), tokenizer=tokenizer, **kwargs)


BERLIN = Passage("Berlin#0", "Berlin", "Berlin is the capital of Germany")
FRANCE = Passage("France#0", "France", "The capital of France is Paris, on the Seine")
LOUIS = Passage("Louis XIV#0", "Louis XIV", "Louis XIV was king of France")
Q_FRANCE = QAExample("q0", "what is the capital of France?", ("Paris",))


def test_reader_picks_the_span_from_the_right_passage_with_character_offsets():
    span = mock_reader({"paris": 10.0}).read(Q_FRANCE.question, [BERLIN, FRANCE])
    context = passage_text(FRANCE)
    assert context == "France. The capital of France is Paris, on the Seine"
    assert span == Span("Paris", 20.0, "France#0", context.index("Paris"), context.index("Paris") + 5)
    assert context[span.start_char:span.end_char] == "Paris"  # original casing, not the normalised "paris"


def test_question_and_special_tokens_are_never_the_answer():
    # The highest logits of all sit on [CLS]/[SEP] and on "who", which only the question contains...
    reader = mock_reader({"[CLS]": 500.0, "[SEP]": 500.0, "who": 100.0, "seine": 1.0})
    span = reader.read("who was king?", [BERLIN, FRANCE])
    # ...so the reader must settle for the small logit inside a passage.
    assert (span.text, span.passage_id) == ("Seine", "France#0")


def test_multi_token_span_keeps_the_original_text_between_tokens():
    reader = mock_reader(start={"louis": 5.0}, end={"xiv": 5.0})
    span = reader.read("who was king of France?", [BERLIN, LOUIS])
    # The title "Louis XIV" comes first in "Louis XIV. Louis XIV was king of France": ties go to the lower start.
    assert (span.text, span.start_char, span.end_char, span.score) == ("Louis XIV", 0, 9, 10.0)


def test_max_answer_tokens_limits_the_span():
    # "France. The capital of France is Paris": start on "the", end on "paris" is 6 tokens.
    start, end = {"the": 5.0}, {"paris": 5.0, "capital": 1.0}
    assert mock_reader(start, end).read("?", [FRANCE]).text == "The capital of France is Paris"
    assert mock_reader(start, end, max_answer_tokens=5).read("?", [FRANCE]).text == "The capital"


def test_equal_scores_across_passages_go_to_the_higher_ranked_passage():
    reader = mock_reader({"capital": 3.0})
    assert reader.read("?", [FRANCE, BERLIN]).passage_id == "France#0"
    assert reader.read("?", [BERLIN, FRANCE]).passage_id == "Berlin#0"


def test_no_passages_gives_the_empty_span():
    assert mock_reader({"paris": 1.0}).read("what?", []) == EMPTY_SPAN


def test_truncated_passage_tail_is_not_read():
    long_passage = Passage("Long#0", "", "the " * 40 + "Paris")
    reader = mock_reader({"paris": 10.0, "berlin": 1.0}, max_length=16)
    span = reader.read("what city?", [long_passage, BERLIN])  # "Paris" lies past the 16 tokens
    assert span.passage_id == "Berlin#0" and span.text == "Berlin"


def test_generate_batches_all_pairs_and_matches_read():
    examples = [Q_FRANCE, QAExample("q1", "who was king?", ("Louis XIV",)), QAExample("q2", "nothing?", ("x",))]
    contexts = [[BERLIN, FRANCE], [FRANCE, LOUIS, BERLIN], []]
    reader = mock_reader({"paris": 10.0, "xiv": 3.0, "germany": 1.0}, batch_size=2)
    preds = reader.generate(examples, contexts)
    assert reader.model.batch_sizes == [2, 2, 1]  # 5 pairs, batched across examples
    assert preds == [
        {"id": "q0", "raw": "Paris", "prediction": "Paris", "passage_id": "France#0", "score": 20.0},
        {"id": "q1", "raw": "Paris", "prediction": "Paris", "passage_id": "France#0", "score": 20.0},
        {"id": "q2", "raw": "", "prediction": "", "passage_id": None, "score": None},
    ]
    one_by_one = [reader.read(e.question, c) for e, c in zip(examples, contexts)]
    assert [p["prediction"] for p in preds] == [s.text for s in one_by_one]
    wide = mock_reader({"paris": 10.0, "xiv": 3.0, "germany": 1.0}, batch_size=32)
    assert wide.generate(examples, contexts, show_progress=True) == preds


def test_generate_without_contexts_is_an_error():
    reader = mock_reader({"paris": 1.0})
    with pytest.raises(ValueError, match="needs contexts"):
        reader.generate([Q_FRANCE])
    with pytest.raises(ValueError, match="1 examples but 2 contexts"):
        reader.generate([Q_FRANCE], [[FRANCE], [BERLIN]])


def test_bad_construction_is_an_error():
    tokenizer = make_bert_style_tokenizer()
    with pytest.raises(ValueError, match="both model and tokenizer"):
        ExtractiveReader("mock", model=TokenLogitQA(tokenizer, {}))
    with pytest.raises(ValueError, match="max_answer_tokens"):
        mock_reader({}, max_answer_tokens=0)


# ---------------------------------------------------------------- tiny random BERT checkpoints on disk

def tiny_bert_config(tokenizer) -> BertConfig:
    return BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)


def save_tiny_bert(path, with_qa_head: bool, seed: int = 0) -> str:
    tokenizer = make_bert_style_tokenizer()
    torch.manual_seed(seed)
    model_cls = BertForQuestionAnswering if with_qa_head else BertModel
    model_cls(tiny_bert_config(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_qa_checkpoint_loads_from_a_path_and_reads_a_span(tmp_path):
    path = save_tiny_bert(tmp_path / "qa", with_qa_head=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a trained head: no "untrained" warning
        reader = ExtractiveReader(path, max_length=64)
    assert reader.head_is_trained and reader.tokenizer.is_fast
    span = reader.read(Q_FRANCE.question, [BERLIN, FRANCE])
    context = {p.id: passage_text(p) for p in (BERLIN, FRANCE)}[span.passage_id]
    assert span.text and context[span.start_char:span.end_char] == span.text
    assert reader.read(Q_FRANCE.question, [BERLIN, FRANCE]) == span  # deterministic


def test_checkpoint_without_qa_head_warns_and_is_reproducible(tmp_path):
    path = save_tiny_bert(tmp_path / "encoder", with_qa_head=False)
    rng_before = torch.get_rng_state()
    with pytest.warns(UserWarning, match="no trained QA head"):
        first = ExtractiveReader(path, max_length=64)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the seeded head init left the caller's RNG alone
    with pytest.warns(UserWarning, match="no trained QA head"):
        second = ExtractiveReader(path, max_length=64)
    assert not first.head_is_trained
    assert torch.equal(first.model.qa_outputs.weight, second.model.qa_outputs.weight)
    assert first.read(Q_FRANCE.question, [BERLIN, FRANCE]) == second.read(Q_FRANCE.question, [BERLIN, FRANCE])


def test_max_length_beyond_the_position_embeddings_is_an_error(tmp_path):
    path = save_tiny_bert(tmp_path / "qa", with_qa_head=True)
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        ExtractiveReader(path)  # default max_length 384 > 128


# ---------------------------------------------------------------- the embedded MiniLM (random head)

@pytest.mark.slow
def test_embedded_minilm_reads_with_a_random_head():
    with pytest.warns(UserWarning, match="no trained QA head"):
        reader = ExtractiveReader("all-minilm-l6-v2")
    preds = reader.generate([Q_FRANCE], [[BERLIN, FRANCE]])
    assert preds[0]["passage_id"] in {"Berlin#0", "France#0"}
    context = passage_text(BERLIN if preds[0]["passage_id"] == "Berlin#0" else FRANCE)
    assert preds[0]["prediction"] and preds[0]["prediction"] in context
