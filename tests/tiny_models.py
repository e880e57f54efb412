"""Tiny random models and a word-level tokenizer, built offline in milliseconds.

For tests that need "a transformers checkpoint on disk" without a hub or a real model:

    from tiny_models import make_tiny_causal_lm, make_tiny_seq2seq, make_tiny_tokenizer
    model, tokenizer = make_tiny_causal_lm(tmp_path)   # also saved to tmp_path

(tests/ has no __init__.py, so pytest's default import mode puts tests/ on sys.path.)
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2
WORDS = (
    "the a of in is was who what when where which capital city country france paris germany berlin "
    "question answer passage context river mountain born year president king queen"
).split()


def make_tiny_tokenizer(with_pad: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over WORDS (others map to <unk>); no files needed.

    with_pad=False leaves the pad token unset, as many decoder-only tokenizers do.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"eos_token": "</s>", "unk_token": "<unk>"}
    if with_pad:
        special["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def make_tiny_causal_lm(path: str | Path | None = None, seed: int = 0, with_pad: bool = True):
    """A 2-layer random Llama and its tokenizer; saved (safetensors) to `path` if given."""
    tokenizer = make_tiny_tokenizer(with_pad=with_pad)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    _save(model, tokenizer, path)
    return model, tokenizer


def make_tiny_seq2seq(path: str | Path | None = None, seed: int = 0):
    """A 2+2-layer random T5 and its tokenizer; saved (safetensors) to `path` if given."""
    tokenizer = make_tiny_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,  # T5's convention
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config).eval()
    _save(model, tokenizer, path)
    return model, tokenizer


def _save(model, tokenizer, path: str | Path | None) -> None:
    if path is not None:
        model.save_pretrained(str(path))  # safetensors is the default
        tokenizer.save_pretrained(str(path))


def make_tiny_encoder(path, texts):
    """A random 2-layer BERT + word-level tokenizer over `texts`, saved as a transformers checkpoint."""
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + words)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                        model_max_length=64)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path
