"""`run_experiment(cfg)`: the one orchestrator. Every experiment runs the same stages, in order,

    data -> contexts -> train (fine-tuned regimes, once per seed) -> generate -> score -> record

and `STAGES` (from `config.REGIMES`) says which of them a regime runs and which trainer it uses. The stages call the
primitives (`pipeline.contexts`, the trainers of `rag_lab.training`, the generators); none of those
sees the experiment config. One module per stage: `plan.py` (which stages), `data.py`, `contexts.py`,
`train.py`, `generate.py`, `score.py`, and `run.py` (the stages in order and the record).

Each run leaves `results/runs/<experiment>/<run id>/` (config, predictions, metrics, timings,
versions) and upserts one row of `results/main_table.{csv,md}`. Profiles other than
`default` write under `results/<profile>/` so they never overwrite the committed tables.
"""
from rag_lab.runner.contexts import check_k, contexts_stage, doc_logits, passage_index, trained_query_contexts
from rag_lab.runner.data import check_models, data_stage, leak_guard, question_key
from rag_lab.runner.generate import generate_stage, generation_cost, generation_key, read_batch_log
from rag_lab.runner.plan import STAGES, TRAINERS, RunData, Stages
from rag_lab.runner.run import RunResult, portable_path, record_row_timing, run_experiment, seed_summary
from rag_lab.runner.score import PREDICTION_EXTRAS, packed_count, score_stage, summarize_rows
from rag_lab.runner.train import train_stage, training_dir, training_record

__all__ = ["PREDICTION_EXTRAS", "RunData", "RunResult", "STAGES", "Stages", "TRAINERS", "check_k", "check_models",
           "contexts_stage", "data_stage", "doc_logits", "generate_stage", "generation_cost", "generation_key",
           "leak_guard", "packed_count", "passage_index", "portable_path", "question_key", "read_batch_log",
           "record_row_timing", "run_experiment", "score_stage", "seed_summary", "summarize_rows", "train_stage",
           "trained_query_contexts", "training_dir", "training_record"]
