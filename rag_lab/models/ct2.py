"""CTranslate2 conversions of a local checkpoint (int8 readers and encoders), cached by content and verified
like every cache folder."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

from filelock import FileLock

from rag_lab.io import atomic_dir, stable_hash, UserError, verified_folder, write_manifest
from rag_lab.models.load import model_fingerprint
from rag_lab.paths import cache_dir


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
