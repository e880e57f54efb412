"""The runner on tiny models and data: stage caches, resume after a kill, determinism, the table."""
import json
import threading
import time

import pandas as pd
import pytest

from rag_lab.config import ExperimentConfig, from_dict
from rag_lab.generators.hf import HFGenerator
from rag_lab.reporting.results import upsert_rows
from rag_lab.runner import run_experiment
from tiny_models import make_tiny_causal_lm

QA = [{"id": f"q{i}", "question": q, "answers": [a]} for i, (q, a) in enumerate([
    ("what is the capital of france", "paris"), ("who was king of france", "louis"),
    ("which river is in the city", "seine"), ("what is the capital of germany", "berlin"),
    ("when was the president born", "1900"), ("which mountain is in the country", "alps"),
    ("where is the capital city", "paris"), ("who was the queen", "marie")])]
CORPUS = [{"id": "Paris#0", "title": "paris", "text": "paris is the capital city of france"},
          {"id": "Berlin#0", "title": "berlin", "text": "berlin is the capital city of germany"},
          {"id": "Seine#0", "title": "seine", "text": "the seine river is in the city of paris"},
          {"id": "Alps#0", "title": "alps", "text": "the alps mountain is in the country"}]


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Isolated results and caches, a tiny QA file and corpus, a tiny saved decoder."""
    monkeypatch.setenv("RAG_LAB_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("RAG_LAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QA))
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CORPUS))
    make_tiny_causal_lm(tmp_path / "model")
    return tmp_path


def config(env, **overrides):
    raw = {"name": "tiny", "regime": "rag",
           "data": {"dataset": str(env / "qa.jsonl"), "corpus": str(env / "corpus.jsonl")},
           "retriever": {"kind": "bm25", "k": 2, "stopwords": None, "stemmer": None},
           "generator": {"model": str(env / "model"), "batch_size": 3, "max_new_tokens": 4, "use_chat_template": False}}
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(ExperimentConfig, raw)


def test_run_writes_folder_predictions_and_table_row(env):
    result = run_experiment(config(env), show_progress=False)
    files = sorted(p.name for p in result.run_dir.iterdir())
    assert files == [".rag_lab_made", "config.json", "leak_check.json", "metrics.json", "predictions.jsonl", "timings.json", "versions.json"]
    leak = json.loads((result.run_dir / "leak_check.json").read_text())
    assert leak["disjoint"] and leak["held_out_shared"] == [] and leak["eval_questions"] == len(QA)
    rows = [json.loads(l) for l in (result.run_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [q["id"] for q in QA]
    assert set(rows[0]) >= {"id", "question", "answers", "prediction", "raw", "passage_ids", "em", "f1", "answer_in_passages"}
    assert all(len(r["passage_ids"]) == 2 for r in rows)
    # Paris#0 holds "paris" and BM25 ranks it first for q0
    assert rows[0]["passage_ids"][0] == "Paris#0" and rows[0]["answer_in_passages"] is True
    versions = json.loads((result.run_dir / "versions.json").read_text())
    assert {"python", "torch", "transformers", "rag_lab_git_sha"} <= set(versions)
    table = pd.read_csv(env / "results" / "main_table.csv")
    assert table.loc[0, "experiment"] == "tiny" and table.loc[0, "n"] == len(QA)
    assert table.loc[0, "recall@k"] == pytest.approx(sum(r["answer_in_passages"] for r in rows) / len(rows))
    assert "| tiny | rag |" in (env / "results" / "main_table.md").read_text()


def test_closed_book_and_determinism(env):
    cfg = config(env, regime="closed_book", retriever={"kind": "none"})
    first = run_experiment(cfg, show_progress=False)
    text = (first.run_dir / "predictions.jsonl").read_bytes()
    assert all(r["passage_ids"] == [] and r["answer_in_passages"] is None for r in first.predictions)
    # a second run with a cold generation cache gives byte-identical predictions
    import shutil, os

    shutil.rmtree(os.environ["RAG_LAB_CACHE"])
    second = run_experiment(cfg, show_progress=False)
    assert (second.run_dir / "predictions.jsonl").read_bytes() == text


def killed_after(cfg, monkeypatch, n_batches: int, calls: list):
    """Run `cfg` with generation killed after `n_batches` batches (a KeyboardInterrupt); returns the real batch function."""
    real = HFGenerator.generate_batch

    def dies(self, prompts):
        if len(calls) == n_batches:
            raise KeyboardInterrupt("simulated kill")
        calls.append(len(prompts))
        return real(self, prompts)

    monkeypatch.setattr(HFGenerator, "generate_batch", dies)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, show_progress=False)
    return real


def test_generation_cache_and_resume_after_kill(env, monkeypatch):
    cfg = config(env)
    calls = []
    real = killed_after(cfg, monkeypatch, 2, calls)
    partial = list((env / "cache" / "runs").glob("generate-*/partial.jsonl"))
    assert len(partial) == 1 and len(partial[0].read_text().splitlines()) == 2

    def counting(self, prompts):
        calls.append(len(prompts))
        return real(self, prompts)

    monkeypatch.setattr(HFGenerator, "generate_batch", counting)
    resumed = run_experiment(cfg, show_progress=False)
    assert calls == [3, 3, 2]  # 8 questions in batches of 3: the last batch only, after the restart
    assert not partial[0].exists()

    # an uninterrupted run elsewhere produces the same bytes
    monkeypatch.setenv("RAG_LAB_CACHE", str(env / "cache2"))
    monkeypatch.setenv("RAG_LAB_RESULTS_DIR", str(env / "results2"))
    clean = run_experiment(cfg, show_progress=False)
    assert (clean.run_dir / "predictions.jsonl").read_bytes() == (resumed.run_dir / "predictions.jsonl").read_bytes()

    # warm rerun: no generation at all; the row still reports what computing it took
    calls.clear()

    def slow_batch(self, prompts):  # make the generation cost visible beside the rerun's milliseconds
        time.sleep(0.5)
        return real(self, prompts)

    monkeypatch.setenv("RAG_LAB_CACHE", str(env / "cache3"))
    monkeypatch.setattr(HFGenerator, "generate_batch", slow_batch)
    computed = run_experiment(cfg, show_progress=False)
    assert computed.row["wall_s"] >= 1.5  # three batches of 0.5 s sleep
    monkeypatch.setattr(HFGenerator, "generate_batch", counting)
    rerun = run_experiment(cfg, show_progress=False)
    assert calls == []  # nothing generated, yet the row reports the cost of the first computation
    assert rerun.row["wall_s"] >= 1.5
    assert json.loads((rerun.run_dir / "timings.json").read_text())["compute_s"] >= 1.5


def test_generation_cache_key_follows_the_config(env, monkeypatch):
    run_experiment(config(env), show_progress=False)
    run_experiment(config(env, generator={"max_new_tokens": 3}), show_progress=False)
    run_experiment(config(env, retriever={"k": 1}), show_progress=False)
    assert len(list((env / "cache" / "runs").glob("generate-*"))) == 3


def test_concurrent_upserts_lose_no_row(tmp_path):
    path = tmp_path / "table.csv"

    def add(i):
        upsert_rows(path, [{"experiment": f"e{i}", "eval_set": "s", "em": i / 10}], key=("experiment", "eval_set"))

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    table = pd.read_csv(path)
    assert sorted(table["experiment"]) == [f"e{i}" for i in range(8)]
    upsert_rows(path, [{"experiment": "e3", "eval_set": "s", "em": 0.99}], key=("experiment", "eval_set"))
    table = pd.read_csv(path)
    assert len(table) == 8 and table.set_index("experiment").loc["e3", "em"] == 0.99


def test_main_table_rows_read_in_regime_order(tmp_path):
    from rag_lab.reporting.results import in_regime_order

    table = pd.DataFrame({"experiment": ["reader_x", "rag_k10", "rag_k3", "cb_ft", "rag_ft", "cb"],
                          "regime": ["reader", "rag", "rag", "closed_book_ft", "rag_ft", "closed_book"]})
    assert in_regime_order(table)["experiment"].tolist() == ["cb", "cb_ft", "rag_k3", "rag_k10", "rag_ft", "reader_x"]
    path = tmp_path / "t.csv"
    upsert_rows(path, table.to_dict("records")[:3], key=("experiment",), order=in_regime_order)
    upsert_rows(path, table.to_dict("records")[3:], key=("experiment",), order=in_regime_order)
    assert pd.read_csv(path)["experiment"].tolist() == ["cb", "cb_ft", "rag_k3", "rag_k10", "rag_ft", "reader_x"]


def test_an_edited_passage_under_the_same_id_is_generated_again(env, monkeypatch):
    """The generation cache is keyed on passage text, not ids: a rebuilt corpus never reuses old predictions."""
    cfg = config(env)
    first = run_experiment(cfg, show_progress=False)
    calls = []
    real = HFGenerator.generate_batch
    monkeypatch.setattr(HFGenerator, "generate_batch", lambda self, prompts: calls.append(len(prompts)) or real(self, prompts))
    assert run_experiment(cfg, show_progress=False).run_dir == first.run_dir and calls == []  # same content: cached
    edited = [dict(p, text=p["text"] + " (edited)") if p["id"] == "Paris#0" else p for p in CORPUS]
    (env / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edited))
    second = run_experiment(cfg, show_progress=False)
    assert calls and second.run_dir != first.run_dir


def test_changed_answers_give_another_run(env):
    first = run_experiment(config(env), show_progress=False)
    (env / "qa.jsonl").write_text("".join(json.dumps({**q, "answers": q["answers"] + ["x"]}) + "\n" for q in QA))
    assert run_experiment(config(env), show_progress=False).run_dir != first.run_dir


def test_a_name_built_in_code_cannot_leave_results(env):
    from rag_lab.config import ConfigError

    with pytest.raises(ConfigError, match="use letters, digits"):
        config(env, name="../../outside")


def test_a_tampered_generation_cache_is_regenerated_not_used(env, monkeypatch):
    from rag_lab.io import CacheRepaired

    cfg = config(env, regime="closed_book", retriever={"kind": "none"})
    first = run_experiment(cfg, show_progress=False)
    (cached,) = (env / "cache" / "runs").glob("generate-*/predictions.jsonl")
    rows = cached.read_text().splitlines()
    cached.write_text("\n".join([rows[0].replace('"prediction": "', '"prediction": "tampered ')] + rows[1:]) + "\n")
    with pytest.warns(CacheRepaired, match="checksum mismatch"):
        second = run_experiment(cfg, show_progress=False)
    assert (second.run_dir / "predictions.jsonl").read_bytes() == (first.run_dir / "predictions.jsonl").read_bytes()


def test_recall_and_answer_in_passages_count_only_the_packed_passages(env):
    """A context budget that fits one passage: the second retrieved passage never reaches the reader, so
    `answer_in_passages` and `passage_ids` cover the first alone, while `answer_in_retrieved` (the retriever's
    recall@k, its own column) covers both. The extra question ranks Berlin#0 first and Paris#0 (its 'answer') second."""
    qa = QA + [{"id": "q8", "question": "what is the capital city of germany", "answers": ["france"]}]
    (env / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    result = run_experiment(config(env, generator={"max_context_tokens": 14}), show_progress=False)
    rows = {r["id"]: r for r in result.predictions}
    assert all(len(r["retrieved_ids"]) == 2 and len(r["passage_ids"]) == 1 for r in rows.values())
    assert all(r["passage_ids"] == r["retrieved_ids"][:1] and len(r["prompt_sha256"]) == 64 for r in rows.values())
    assert rows["q8"]["retrieved_ids"] == ["Berlin#0", "Paris#0"]
    assert rows["q8"]["answer_in_retrieved"] is True and rows["q8"]["answer_in_passages"] is False  # retrieved, packed out
    table = pd.read_csv(env / "results" / "main_table.csv")
    n = len(rows)
    assert table.loc[0, "in_prompt"] == pytest.approx(sum(r["answer_in_passages"] for r in rows.values()) / n)
    assert table.loc[0, "recall@k"] == pytest.approx(sum(r["answer_in_retrieved"] for r in rows.values()) / n)
    assert table.loc[0, "recall@k"] > table.loc[0, "in_prompt"]


def test_gold_passage_oracle_reads_the_annotated_passage(env):
    qa = [{**q, "gold_passage_id": {"q0": "Paris#0", "q3": "Berlin#0"}.get(q["id"])} for q in QA]
    (env / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    cfg = config(env, regime="oracle", retriever={"kind": "gold", "k": 1}, data={"only_gold_passage": True})
    result = run_experiment(cfg, show_progress=False)
    assert [(r["id"], r["passage_ids"]) for r in result.predictions] == [("q0", ["Paris#0"]), ("q3", ["Berlin#0"])]
    assert result.row["eval_set"].endswith("gold-passage") and result.row["n"] == 2
    with pytest.raises(Exception, match="set data.only_gold_passage: true"):
        run_experiment(config(env, regime="oracle", retriever={"kind": "gold", "k": 1}), show_progress=False)
    (env / "qa.jsonl").write_text("".join(json.dumps({**q, "gold_passage_id": "Nowhere#9" if q["id"] == "q1" else None}) + "\n" for q in QA))
    with pytest.raises(Exception, match="Nowhere#9"):  # an annotated id the corpus lacks is an error, never skipped
        run_experiment(cfg, show_progress=False)


@pytest.mark.parametrize("forge", ["forged-line", "edited-answer", "other-runs-line"])
def test_a_batch_log_line_that_fails_its_checksum_is_regenerated_not_served(env, monkeypatch, forge):
    """Issue 22: a forged `{"indices":[0],"raw":["FORGED ANSWER"]}` line used to become a prediction."""
    from rag_lab.io import CacheRepaired

    cfg = config(env)
    real = killed_after(cfg, monkeypatch, 1, [])
    partial = next((env / "cache" / "runs").glob("generate-*/partial.jsonl"))
    line = json.loads(partial.read_text())
    if forge == "forged-line":
        forged = {"indices": [7], "raw": ["FORGED ANSWER"]}
    elif forge == "edited-answer":
        forged = {**line, "indices": [7], "raw": ["FORGED ANSWER"]}
    else:  # a valid line of another generation key
        forged = {**line, "indices": [7], "raw": ["FORGED ANSWER"], "sha256": "0" * 64}
    with partial.open("a") as f:
        f.write(json.dumps(forged) + "\n")
    monkeypatch.setattr(HFGenerator, "generate_batch", real)
    with pytest.warns(CacheRepaired, match="fail their checksum"):
        result = run_experiment(cfg, show_progress=False)
    preds = [json.loads(x) for x in (result.run_dir / "predictions.jsonl").read_text().splitlines()]
    assert "FORGED" not in json.dumps(preds)
    monkeypatch.setenv("RAG_LAB_CACHE", str(env / "cache2"))
    monkeypatch.setenv("RAG_LAB_RESULTS_DIR", str(env / "results2"))
    clean = run_experiment(cfg, show_progress=False)
    assert (clean.run_dir / "predictions.jsonl").read_bytes() == (result.run_dir / "predictions.jsonl").read_bytes()


def test_a_batch_line_cut_off_by_a_kill_is_dropped_quietly(env, tmp_path):
    import warnings

    from rag_lab.runner.generate import _batch_line, read_batch_log

    log = tmp_path / "partial.jsonl"
    whole = _batch_line("k", [0, 1], ["a", "b"], 0.5)
    log.write_text(whole + whole[:-7])  # the second write cut off mid-line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_batch_log(log, "k") == [json.loads(whole)]
    assert log.read_text() == whole


def test_count_columns_stay_integers_when_a_row_lacks_them(tmp_path):
    """Issue 22, item 6: a row without in-corpus data turned `n_in_corpus` into floats (`460.0`) for every row."""
    path = tmp_path / "t.csv"
    upsert_rows(path, [{"experiment": "a", "n": 500, "n_in_corpus": 460, "k": 5, "em": 0.5}], key=("experiment",))
    upsert_rows(path, [{"experiment": "b", "n": 501, "em": 0.25}], key=("experiment",))
    assert path.read_text().splitlines() == ["experiment,n,n_in_corpus,k,em", "a,500,460,5,0.5", "b,501,,,0.25"]
