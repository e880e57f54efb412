"""Killed runs and concurrent runs (issue 13). A run is SIGKILLed in a subprocess at the moments a kill
hurts most — between a retrieval cache file and its checksum, mid-generation, while the main table is
being replaced, while a training checkpoint is being written — and run again: the final predictions,
metrics and table row are byte-identical to an uninterrupted run's. Two runs and a table reader at once
lose and duplicate no row."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tiny_models import make_tiny_causal_lm

HERE = Path(__file__).resolve().parent
QA = [{"id": f"q{i}", "question": q, "answers": [a]} for i, (q, a) in enumerate([
    ("what is the capital of france", "paris"), ("who was king of france", "louis"),
    ("which river is in the city", "seine"), ("what is the capital of germany", "berlin"),
    ("when was the president born", "1900"), ("which mountain is in the country", "alps")])]
TRAIN = [{"id": f"t{i}", "question": q, "answers": [a]} for i, (q, a) in enumerate([
    ("which city has the tower", "paris"), ("who painted the ceiling", "michelangelo"),
    ("what is the largest ocean", "pacific"), ("who wrote the play", "shakespeare"),
    ("what colour is the sky", "blue"), ("which planet is red", "mars")])]
CORPUS = [{"id": "Paris#0", "title": "paris", "text": "paris is the capital city of france"},
          {"id": "Berlin#0", "title": "berlin", "text": "berlin is the capital city of germany"},
          {"id": "Seine#0", "title": "seine", "text": "the seine river is in the city of paris"}]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    for name, rows in (("qa.jsonl", QA), ("train.jsonl", TRAIN), ("corpus.jsonl", CORPUS)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_tiny_causal_lm(root / "model")
    data = f"data: {{dataset: {root}/qa.jsonl, train_split: {root}/train.jsonl, corpus: {root}/corpus.jsonl}}\n"
    gen = f"generator: {{model: {root}/model, batch_size: 2, max_new_tokens: 3, use_chat_template: false}}\n"
    (root / "rag.yaml").write_text("name: rag_tiny\nregime: rag\nretriever: {kind: bm25, k: 2, stopwords: null, stemmer: null}\n" + data + gen)
    (root / "ft.yaml").write_text("name: ft_tiny\nregime: closed_book_ft\n" + data + gen +
                                  "training: {enabled: true, epochs: 3, batch_size: 2, eval_steps: 1, dev_size: 2, "
                                  "learning_rate: 0.01, group_by_length: false}\n")
    return root


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """Each config run once without a fault: what every killed-and-rerun run must reproduce."""
    out = {}
    for config, name in (("rag.yaml", "rag_tiny"), ("ft.yaml", "ft_tiny")):
        root = tmp_path_factory.mktemp("reference")
        assert run("none", files / config, root / "results", root / "cache") == 0
        out[config] = outcome(root / "results", name)
    return out


def run(point: str, config: Path, results: Path, cache: Path) -> int:
    env = {**os.environ, "RAG_LAB_RESULTS_DIR": str(results), "RAG_LAB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(HERE / "fault_run.py"), point, str(config)], env=env,
                          capture_output=True, text=True, timeout=300).returncode


def outcome(results: Path, name: str) -> tuple[bytes, bytes, dict]:
    (run_dir,) = (results / "runs" / name).iterdir()
    row = pd.read_csv(results / "main_table.csv").astype(object).fillna("").set_index("experiment").loc[name].drop("wall_s").to_dict()
    return (run_dir / "predictions.jsonl").read_bytes(), (run_dir / "metrics.json").read_bytes(), row


@pytest.mark.parametrize("point,config", [("retrieval-cache", "rag.yaml"), ("mid-generation", "rag.yaml"),
                                          ("table-upsert", "rag.yaml"), ("checkpoint", "ft.yaml")])
def test_a_killed_run_reruns_to_the_same_result(point, config, files, reference, tmp_path):
    killed = tmp_path / "killed"
    assert run(point, files / config, killed / "results", killed / "cache") == -signal.SIGKILL
    finished = list((killed / "results" / "runs").rglob("metrics.json")) if (killed / "results" / "runs").exists() else []
    assert len(finished) == (1 if point == "table-upsert" else 0)  # a run folder exists only once complete
    if point == "table-upsert":  # the kill left the table without the row and a half-written temporary
        assert list((killed / "results").glob(".main_table.csv.tmp-pid*"))
    assert run("none", files / config, killed / "results", killed / "cache") == 0
    name = "rag_tiny" if config == "rag.yaml" else "ft_tiny"
    assert outcome(killed / "results", name) == reference[config]
    assert not list((killed / "results").rglob("*.tmp-pid*")), "a killed run's temporaries were not cleaned"


def test_concurrent_runs_and_a_table_reader_lose_no_row(files, tmp_path):
    env = {**os.environ, "RAG_LAB_RESULTS_DIR": str(tmp_path / "results"), "RAG_LAB_CACHE": str(tmp_path / "cache")}
    second = files / "rag2.yaml"
    second.write_text((files / "rag.yaml").read_text().replace("name: rag_tiny", "name: rag_tiny_k1").replace("k: 2", "k: 1"))
    procs = [subprocess.Popen([sys.executable, str(HERE / "fault_run.py"), "none", str(c)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in (files / "rag.yaml", second)]
    readers = 0
    while any(p.poll() is None for p in procs):  # `rag-lab table` over and over while both runs upsert
        subprocess.run([sys.executable, "-m", "rag_lab.cli", "table"], env=env, capture_output=True, timeout=120)
        readers += 1
    assert [p.returncode for p in procs] == [0, 0] and readers >= 1
    table = pd.read_csv(tmp_path / "results" / "main_table.csv")
    assert sorted(table["experiment"]) == ["rag_tiny", "rag_tiny_k1"]
