"""Small file helpers: atomic writes (files and folders), JSON-lines reading with line-numbered
errors, and content hashes for cache keys.

Every output file of rag_lab goes through `atomic_write_bytes` (a folder: `atomic_dir`), so a
process killed mid-write leaves either the old output or the new one, never half of either.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

from rag_lab import paths
from rag_lab.paths import CACHE_KINDS, cache_dir, data_dir, results_dir, source_data_dir


class UserError(Exception):
    """An error that is the user's to fix: its message names the file and line, or the config key,
    and what to do. The CLI prints it as one line (the traceback with --debug)."""


class DataError(UserError, ValueError):
    """Bad input data; the message names the file and line (or record) at fault."""


TMP_MARK = "tmp-pid"  # temporaries are named .<target>.tmp-pid<pid>.<random>: whose they are is in the name


MADE_MARK = ".rag_lab_made"  # in every folder atomic_dir wrote: rag_lab may replace that folder, and no other


def _owned_areas() -> list[Path]:
    """Folders whose contents rag_lab writes and may replace without a mark (caches, run folders)."""
    results = results_dir()
    runs = [results / "runs", *(p / "runs" for p in results.iterdir() if p.is_dir())] if results.is_dir() else []
    return [paths.REPO_ROOT / "cache", *(cache_dir(k) for k in CACHE_KINDS), *runs]


def _protected() -> list[Path]:
    """Folders never replaced, nor any of their parents: the repository, its top-level folders and
    cache folders, the data, results and source folders, the home folder, the cache roots."""
    root = paths.REPO_ROOT
    tops = [p for p in root.iterdir() if p.is_dir() and p.name != "cache"] if root.is_dir() else []
    kinds = [p for p in (root / "cache").iterdir() if p.is_dir()] if (root / "cache").is_dir() else []  # cache/models, ...
    return [root, *tops, *kinds, data_dir(), results_dir(), source_data_dir(), Path.home(), *_owned_areas()]


def check_not_protected(target: Path, key: str = "") -> Path:
    """`target` resolved; UserError if it is, or holds, a folder never to be replaced (`_protected`):
    the repository or a parent of it, one of its top-level folders, the data, results or source
    folder, the home folder, a cache root. `key` (a config key) starts the message when given."""
    name = f"{key} = {target}" if key else str(target)
    given = Path(target).expanduser()
    if given.is_symlink():
        raise UserError(f"{name}: is a symbolic link; refusing to write an output there (choose another folder)")
    resolved = given.resolve()
    for guarded in _protected():
        g = guarded.expanduser().resolve()
        if resolved == g or g.is_relative_to(resolved):
            raise UserError(f"{name}: refusing to write an output there: it is or holds {g} "
                            "(choose a folder of its own, e.g. under cache/)")
    return resolved


def check_replaceable(target: Path, key: str = "") -> None:
    """Refuse (UserError), before anything is touched, to replace a folder rag_lab did not create.

    Replaceable: a path that does not exist yet; a folder with MADE_MARK; a folder inside rag_lab's
    caches or run folders (written before the mark existed). Never a protected folder
    (`check_not_protected`)."""
    name = f"{key} = {target}" if key else str(target)
    resolved = check_not_protected(target, key)
    if not resolved.exists():
        return
    if not resolved.is_dir():
        raise UserError(f"{name}: exists and is not a folder rag_lab made; refusing to replace it (choose another output)")
    if (resolved / MADE_MARK).is_file():
        return
    if any(resolved.is_relative_to(a.expanduser().resolve()) for a in _owned_areas()):
        return
    raise UserError(f"{name}: the folder exists and rag_lab did not create it (no {MADE_MARK}); refusing to replace it "
                    "(choose a new output folder, or delete this one yourself)")
_TMP = re.compile(r"^\..+\." + TMP_MARK + r"(\d+)\.")


def clean_orphans(root: Path) -> list[Path]:
    """Delete the temporaries under `root` that a killed process left (its pid is no longer alive);
    those of live processes (a concurrent run) are left alone. Returns what was deleted."""
    removed = []
    # os.walk, not rglob: another process may replace or delete a folder while this one walks (it is skipped)
    for folder, dirs, files in os.walk(root, onerror=lambda error: None):
        for name in sorted([*dirs, *files]):
            match = _TMP.match(name) if name.startswith(".") and TMP_MARK in name else None
            path = Path(folder) / name
            if match and not _alive(int(match.group(1))) and path.exists():
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
        dirs[:] = [d for d in dirs if (Path(folder) / d).exists()]  # a removed temporary is not walked into
    return sorted(removed)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{TMP_MARK}{os.getpid()}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be read by others
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target` in one rename.

    `target` must be replaceable (`check_replaceable`: checked before anything is written); the new
    folder carries MADE_MARK, so rag_lab may replace it again later."""
    target = Path(target)
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{TMP_MARK}{os.getpid()}."))
    try:
        yield tmp
        (tmp / MADE_MARK).write_text("made by rag_lab: it may replace this folder\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def jsonl_bytes(rows: Iterable[dict[str, Any]], compress: bool = False) -> bytes:
    """Serialise rows as JSON lines; gzip output is byte-reproducible (mtime 0, no name)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    if not compress:
        return text
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
        gz.write(text)
    return buf.getvalue()


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Atomically write JSON lines; a `.gz` suffix means gzip."""
    atomic_write_bytes(path, jsonl_bytes(rows, compress=str(path).endswith(".gz")))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; malformed lines raise DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        for lineno, line in text_lines(f, path):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


# ---------------------------------------------------------------- caches that check themselves

MANIFEST = "rag_lab_manifest.json"  # {relative file: [size, sha256]} of a cache folder, written last
VERIFIED = ".rag_lab_verified.json"  # size/mtime stamps that earlier versions trusted between processes: ignored now


class CacheRepaired(UserWarning):
    """A damaged cache entry was found, reported, deleted and is being rebuilt (never used)."""


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_checked(path: str | Path, data: bytes) -> None:
    """A cache file: written atomically, then its sha256 beside it (`<name>.sha256`); a file
    without its checksum (killed in between) counts as damaged."""
    path = Path(path)
    atomic_write_bytes(path, data)
    atomic_write_text(checksum_path(path), hashlib.sha256(data).hexdigest() + "\n")


def read_checked(path: str | Path) -> bytes | None:
    """The bytes of a cache file written by `write_checked`; None when there is none, and None
    (after a CacheRepaired warning and deleting it) when it is damaged: the caller rebuilds it."""
    path = Path(path)
    if not path.exists():
        return None
    data, side = path.read_bytes(), checksum_path(path)
    recorded = side.read_text(encoding="utf-8").strip() if side.exists() else None
    if recorded != hashlib.sha256(data).hexdigest():
        discard(path, "no checksum" if recorded is None else "checksum mismatch")
        return None
    return data


def discard(path: Path, why: str) -> None:
    """Report a damaged cache entry and delete it (file, its checksum, or folder)."""
    warnings.warn(f"{path}: damaged cache ({why}): deleted, rebuilding it", CacheRepaired, stacklevel=3)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
        checksum_path(path).unlink(missing_ok=True)


def write_manifest(folder: Path) -> None:
    """Record the size and sha256 of every file in a cache folder (call it last, inside `atomic_dir`)."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name not in (MANIFEST, VERIFIED, MADE_MARK))
    manifest = {f.relative_to(folder).as_posix(): [f.stat().st_size, sha256_file(f)] for f in files}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def folder_is_intact(folder: Path) -> bool:
    """True if every file of `folder`'s manifest is there with its size and sha256, and nothing else
    was added; otherwise the folder is reported and deleted (False: rebuild it). No folder: False."""
    if not folder.exists():
        return False
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        discard(folder, f"no readable {MANIFEST}")
        return False
    files = {f.relative_to(folder).as_posix(): f for f in folder.rglob("*") if f.is_file() and f.name not in (MANIFEST, VERIFIED, MADE_MARK)}
    if set(files) != set(manifest):
        discard(folder, f"files differ from {MANIFEST}")
        return False
    for name, (size, digest) in manifest.items():
        if files[name].stat().st_size != size or sha256_file(files[name]) != digest:
            discard(folder, f"{name} differs from {MANIFEST}")
            return False
    return True


_CHECKED_IN_FULL: dict[str, dict[str, list[int]]] = {}  # folder -> its files' [size, mtime_ns] when this process hashed them


def verified_folder(folder: Path) -> bool:
    """`folder_is_intact` for large folders (model weights, indexes, embeddings), at a cost paid once a
    process: the first use of a folder in each process hashes every file in full against the manifest
    (a body zeroed with its size and mtime restored is caught by the next process); later uses in the
    same process re-hash only when a file's size or mtime changed since. False (folder deleted) when
    it fails."""
    key = str(Path(folder).resolve())
    known = _CHECKED_IN_FULL.get(key)
    if known is not None and known == _stamps(folder, known):
        return True
    _CHECKED_IN_FULL.pop(key, None)
    if not folder_is_intact(folder):
        return False
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    _CHECKED_IN_FULL[key] = _stamps(folder, [*manifest, MANIFEST])  # the manifest's own stamp too
    return True


def verified_digests(folder: Path) -> dict[str, str] | None:
    """{file: sha256} of a folder this process has verified in full (`verified_folder`) and that has not
    changed since; None otherwise."""
    known = _CHECKED_IN_FULL.get(str(Path(folder).resolve()))
    if known is None or known != _stamps(folder, known):
        return None
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    return {name: entry[1] for name, entry in manifest.items()}


def forget_verified() -> None:
    """Forget which folders this process has hashed in full: the next use hashes them again, as a new
    process would (tests; a long-lived process that wants a fresh check)."""
    _CHECKED_IN_FULL.clear()


def _stamps(folder: Path, names) -> dict[str, list[int]] | None:
    try:
        return {n: [(folder / n).stat().st_size, (folder / n).stat().st_mtime_ns] for n in names}
    except OSError:
        return None


def stable_hash(obj) -> str:
    """sha256 of a JSON-serialisable object with sorted keys (a cache key)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def text_lines(f, path: Path) -> Iterator[tuple[int, str]]:
    """Numbered, decoded lines of a binary file; a truncated or corrupt gzip stream, or bytes that
    are not UTF-8, are a DataError naming the file (and the line)."""
    lineno = 0
    try:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: the gzip stream is damaged after line {lineno} ({e}): re-download or rebuild the file") from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
