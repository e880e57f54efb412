"""No config can make rag_lab replace a folder it did not create (issue 22, item 1).

Every case runs against a fake repository in tmp_path (REPO_ROOT, data, results and the caches
point there), so a guard that failed would destroy only the fake: the snapshot before and after
shows that nothing outside the run's own folders was touched.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from rag_lab.config import loading as config_loading  # where resolve_paths looks REPO_ROOT up
from rag_lab import paths
from rag_lab.config import RetrievalStudyConfig, load_experiment
from rag_lab.io import MADE_MARK, UserError, atomic_dir, check_replaceable
from rag_lab.training.retriever import TrainPair, fit_dense_retriever


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "repo"
    for folder in ("rag_lab", "data/nq_mini", "results/runs/x/abc", "experiments", ".git", "cache/models"):
        (root / folder).mkdir(parents=True)
    for name in ("rag_lab/__init__.py", "data/nq_mini/eval.jsonl", "results/main_table.csv", ".git/HEAD", "README.md"):
        (root / name).write_text("keep me\n")
    monkeypatch.setattr(paths, "REPO_ROOT", root)
    monkeypatch.setattr(config_loading, "REPO_ROOT", root)
    monkeypatch.setenv("RAG_LAB_DATA_DIR", str(root / "data"))
    monkeypatch.setenv("RAG_LAB_RESULTS_DIR", str(root / "results"))
    monkeypatch.setenv("RAG_LAB_SOURCE_DATA", str(tmp_path / "shared" / "data"))
    monkeypatch.delenv("RAG_LAB_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


PROTECTED = [".", "..", "rag_lab", "data", "data/nq_mini", "results", "experiments", ".git", "cache", "cache/models"]


@pytest.mark.parametrize("target", PROTECTED)
def test_atomic_dir_refuses_the_repo_its_parents_and_its_folders_before_writing(repo, target, monkeypatch):
    monkeypatch.chdir(repo)
    before = snapshot(repo.parent)
    with pytest.raises(UserError, match="refusing"):
        with atomic_dir(Path(target)) as tmp:
            (tmp / "new").write_text("x")
    assert snapshot(repo.parent) == before


def test_a_folder_rag_lab_did_not_make_is_refused_one_it_made_is_replaced(repo, tmp_path):
    mine = tmp_path / "my_models"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="rag_lab did not create it"):
        check_replaceable(mine, "train_retriever.output")
    assert (mine / "notes.txt").read_text() == "mine"
    fresh = tmp_path / "out"
    for text in ("one", "two"):  # made by rag_lab, then replaced by it
        with atomic_dir(fresh) as tmp:
            (tmp / "model.txt").write_text(text)
        assert (fresh / "model.txt").read_text() == text and (fresh / MADE_MARK).is_file()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        check_replaceable(tmp_path / "a_file")


def test_folders_inside_the_caches_and_run_folders_stay_replaceable(repo):
    old = repo / "cache" / "retrieval" / "bm25-123"  # written before the mark existed
    old.mkdir(parents=True)
    check_replaceable(old)
    check_replaceable(repo / "results" / "runs" / "x" / "abc")


def test_a_symlink_is_refused(repo, tmp_path):
    (tmp_path / "link").symlink_to(repo)
    with pytest.raises(UserError, match="symbolic link"):
        check_replaceable(tmp_path / "link")


@pytest.mark.parametrize("output", [".", "results", "data/nq_mini", "rag_lab", ".."])
def test_a_retrieval_study_whose_retriever_output_is_the_repo_is_refused_at_load(repo, output):
    path = repo / "experiments" / "study.yaml"
    path.write_text(f"name: study\nretrievers:\n  ft: {{kind: dense, encoder: \"{output}\"}}\nbudget: {{retrievers: [ft]}}\n"
                    f"train_retriever: {{output: \"{output}\"}}\n")
    before = snapshot(repo.parent)
    with pytest.raises(UserError, match=r"train_retriever\.output = .*refusing"):
        load_experiment(path, cls=RetrievalStudyConfig)
    assert snapshot(repo.parent) == before


@pytest.mark.parametrize("output", [".", "..", "results", "data"])
def test_a_training_output_that_holds_the_repo_is_refused_at_load(repo, output):
    path = repo / "experiments" / "ft.yaml"
    path.write_text(f"name: ft\nregime: closed_book_ft\ntraining: {{enabled: true, output: \"{output}\"}}\n")
    with pytest.raises(UserError, match=r"training\.output = .*refusing"):
        load_experiment(path)


def test_fit_dense_retriever_refuses_before_training(repo):
    pairs = [TrainPair("q", "a passage", ("another passage",))]
    before = snapshot(repo.parent)
    with pytest.raises(UserError, match="refusing"):  # the encoder is never loaded: the check comes first
        fit_dense_retriever("no-such-encoder", pairs, repo)
    assert snapshot(repo.parent) == before
