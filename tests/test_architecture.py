"""The import rules of docs/ARCHITECTURE.md, checked against the code: who may import whom, where a
retriever may be built, where the cache folder and the answer-in-passage test are decided, and that
every function-level import says why it is not at the top."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rag_lab"
LOW = {"paths", "io", "config", "data", "metrics", "models"}
# first component of the module (package or top-level module) -> rag_lab parts it may import
ALLOWED = {
    "paths": set(), "io": {"paths"}, "config": {"paths", "io"},
    "data": {"data", "io", "paths", "metrics"}, "metrics": set(), "models": {"models", "paths", "io"},
    "flops": set(),
    "retrievers": {"retrievers", "data", "flops", "io", "metrics", "models", "paths"},
    "generators": {"generators", "config", "data", "io", "metrics", "models", "paths"},
    "training": {"training", "config", "data", "generators", "io", "metrics", "models"},
    "pipeline": {"data", "retrievers", "reporting"},
    # results tables, run folders (read by `rag-lab table` / `runs` without torch), timings, README blocks
    "reporting": {"reporting", "config", "data", "flops", "io", "metrics", "paths"},
    "runner": LOW | {"runner", "flops", "generators", "pipeline", "reporting", "training"},
    # Ray Data actors build one shard's encoder or one generator; never the runner or a whole index
    "scale": {"data", "io", "retrievers", "generators"},
}
RETRIEVER_CLASSES = {"BM25Retriever", "DenseRetriever", "HybridRetriever", "OracleRetriever", "build_retriever"}


def modules() -> list[tuple[str, Path, ast.Module]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        out.append((".".join(rel.parts), path, ast.parse(path.read_text(encoding="utf-8"))))
    return out


def rag_lab_imports(tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """(imported rag_lab module, names, line) for every import in the module, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rag_lab":
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "rag_lab"]
    return found


def part(module: str) -> str:
    """rag_lab.training.reader -> training; `from rag_lab import plots` is handled by the caller."""
    return module.split(".")[1] if module.count(".") else ""


@pytest.mark.parametrize("name,path,tree", modules(), ids=[m[0] for m in modules()])
def test_imports_follow_the_layering(name, path, tree):
    owner = name.split(".")[0]
    if owner not in ALLOWED:
        return  # studies, analysis, plots, readme, notebooks, cli: on top of the runner, may import anything
    bad = []
    for module, names, line in rag_lab_imports(tree):
        targets = [part(module)] if part(module) else names  # `from rag_lab import models` imports models
        bad += [f"{path.name}:{line} imports rag_lab.{t}" for t in targets if t != owner and t not in ALLOWED[owner]]
    assert not bad, f"rag_lab.{owner} may import only {sorted(ALLOWED[owner])}: " + "; ".join(bad)


def test_trainers_never_see_the_experiment_config_or_a_retriever():
    for name, path, tree in modules():
        if not name.startswith("training"):
            continue
        for module, names, line in rag_lab_imports(tree):
            assert "ExperimentConfig" not in names and "RetrievalStudyConfig" not in names, f"{path.name}:{line}"
            assert part(module) not in ("retrievers", "pipeline", "runner"), f"{path.name}:{line} imports {module}"


def test_only_the_pipeline_builds_retrievers():
    """Outside rag_lab/retrievers/ itself, only pipeline.contexts constructs a retriever."""
    builders = []
    for name, path, tree in modules():
        if name.startswith("retrievers") or name == "pipeline":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                called = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if called in RETRIEVER_CLASSES:
                    builders.append(f"{path.name}:{node.lineno} calls {called}")
    assert not builders, builders


def test_one_cache_decision_and_one_answer_in_passage_test():
    for name, path, tree in modules():
        text = path.read_text(encoding="utf-8")
        if name != "paths":
            assert "RAG_LAB_CACHE" not in re.sub(r'""".*?"""', "", text, flags=re.S), f"{path.name} reads RAG_LAB_CACHE: use paths.cache_dir(kind)"
        if name != "metrics":  # the normalised-text primitives stay behind AnswerInPassage / has_answer
            for node in ast.walk(tree):
                if isinstance(node, ast.Name) and node.id in ("padded_normalized", "has_answer_normalized"):
                    pytest.fail(f"{path.name}:{node.lineno} uses {node.id}: use metrics.AnswerInPassage")


