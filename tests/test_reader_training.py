"""Extractive reader training: answer spans found in passages, span labels that decode back to the
answer, negatives at [CLS], skips and drops counted; a tiny random BERT trains (loss falls) and its
saved folder loads as a reader with a trained head; the experiment-level entry point trains once, then reuses."""
import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertModel

from rag_lab.config import DataConfig, ExperimentConfig, GeneratorConfig, RetrieverConfig, TrainingConfig
from rag_lab.data.records import Passage, QAExample
from rag_lab.generators.extractive import ExtractiveReader, load_qa_model
from rag_lab.data.records import passage_text
from rag_lab.runner import data_stage, train_stage
from rag_lab.training.common import CONFIG_FILE, RUNTIME_ONLY, TrainingError, TrainSettings
from rag_lab.training.reader import build_reader_features, find_answer_spans, fit_reader, qa_collate
from test_extractive import BERLIN, FRANCE, LOUIS, Q_FRANCE, make_bert_style_tokenizer, save_tiny_bert, tiny_bert_config



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models step fastest on one thread; two threads on a busy shared CPU run ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- find_answer_spans

def test_answer_spans_respect_word_boundaries():
    text = "In 1972, 1 man walked; the 1st prize."
    assert find_answer_spans(["1"], text) == [(9, 10)]  # not inside "1972", nor "1st"
    assert find_answer_spans(["197"], text) == []
    assert find_answer_spans(["1972"], text) == [(3, 7)]


def test_answer_spans_are_case_insensitive_and_keep_the_original_text():
    text = "The capital of France is PARIS."
    (span,) = find_answer_spans(["paris"], text)
    assert text[slice(*span)] == "PARIS"


def test_several_golds_give_sorted_first_occurrences_without_duplicates():
    text = "Paris, on the Seine. Paris again; the seine again."
    spans = find_answer_spans(["Seine", "Paris", "paris", "  ", "the  Seine", "Lyon"], text)
    assert spans == [(0, 5), (10, 19), (14, 19)]  # Paris (once), "the Seine" (white space runs match), Seine
    assert [text[s:e] for s, e in spans] == ["Paris", "the Seine", "Seine"]
    with pytest.raises(TypeError):
        find_answer_spans("Paris", text)


def test_answers_with_punctuation_match_literally():
    assert find_answer_spans(["U.S."], "made in the U.S. in 1990") == [(12, 16)]
    assert find_answer_spans(["$5"], "it cost $5 then") == [(8, 10)]
    assert find_answer_spans(["C++"], "written in C++.") == [(11, 14)]


# ---------------------------------------------------------------- build_reader_features

def decoded(tokenizer, feature) -> str:
    return tokenizer.decode(feature["input_ids"][feature["start_positions"]:feature["end_positions"] + 1])


def test_positive_span_decodes_to_the_answer_and_negative_points_at_cls():
    tok = make_bert_style_tokenizer()
    features, stats = build_reader_features([Q_FRANCE], [[BERLIN, FRANCE, LOUIS]], tok, max_length=64)
    assert stats == {"n_questions": 1, "n_features": 2, "n_positive": 1, "n_negative": 1,
                     "skipped_no_positive": 0, "dropped_truncated": 0}
    positive, negative = features  # one negative per question by default: Berlin, the highest-ranked
    assert decoded(tok, positive) == "paris"
    assert positive["input_ids"][0] == tok.cls_token_id
    assert (negative["start_positions"], negative["end_positions"]) == (0, 0)
    assert negative["input_ids"] == tok(Q_FRANCE.question, passage_text(BERLIN))["input_ids"]
    assert all(len(f["input_ids"]) == len(f["attention_mask"]) and "token_type_ids" not in f for f in features)


def test_token_type_ids_are_kept_when_the_tokenizer_returns_them():
    tok = make_bert_style_tokenizer()
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]  # as BERT's own tokenizer
    (positive, negative), _ = build_reader_features([Q_FRANCE], [[BERLIN, FRANCE]], tok, max_length=64)
    assert len(positive["token_type_ids"]) == len(positive["input_ids"])
    assert positive["token_type_ids"][positive["start_positions"]] == 1  # the answer lies in the passage segment
    batch = qa_collate(tok.pad_token_id)([positive, negative])
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions"}
    width = max(len(positive["input_ids"]), len(negative["input_ids"]))
    assert batch["input_ids"].shape == batch["token_type_ids"].shape == (2, width)
    assert batch["attention_mask"].sum().item() == len(positive["input_ids"]) + len(negative["input_ids"])


