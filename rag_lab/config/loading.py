"""Strict YAML loading: bases, profiles (`profiles:` blocks, `only_in:`), `--set` overrides, typed
construction that names the bad key, and paths resolved once (beside the config, under the repo)."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from rag_lab.io import check_not_protected, check_replaceable
from rag_lab.paths import REPO_ROOT, repo_path
from rag_lab.config.experiment import ExperimentConfig, RetrievalStudyConfig
from rag_lab.config.sections import ConfigError

PROFILES = ("smoke", "default", "extended", "full")


def _type_ok(value: Any, tp: Any) -> bool:
    """A small runtime type check for the annotation forms used above."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if tp is float:  # YAML writes 1 for 1.0; bool is not a number here
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def from_dict(cls: type, data: Any, where: str = "", section: str = ""):
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{section or 'top level'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        keypath = f"{section}.{key}" if section else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{keypath}'{hint}; valid keys: {', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, where, keypath)
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{keypath}' must be a mapping of name -> {typing.get_args(tp)[1].__name__}")
            kwargs[key] = {str(k): from_dict(typing.get_args(tp)[1], v or {}, where, f"{keypath}.{k}") for k, v in value.items()}
        elif not _type_ok(value, tp):
            raise ConfigError(f"{where}: '{keypath}' = {value!r} is not of type {_type_name(tp)}")
        elif isinstance(value, float) and not math.isfinite(value):  # YAML's .nan and .inf pass every comparison check
            raise ConfigError(f"{where}: '{keypath}' = {value!r} is not a finite number")
        else:
            kwargs[key] = float(value) if tp is float else value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"{{file}}:{key_node.start_mark.line + 1}: duplicate key {key!r} "
                                  f"(first given on line {seen[key]}); the last one would silently win")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict:
    """The mapping of one YAML file (yaml.safe_load rules, duplicate keys refused); errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such experiment file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a YAML file (name the experiment's .yaml file)") from None
    except PermissionError:
        raise ConfigError(f"{path}: not readable (permission denied)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}): save the file as UTF-8") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(str(e).replace("{file}", str(path))) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty (or only comments); an experiment needs at least a regime")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: an experiment file must be a mapping")
    return raw


def _read_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The file's mapping merged over its `base:` file (a path relative to it), recursively."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' files form a cycle")
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a path to another YAML file")
    return _deep_merge(_read_with_bases(path.parent / base, seen + (path.resolve(),)), raw)


def declared_profiles(path: str | Path) -> list[str]:
    """The profiles an experiment runs in: those named by `only_in:` when the file (or a base) has it,
    else "default" and every profile it writes a block for (an empty block counts: the top level as is)."""
    raw = _read_with_bases(Path(path))
    return _runs_in(Path(path), raw.get("only_in"), raw.get("profiles") or {})


def _runs_in(path: Path, only_in, profiles) -> list[str]:
    if not isinstance(profiles, dict) or any(p not in PROFILES for p in profiles):
        raise ConfigError(f"{path}: 'profiles' keys must be among {', '.join(PROFILES)}, got {list(profiles)}")
    if only_in is None:
        return ["default", *(p for p in PROFILES if p != "default" and p in profiles)]
    if not isinstance(only_in, list) or not only_in or any(p not in PROFILES for p in only_in):
        raise ConfigError(f"{path}: 'only_in' must list profiles among {', '.join(PROFILES)}, got {only_in!r}")
    return [p for p in PROFILES if p in only_in]


def experiments_in(paths: Sequence[str | Path], profile: str) -> dict[str, "ExperimentConfig"]:
    """The configs, by name, of the experiments among `paths` that run in `profile` (their `profiles:` /
    `only_in:` decide, not the caller); smoke runs those of the default profile, so a notebook's smoke run
    checks the cells of its default run in seconds."""
    selecting = "default" if profile == "smoke" else profile
    return {Path(p).stem: load_experiment(p, profile) for p in paths if selecting in declared_profiles(p)}


def is_study(path: str | Path) -> bool:
    """A retrieval study (`rag-lab retrieval`), not an experiment: it names retrievers to compare."""
    return "retrievers" in _read_with_bases(Path(path))


def parse_override(text: str) -> dict:
    """`section.key=value` (the value read as YAML: 10, true, [1, 2], a string) as a nested dict."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"--set {text!r}: write KEY=VALUE, e.g. --set retriever.k=10")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e})") from None
    out: Any = parsed
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


