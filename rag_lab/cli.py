"""Command line: `rag-lab build-data`, `rag-lab reproduce`, `rag-lab run`, `rag-lab index`, `rag-lab table`,
`rag-lab fetch-models`, `rag-lab config-help`, `rag-lab check-config`."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rag_lab.config import (ConfigError, ExperimentConfig, PROFILES, RetrievalStudyConfig, config_help, declared_profiles,
                             is_study, load_experiment)
from rag_lab.data import build_nq_mini
from rag_lab.io import UserError
from rag_lab.paths import REPO_ROOT, data_dir, profile_results_dir
from rag_lab.reporting.readme import update_readme
from rag_lab.reporting.runs import check_run_folder, main_table_problem, rebuild_main_table, run_folders


def _build_data(args: argparse.Namespace) -> None:
    argv = (["--rebuild"] if args.rebuild else []) + (["--source", str(args.source)] if args.source else [])
    build_nq_mini.main(argv + (["--out", str(args.out)] if args.out else []))


def _reproduce(args: argparse.Namespace) -> None:
    from rag_lab.notebooks import run_notebooks  # why: papermill + jupyter, only for reproduce
    from rag_lab.reporting.timings import timed  # why: loads torch; `--help` and check-config need none of it

    out = data_dir() / "nq_mini"
    with timed("data nq-mini", args.profile, note="build or validate data/nq_mini against its sha256 manifest"):
        manifest = build_nq_mini.ensure(out)
    build_nq_mini.print_summary(manifest, out)
    run_notebooks(profile=args.profile)
    if args.profile == "default":
        print("README tables", "updated" if update_readme() else "already current")


def _readme(args: argparse.Namespace) -> None:
    print("README tables", "updated" if update_readme() else "already current")


def _retrieval(args: argparse.Namespace) -> None:
    from rag_lab.studies.retrieval_eval import run_retrieval_study  # why: loads torch and transformers (seconds)

    cfg = load_experiment(args.experiment, profile=args.profile, cls=RetrievalStudyConfig)
    result = run_retrieval_study(cfg, profile=args.profile)
    print(result.table.to_string(index=False, max_colwidth=40))


def user_results_dir(args: argparse.Namespace) -> Path:
    """Where `rag-lab run` writes: --results-dir; else $RAG_LAB_RESULTS_DIR; else --committed: the repository's
    results/ (what `make reproduce` writes and the README shows); else results/user/ (git-ignored), so a
    researcher's own rows never land in the shipped tables unless asked."""
    if args.results_dir:
        return args.results_dir
    if os.environ.get("RAG_LAB_RESULTS_DIR"):
        return Path(os.environ["RAG_LAB_RESULTS_DIR"])
    return REPO_ROOT / "results" if args.committed else REPO_ROOT / "results" / "user"


def _run(args: argparse.Namespace) -> None:
    from rag_lab.runner import run_experiment  # why: loads torch and transformers (seconds)

    if args.results_dir and args.committed:
        raise ConfigError("--results-dir and --committed: give one")
    configs = [load_experiment(path, profile=args.profile, overrides=args.set) for path in args.experiments]
    before = os.environ.get("RAG_LAB_RESULTS_DIR")
    os.environ["RAG_LAB_RESULTS_DIR"] = str(user_results_dir(args))  # for this command only (restored below)
    try:
        print(f"results -> {profile_results_dir(args.profile)}" + ("" if args.committed or args.results_dir or before else
              "  (your own folder; --committed writes the repository's tables)"))
        for cfg in configs:
            result = run_experiment(cfg, profile=args.profile)
            if result is None:  # a non-main process of a multi-process launch: the main one reports
                continue
            m = result.metrics["all"]
            print(f"{cfg.name} [{args.profile}] n={m['n']}: EM {m['em']['mean']:.3f}  F1 {m['f1']['mean']:.3f}  "
                  f"match {m['match']['mean']:.3f}  ({result.timings['wall_s']:.0f} s) -> {result.run_dir}")
    finally:
        if before is None:
            os.environ.pop("RAG_LAB_RESULTS_DIR", None)
        else:
            os.environ["RAG_LAB_RESULTS_DIR"] = before


def _index(args: argparse.Namespace) -> None:
    from rag_lab.indexing import index_experiment, parse_shard  # why: loads torch and transformers (seconds)

    if args.ray and args.workers < 1:  # 0 workers used to mean "in-process", quietly
        raise ConfigError(f"--workers {args.workers}: --ray needs at least one worker")
    if args.ray and args.shards is not None and args.shards < 1:
        raise ConfigError(f"--shards {args.shards}: needs at least one shard")
    if args.gpus_per_worker < 0:
        raise ConfigError(f"--gpus-per-worker {args.gpus_per_worker}: must be >= 0")
    cfg = load_experiment(args.experiment, profile=args.profile)
    for line in index_experiment(cfg, parse_shard(args.shard) if args.shard else None, args.workers if args.ray else 0,
                                 args.shards, args.gpus_per_worker, args.address, args.profile):
        print(line)


def _table(args: argparse.Namespace) -> None:
    if args.rebuild:
        print(f"rebuilt from the run folders ({main_table_problem(args.profile) or 'the table was consistent'})")
        rebuild_main_table(args.profile)
    else:
        from rag_lab.reporting.results import upsert_main_table  # why: pandas only; re-render the .md with the current code

        upsert_main_table([], args.profile)
    print((profile_results_dir(args.profile) / "main_table.md").read_text(encoding="utf-8"))