def test_every_positive_passage_gives_a_feature_and_negatives_are_capped():
    tok = make_bert_style_tokenizer()
    paris2 = Passage("Paris#0", "Paris", "Paris is a city on the river Seine")
    features, stats = build_reader_features([Q_FRANCE], [[BERLIN, FRANCE, LOUIS, paris2]], tok, max_length=64,
                                            negatives_per_question=5)
    assert (stats["n_positive"], stats["n_negative"]) == (2, 2)
    assert [decoded(tok, f) for f in features] == ["paris", "paris", "[CLS]", "[CLS]"]
    # The title is part of what the reader reads: "Paris. Paris is ..." labels the first occurrence.
    assert features[1]["start_positions"] == len(tok(Q_FRANCE.question)["input_ids"])
    none, _ = build_reader_features([Q_FRANCE], [[BERLIN, FRANCE]], tok, max_length=64, negatives_per_question=0)
    assert [decoded(tok, f) for f in none] == ["paris"]


def test_question_without_a_positive_is_skipped_and_counted():
    tok = make_bert_style_tokenizer()
    q_none = QAExample("q1", "who was king of france?", ("Napoleon",))
    features, stats = build_reader_features([q_none, Q_FRANCE], [[LOUIS, BERLIN], [FRANCE]], tok, max_length=64)
    assert stats["skipped_no_positive"] == 1 and stats["n_questions"] == 2
    assert [decoded(tok, f) for f in features] == ["paris"]  # q_none gives no negatives either


def test_a_span_truncated_away_is_dropped_and_counted():
    tok = make_bert_style_tokenizer()
    long = Passage("Long#0", "France", "the capital of france is a city on the river seine and the city is paris")
    features, stats = build_reader_features([Q_FRANCE], [[long]], tok, max_length=16)
    assert features == [] and stats["dropped_truncated"] == 1 and stats["skipped_no_positive"] == 1
    features, stats = build_reader_features([Q_FRANCE], [[long]], tok, max_length=64)  # room enough: kept
    assert stats["dropped_truncated"] == 0 and decoded(tok, features[0]) == "paris"


def test_a_passage_with_the_answer_only_after_normalisation_is_not_a_negative():
    tok = make_bert_style_tokenizer()
    q = QAExample("q2", "what is the capital of france?", ("Paris", "the U.S."))
    us = Passage("US#0", "US", "the US is a country")  # normalises to "us", like "the U.S."; no raw match
    features, stats = build_reader_features([q], [[us, BERLIN, FRANCE]], tok, max_length=64)
    assert stats["n_negative"] == 1 and features[1]["input_ids"] == tok(q.question, passage_text(BERLIN))["input_ids"]


def test_bad_inputs_are_errors():
    tok = make_bert_style_tokenizer()
    with pytest.raises(ValueError, match="contexts"):
        build_reader_features([Q_FRANCE], [], tok)
    with pytest.raises(ValueError, match="negatives_per_question"):
        build_reader_features([Q_FRANCE], [[FRANCE]], tok, negatives_per_question=-1)


# ---------------------------------------------------------------- train_reader

TRAIN = [
    (QAExample("t0", "what is the capital of france?", ("Paris",)), [BERLIN, FRANCE]),
    (QAExample("t1", "what is the capital of germany?", ("Berlin",)), [FRANCE, BERLIN]),
    (QAExample("t2", "who was king of france?", ("Louis XIV",)), [BERLIN, LOUIS]),
    (QAExample("t3", "what river flows through paris?", ("Seine",)), [LOUIS, FRANCE]),
]
DEV = [(QAExample("d0", "what is the capital of germany?", ("Berlin",)), [LOUIS, BERLIN])]


def settings(**kw):
    base = dict(learning_rate=3e-3, epochs=15, batch_size=4, eval_steps=5, patience=100, group_by_length=False,
                warmup_ratio=0.0, seed=0)
    return TrainSettings(**{**base, **kw})


def mean_loss(model, features, tokenizer) -> float:
    with torch.no_grad():
        return model.eval()(**qa_collate(tokenizer.pad_token_id)(features)).loss.item()


def test_training_lowers_the_loss_and_saves_a_reader_with_a_trained_head(tmp_path):
    base = save_tiny_bert(tmp_path / "base", with_qa_head=False)  # an encoder: random qa_outputs, like MiniLM
    tok = make_bert_style_tokenizer()
    features, _ = build_reader_features([q for q, _ in TRAIN], [c for _, c in TRAIN], tok, max_length=64)
    before = mean_loss(load_qa_model(base)[0], features, tok)
    # No dev set: the final model is the last step's (with one, it would be the best dev-EM checkpoint).
    report = fit_reader(base, features, [], None, tmp_path / "out", settings(), max_length=64, notes={"stats": "kept"})
    after = mean_loss(load_qa_model(report["final_dir"])[0], features, tok)
    assert after < 0.5 * before, (before, after)
    losses = [h["loss"] for h in report["log_history"] if "loss" in h]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    saved = json.loads((tmp_path / "out" / "final" / "rag_lab_training.json").read_text())
    assert saved["stats"] == "kept" and saved["n_train"] == len(features) == 8
    expected = {k: v for k, v in dataclasses.asdict(settings()).items() if k not in RUNTIME_ONLY}  # they change no weight
    assert saved["record"] == json.loads(json.dumps(expected))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the "no trained QA head" warning would fail here
        reader = ExtractiveReader(report["final_dir"], max_length=64)
    assert reader.head_is_trained
    preds = reader.generate([q for q, _ in TRAIN], [c for _, c in TRAIN])
    assert sum(p["prediction"].lower() == q.answers[0].lower() for p, (q, _) in zip(preds, TRAIN)) >= 3