def load_experiment(path: str | Path, profile: str = "default", cls: type = ExperimentConfig,
                    overrides: Sequence[str] = ()):
    """Load an experiment YAML (yaml.safe_load) and apply the overrides of `profile`, then `overrides`
    (command-line `--set key=value`, applied last and validated like the file; the run's config.json records them).

    `base: other.yaml` merges this file over another (shared settings live once);
    `profiles:` maps a profile name (smoke / extended / full) to a partial config; the
    default profile is the file's top level as written. A profile the file has no block for is an
    error naming the ones it has (an empty block runs the top level under that profile), and
    `only_in: [extended]` lists the only profiles an experiment runs in (the top level being the
    setting of a profile it lists when that profile has no block).
    """
    path = Path(path)
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; profiles: {', '.join(PROFILES)}")
    raw = _read_with_bases(path)
    profiles = raw.pop("profiles", {}) or {}
    only_in = raw.pop("only_in", None)
    runs_in = _runs_in(path, only_in, profiles)
    if profile not in runs_in:  # never the default silently in its place (FlashRAG's None-config failure)
        raise ConfigError(f"{path}: no {profile!r} profile: it runs in {', '.join(runs_in)} "
                          + ("only (its only_in)" if only_in is not None else
                             f"(add `profiles: {{{profile}: {{}}}}` to run its default settings under {profile})"))
    raw.setdefault("name", path.stem)
    merged = _deep_merge(raw, profiles.get(profile) or {})
    for text in overrides:
        merged = _deep_merge(merged, parse_override(text))
    where = str(path) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    return resolve_paths(beside_config(from_dict(cls, merged, where=where), path.parent))


def beside_config(cfg, folder: Path):
    """Data files named by a relative path that exists beside the config file, not in the working
    directory, read from there (`data.dataset: qa.jsonl` next to the YAML works from any folder)."""
    data = getattr(cfg, "data", None)
    if data is None:
        return cfg
    moved = {key: str((folder / value).resolve()) for key in ("dataset", "corpus", "train_split")
             if (value := getattr(data, key)) and not Path(value).is_absolute() and not Path(value).exists()
             and (folder / value).is_file()}
    return dataclasses.replace(cfg, data=dataclasses.replace(data, **moved)) if moved else cfg


def resolve_paths(cfg):
    """The config with its paths resolved once, so every stage reads the same folder whatever the
    working directory: output folders (`training.output`, `train_retriever.output`) that are
    relative are under the repo root; a model or encoder that names a relative path existing
    under the repo root (or the study's own `train_retriever.output`, built later) resolves
    there. Embedded names and hub ids are left as they are."""
    if isinstance(cfg, ExperimentConfig):
        output = _under_repo(cfg.training.output) if cfg.training.output else ""
        if output:  # the trainer writes checkpoints inside it and replaces <output>/seed<n>/final
            check_not_protected(Path(output), "training.output")
        return dataclasses.replace(cfg, generator=dataclasses.replace(cfg.generator, model=repo_path(cfg.generator.model)),
                                   retriever=dataclasses.replace(cfg.retriever, encoder=repo_path(cfg.retriever.encoder),
                                                                 query_encoder=repo_path(cfg.retriever.query_encoder) if cfg.retriever.query_encoder else ""),
                                   training=dataclasses.replace(cfg.training, output=output))
    if isinstance(cfg, RetrievalStudyConfig):
        t = cfg.train_retriever
        trained = _under_repo(t.output)
        check_replaceable(Path(trained), "train_retriever.output")  # the trained encoder replaces this folder

        def encoder(name: str) -> str:
            return trained if name == t.output or _under_repo(name) == trained else repo_path(name)

        retrievers = {k: dataclasses.replace(r, encoder=encoder(r.encoder)) for k, r in cfg.retrievers.items()}
        return dataclasses.replace(cfg, retrievers=retrievers,
                                   train_retriever=dataclasses.replace(t, output=trained, base_encoder=repo_path(t.base_encoder)),
                                   budget=dataclasses.replace(cfg.budget, reader=repo_path(cfg.budget.reader)))
    return cfg


def _under_repo(path: str) -> str:
    return path if Path(path).is_absolute() else str(REPO_ROOT / path)


def config_help(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """One line per field: key, default, help — for `rag-lab config-help`."""
    lines = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            lines += config_help(f.default_factory, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{key} = {default!r}  # {f.metadata.get('help', '')}")
    return lines