def _runs(args: argparse.Namespace) -> None:
    bad = 0
    for run_dir in run_folders(args.profile):
        problem = check_run_folder(run_dir)
        bad += problem is not None
        print(f"{'BAD' if problem else 'ok '}  {run_dir.relative_to(profile_results_dir(args.profile))}"
              + (f"  {problem}" if problem else ""))
    table = main_table_problem(args.profile)
    if table:
        print(f"BAD  main_table.csv  {table} (rag-lab table --rebuild repairs it)")
    if args.check and (bad or table):
        sys.exit(1)


def _fetch_models(args: argparse.Namespace) -> None:
    from rag_lab.models import EMBEDDED_MODELS, fetch_model  # why: loads torch

    # By default every model with something to do: split files to assemble, GGUFs to de-quantise.
    names = args.names or [n for n, m in EMBEDDED_MODELS.items() if m.parts or m.kind == "gguf-causal-lm"]
    for name in names:
        fetch_model(name, log=print)


def _config_help(args: argparse.Namespace) -> None:
    print("\n".join(config_help()))


def _check_config(args: argparse.Namespace) -> None:
    """Each file in the profile asked for, or else in every profile it declares (a typo in a smoke block
    fails here, not when the smoke run reaches it); retrieval studies as studies."""
    for path in args.experiments:
        cls = RetrievalStudyConfig if is_study(path) else ExperimentConfig
        for profile in [args.profile] if args.profile else declared_profiles(path):
            cfg = load_experiment(path, profile=profile, cls=cls)
            kind = "retrieval study" if cls is RetrievalStudyConfig else cfg.regime
            print(f"ok  {path} [{profile}] -> {cfg.name} ({kind})")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rag-lab", description="rag_lab: reproducible retrieval-augmented QA experiments")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-data", help="build (or validate) the embedded nq-mini benchmark")
    p.add_argument("--rebuild", action="store_true", help="rebuild from the raw sources even if present")
    p.add_argument("--source", type=Path, help="raw sources folder (default ../shared/data)")
    p.add_argument("--out", type=Path, help="output folder (default data/nq_mini)")
    p.set_defaults(func=_build_data)

    p = sub.add_parser("reproduce", help="validate the data and execute every numbered notebook")
    p.add_argument("--profile", choices=PROFILES, default="default")
    p.set_defaults(func=_reproduce)

    p = sub.add_parser("retrieval", help="compare retrievers by answer recall@k (results/retrieval.*)")
    p.add_argument("experiment", type=Path, nargs="?", default=Path("experiments/retrieval.yaml"))
    p.add_argument("--profile", choices=PROFILES, default="default")
    p.set_defaults(func=_retrieval)

    p = sub.add_parser("run", help="run experiments: retrieve -> generate -> score; upsert the main table of "
                                   "results/user/ (--committed: the repository's results/)")
    p.add_argument("experiments", nargs="+", type=Path)
    p.add_argument("--profile", choices=PROFILES, default="default")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (YAML value), e.g. --set retriever.k=10; repeatable; recorded in "
                        "the run's config.json")
    p.add_argument("--results-dir", type=Path, default=None, help="write the tables and run folders here")
    p.add_argument("--committed", action="store_true",
                   help="write into the repository's results/ (the shipped tables), as make reproduce does")
    p.set_defaults(func=_run)

    p = sub.add_parser("index", help="build an experiment's retrieval index ahead of its run (sharded, or on Ray)")
    p.add_argument("experiment", type=Path)
    p.add_argument("--profile", choices=PROFILES, default="default")
    p.add_argument("--shard", metavar="I/N", help="dense: encode only shard I of N (0-based; one per GPU or machine), "
                   "then run once more without --shard to build the index")
    p.add_argument("--ray", action="store_true", help="encode the dense shards on Ray Data workers (pip install -e '.[scale]'; "
                   "joins $RAY_ADDRESS or --address, else starts a local Ray)")
    p.add_argument("--workers", type=int, default=2, help="--ray: encoder actors (one per GPU, or per CPU worker)")
    p.add_argument("--shards", type=int, default=None, help="--ray: shards to split the corpus into (default: --workers)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="--ray: GPUs per encoder actor (0: CPU workers)")
    p.add_argument("--address", default=None, help="--ray: the cluster to join (default $RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=_index)

    p = sub.add_parser("table", help="print the main results table")
    p.add_argument("--profile", choices=PROFILES, default="default")
    p.add_argument("--rebuild", action="store_true", help="rebuild it from the complete run folders first")
    p.set_defaults(func=_table)

    p = sub.add_parser("runs", help="list the run folders; --check reports incomplete or inconsistent ones")
    p.add_argument("--profile", choices=PROFILES, default="default")
    p.add_argument("--check", action="store_true", help="exit 1 if a run folder or the main table is damaged")
    p.set_defaults(func=_runs)

    p = sub.add_parser("readme", help="regenerate the README's tables from results/")
    p.set_defaults(func=_readme)

    p = sub.add_parser("fetch-models", help="download/verify/assemble the embedded models and build their float32 caches")
    p.add_argument("names", nargs="*", metavar="NAME", help="embedded model names (default: all that need it)")
    p.set_defaults(func=_fetch_models)

    p = sub.add_parser("config-help", help="list every experiment config key with its default and help")
    p.set_defaults(func=_config_help)

    p = sub.add_parser("check-config", help="load and validate experiment YAML files (every profile each declares, "
                                            "unless --profile names one)")
    p.add_argument("experiments", nargs="+", type=Path)
    p.add_argument("--profile", choices=PROFILES, default=None)
    p.set_defaults(func=_check_config)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:  # the user's to fix: one clear line naming the file/key, no traceback (--debug shows it)
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