def test_dev_em_is_computed_at_each_evaluation_and_picks_the_final_model(tmp_path):
    base = save_tiny_bert(tmp_path / "base", with_qa_head=False)
    tok = make_bert_style_tokenizer()
    features, _ = build_reader_features([q for q, _ in TRAIN], [c for _, c in TRAIN], tok, max_length=64)
    report = fit_reader(base, features, [q for q, _ in DEV], [c for _, c in DEV], tmp_path / "out",
                          settings(epochs=5), max_length=64)
    history = report["dev_history"]
    assert [h["step"] for h in history] == [5, 10] and report["n_dev"] == 1 and report["n_dev_features"] == 2
    assert all(h["dev_em"] in (0.0, 1.0) and h["eval_loss"] is not None for h in history)
    # the checkpoint rule: the best dev EM, ties to the lower dev loss, then the later step
    best = max(history, key=lambda h: (h["dev_em"], -h["eval_loss"], h["step"]))
    assert report["best_checkpoint"].endswith(f"checkpoint-{best['step']}")
    assert_same_weights(Path(report["best_checkpoint"]), Path(report["final_dir"]))


def assert_same_weights(a: Path, b: Path):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_reader_training_refuses_lora_empty_data_and_a_foreign_checkpoint_folder(tmp_path):
    base = save_tiny_bert(tmp_path / "base", with_qa_head=True)
    tok = make_bert_style_tokenizer()
    features, _ = build_reader_features([Q_FRANCE], [[FRANCE]], tok, max_length=64)
    with pytest.raises(TrainingError, match="full"):
        fit_reader(base, features, [], None, tmp_path / "a", settings(method="lora"))
    with pytest.raises(TrainingError, match="empty"):
        fit_reader(base, [], [], None, tmp_path / "a", settings())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / CONFIG_FILE).write_text(json.dumps({"learning_rate": 1.0}))
    with pytest.raises(TrainingError, match="different config"):
        fit_reader(base, features, [], None, tmp_path / "b", settings(), max_length=64)


def test_a_dev_set_with_no_answer_in_its_passages_warns_and_trains_without_dev(tmp_path):
    base = save_tiny_bert(tmp_path / "base", with_qa_head=True)
    features, _ = build_reader_features([Q_FRANCE], [[FRANCE]], make_bert_style_tokenizer(), max_length=64)
    with pytest.warns(UserWarning, match="training without a dev set"):
        report = fit_reader(base, features, [QAExample("d", "who was king?", ("Napoleon",))], [[LOUIS]],
                              tmp_path / "a", settings(epochs=2), max_length=64)
    assert report["n_dev"] == 0 and report["dev_history"] == [] and report["global_step"] == 2


# ---------------------------------------------------------------- the runner's train stage for regime "reader"

def save_tiny_encoder(path) -> str:
    """A tiny random BERT encoder (no QA head) with room for the 384-token window the reader trains on."""
    tok = make_bert_style_tokenizer()
    torch.manual_seed(0)
    config = tiny_bert_config(tok)
    config.max_position_embeddings = 512
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)

def test_reader_train_stage_trains_on_retrieved_passages_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_LAB_CACHE", str(tmp_path / "cache"))  # BM25 index and retrieval results
    monkeypatch.setenv("RAG_LAB_RESULTS_DIR", str(tmp_path / "results"))  # the index build's timings row
    base = save_tiny_encoder(tmp_path / "base")
    cfg = ExperimentConfig(
        name="reader_test", regime="reader",
        data=DataConfig(n_eval=12, n_train=12, n_corpus=200),
        retriever=RetrieverConfig(kind="bm25", k=3),
        generator=GeneratorConfig(kind="extractive", model=base),
        training=TrainingConfig(enabled=True, epochs=1, batch_size=8, eval_steps=2, dev_size=8,
                                output=str(tmp_path / "train")))
    final, info = train_stage(cfg, data_stage(cfg), seed=0, show_progress=False)
    assert final == tmp_path / "train" / "seed0" / "final" and (final / "model.safetensors").exists()
    stats = info["stats"]
    assert stats["n_questions"] == info["n_train_questions"] == 12 and stats["n_positive"] > 0
    assert stats["n_features"] == stats["n_positive"] + stats["n_negative"] == info["n_train"]
    assert info["n_dev"] == 8 and info["global_step"] >= 1
    mtime = (final / "model.safetensors").stat().st_mtime_ns
    again, info2 = train_stage(cfg, data_stage(cfg), seed=0, show_progress=False)
    assert again == final and info2 == info and (final / "model.safetensors").stat().st_mtime_ns == mtime
    assert "index bm25" in (tmp_path / "results" / "timings.csv").read_text()  # recorded where the test says
