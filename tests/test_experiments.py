"""Every committed experiment validates in every profile (no download), and the README tables
are the generated ones."""
from pathlib import Path

import pytest

from rag_lab.config import PROFILES, ConfigError, RetrievalStudyConfig, declared_profiles, load_experiment
from rag_lab.paths import REPO_ROOT, results_dir
from rag_lab.reporting.readme import BLOCKS, generated_pages, render_blocks, table_part

EXPERIMENTS = sorted(p for p in (REPO_ROOT / "experiments").rglob("*.yaml")
                     if not p.name.startswith("_") and p.name != "retrieval.yaml" and p.parent.name != "accelerate")


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[str(p.relative_to(REPO_ROOT / "experiments")) for p in EXPERIMENTS])
def test_experiment_configs_validate_in_every_profile_they_declare_and_refuse_the_others(path):
    declared = declared_profiles(path)
    for profile in PROFILES:
        if profile not in declared:  # issue 23: never the default silently in its place
            with pytest.raises(ConfigError, match=f"no '{profile}' profile: it runs in {', '.join(declared)}"):
                load_experiment(path, profile)
            continue
        cfg = load_experiment(path, profile)
        assert cfg.name == path.stem
        if profile == "smoke":
            assert cfg.data.n_eval and cfg.data.n_eval <= 20  # smoke is seconds-scale
    if "full" in path.parts:
        assert declared == ["full"]  # the top level is the full setting: nothing else runs it
    else:
        assert "smoke" in declared  # every laptop experiment can be checked in seconds


def test_extended_only_experiments_say_so_in_their_config():
    """`only_in`, not a comment or a notebook's list, says where an experiment runs."""
    extended_only = [p.stem for p in EXPERIMENTS if "full" not in p.parts and "default" not in declared_profiles(p)]
    assert {"qwen_rag_dense", "qwen_rag_hybrid", "qwen15_rag", "finetune_rag_dense"} <= set(extended_only)
    assert all(declared_profiles(REPO_ROOT / "experiments" / f"{n}.yaml") == ["smoke", "extended"] for n in extended_only)


def test_full_scale_configs_use_hub_data_and_larger_models():
    full = [load_experiment(p, "full") for p in (REPO_ROOT / "experiments" / "full").glob("[a-z]*.yaml")]
    assert len(full) >= 5
    assert all(c.data.dataset == "nq-open" and c.data.corpus.startswith("hf:") for c in full)
    assert all(c.generator.model not in ("smollm2-135m-instruct",) for c in full)
    dense = [c.retriever for c in full if c.retriever.kind in ("dense", "hybrid")]
    # 21M passages: IVF-PQ codes read memory-mapped, float16 embedding shards (issue 15)
    assert dense and all(r.index_factory.startswith("IVF") and "PQ" in r.index_factory and r.embedding_dtype == "float16"
                         for r in dense)
    assert any(c.training.enabled and len(c.training.seeds) == 3 for c in full)


def test_retrieval_study_config():
    assert declared_profiles(REPO_ROOT / "experiments" / "retrieval.yaml") == ["default", "smoke", "extended"]
    for profile in ("smoke", "default", "extended"):
        cfg = load_experiment(REPO_ROOT / "experiments" / "retrieval.yaml", profile, cls=RetrievalStudyConfig)
        # a dense index of NQ-mini 2's 126k passages costs ~45 min (int8): dense, hybrid and the fine-tuned encoder
        # run in the extended profile (and smoke, on its tiny corpus) only; the default hour has BM25
        expected = {"bm25", "dense", "hybrid", "dense_ft"} if profile in ("smoke", "extended") else {"bm25"}
        assert set(cfg.retrievers) == expected
        assert set(cfg.budget.retrievers) <= set(cfg.retrievers) and cfg.budget.choose_at in cfg.budget.budgets


def test_readme_tables_are_the_generated_ones():
    """Every generated block is in exactly one page (README.md or docs/*.md), equal to its results file."""
    pages = {page.name: page.read_text(encoding="utf-8") for page in generated_pages()}
    for name, filename in BLOCKS.items():
        path = results_dir() / filename
        holding = [page for page, text in pages.items() if f"<!-- BEGIN {name} -->" in text]
        if path.exists():  # a block exists exactly when its results file does
            assert len(holding) == 1, (name, holding)
            block = f"<!-- BEGIN {name} -->\n{table_part(path.read_text(encoding='utf-8'))}<!-- END {name} -->"
            assert block in pages[holding[0]], (name, holding[0])
    for text in pages.values():
        assert render_blocks(text, results_dir()) == text


def test_readme_is_short_and_its_links_resolve():
    """Issue 23: the README is what it is, the two commands, the table and findings, the layout and links (<= 300
    lines); the long sections live in docs/, and every relative link of every page points at a file that exists."""
    import re

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 300
    for page in generated_pages():
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"


def test_oracle_rows_cover_the_gold_questions_of_the_main_rows():
    """The oracle rows draw 680 questions so that n >= 500 have a gold passage; the seeded 680 hold the 500 every
    other row reads, so the oracle is paired with them on all of their gold-passage questions."""
    from rag_lab.data import load_qa
    from rag_lab.data.subsets import subset_questions

    main, oracle = (load_experiment(REPO_ROOT / "experiments" / f"{n}.yaml") for n in ("qwen_rag", "qwen_oracle"))
    pool = load_qa("nq-mini", "eval")
    rows = subset_questions(pool, main.data.n_eval, main.data.subset_seed)
    lens = [q for q in subset_questions(pool, oracle.data.n_eval, oracle.data.subset_seed) if q.gold_passage_id]
    assert len(lens) >= 500 and {q.id for q in rows if q.gold_passage_id} <= {q.id for q in lens}