def test_runner_has_no_branch_on_generator_kind_or_regime_name():
    files = sorted((PACKAGE / "runner").glob("*.py"))
    assert len(files) > 1, "rag_lab/runner/ is a package of stage modules"
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                source = ast.unparse(node)
                assert "generator.kind" not in source and "cfg.regime ==" not in source, f"{path.name}: {source}"


def test_function_level_imports_say_why():
    """Imports sit at the top of a module; the few kept inside functions (optional or slow
    dependencies) carry a `# why:` comment on their line or the line above (a group of them: the first)."""
    missing = []
    for name, path, tree in modules():
        lines = path.read_text(encoding="utf-8").splitlines()
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            explained: set[int] = set()
            for node in sorted((n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))), key=lambda n: n.lineno):
                here, above = lines[node.lineno - 1], lines[node.lineno - 2]
                if "# why:" in here or "# why:" in above or node.lineno - 1 in explained:
                    explained.add(node.end_lineno)
                else:
                    missing.append(f"{path.name}:{node.lineno}: {here.strip()}")
    assert not missing, "function-level imports without a '# why:' comment:\n" + "\n".join(missing)


def test_the_architecture_page_names_every_part():
    page = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for owner in ALLOWED:
        assert f"`{owner}" in page, owner


def test_the_table_and_run_folder_commands_import_no_torch():
    """Issue 23: `rag-lab table` and `rag-lab runs --check` read CSV and JSON; importing torch for them took seconds."""
    code = ("import sys; from rag_lab import cli; from rag_lab.reporting import runs; "
            "assert not {'torch', 'transformers'} & set(sys.modules), sorted({'torch', 'transformers'} & set(sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_metrics_and_flops_load_no_other_part_of_rag_lab():
    """Issue 23: metrics imported data.records (so importing it loaded the whole data package) while
    data imported metrics; the arrow now points one way, and the FLOP module sits at the bottom too."""
    code = ("import sys, rag_lab.metrics, rag_lab.flops; "
            "print(sorted(m for m in sys.modules if m.startswith('rag_lab')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['rag_lab', 'rag_lab.flops', 'rag_lab.metrics']", out


def layers() -> dict[str, tuple[int, set[str] | None]]:
    """docs/ARCHITECTURE.md's layer block: entry ("cli.py", "studies/") -> (layer, the package's modules or None)."""
    page = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = page.split("<!-- layers -->\n```\n", 1)[1].split("```", 1)[0]
    out: dict[str, tuple[int, set[str] | None]] = {}
    for line in block.splitlines()[1:]:
        level, rest = re.fullmatch(r"\s+(\d) [a-z ]+?\s{2,}(.+)", line).groups()
        for entry, modules in re.findall(r"([\w.]+/?)(?: \(([^)]*)\))?(?:, |$)", rest):
            assert entry not in out, f"{entry} is listed twice"
            out[entry] = (int(level), {m.strip() for m in modules.split(",")} if modules else None)
    return out


def test_the_folders_are_the_layers_the_architecture_page_draws():
    """Issue 23: every file and folder of rag_lab/ sits in one layer of docs/ARCHITECTURE.md, each package's
    modules are the ones the page lists, and no module imports from a layer above its own."""
    drawn = layers()
    present = {p.name + ("/" if p.is_dir() else "") for p in PACKAGE.iterdir()
               if p.name not in ("__init__.py", "__pycache__") and (p.is_dir() or p.suffix == ".py")}
    assert set(drawn) == present, f"not drawn: {sorted(present - set(drawn))}; drawn but absent: {sorted(set(drawn) - present)}"
    for entry, (_, listed) in drawn.items():
        if entry.endswith("/"):
            found = {p.stem for p in (PACKAGE / entry).glob("*.py") if p.name != "__init__.py"}
            assert listed == found, f"{entry}: the page lists {sorted(listed or ())}, the folder holds {sorted(found)}"
    level = {entry.rstrip("/").removesuffix(".py"): lvl for entry, (lvl, _) in drawn.items()}
    upward = []
    for name, path, tree in modules():
        own = level[name.split(".")[0]] if name != "__init__" else 0
        for module, names, line in rag_lab_imports(tree):
            for target in [part(module)] if part(module) else names:
                if level.get(target, 0) > own:
                    upward.append(f"{path.relative_to(PACKAGE)}:{line} (layer {own}) imports {target} (layer {level[target]})")
    assert not upward, upward


def test_no_module_is_over_400_lines():
    """Issue 23: a module past 400 lines was holding two jobs; split it along them."""
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, long
