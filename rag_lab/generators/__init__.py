"""Generators with one interface, resumable the same way whatever the engine:

    gen = build_generator(cfg.generator, train_examples)   # from a GeneratorConfig
    preds = gen.generate(questions)                         # closed-book
    preds = gen.generate(questions, contexts=passages)      # RAG: one passage list per question
    preds = gen.generate(questions, contexts, done=done, on_batch=log)   # resume: skip what `done` holds
    preds = gen.generate(questions, contexts, doc_logits=logits)  # RAG-Sequence / RAG-Token weigh passages by p_eta(z|x)

`done` maps example indices already answered to the records `on_batch(indices, records)` reported
for them (JSON values: the raw text for the decoders, the span for the extractive reader), so the
runner can log finished batches and restart a killed run where it stopped. Every generator also
has `token_counts(preds)` and `precision` for the timings table.
"""
from __future__ import annotations

from typing import Sequence

from rag_lab import models
from rag_lab.data.records import QAExample
from rag_lab.generators.ct2 import CT2DecoderGenerator, load_ct2_generator
from rag_lab.generators.extractive import ExtractiveReader
from rag_lab.generators.fid import FiDGenerator
from rag_lab.generators.fusion import RagSequenceGenerator, RagTokenGenerator, answer_logprobs, marginal_logprob
from rag_lab.generators.hf import DecoderGenerator, HFGenerator, Seq2SeqGenerator, length_sorted_batches
from rag_lab.generators.postprocess import clean_answer
from rag_lab.generators.prompts import Prompt, PromptBuilder, sample_demonstrations
from rag_lab.generators.vllm_engine import VLLMGenerator, load_vllm_engine


def prompt_builder(cfg, tokenizer, demonstrations: Sequence[QAExample] = ()) -> PromptBuilder:
    """The prompts of a `GeneratorConfig` for one tokenizer (generation and training share it). The chat
    decision is made here, once: a chat template for a decoder whose tokenizer has one (when
    `use_chat_template`), plain text for an encoder-decoder (FiD, seq2seq RAG) whatever its tokenizer holds."""
    use_chat = cfg.use_chat_template and cfg.kind == "decoder"
    return PromptBuilder(tokenizer, cfg.closed_book_template, cfg.rag_template, cfg.system_prompt, demonstrations,
                         use_chat, cfg.max_input_tokens, cfg.max_context_tokens)


# --- one builder per way of reading: the registry build_generator looks up -----------------------------
# Each takes (cfg, the resolved local model path, demonstrations, seed) and returns a generator. The
# config has already refused the combinations that do not exist (GeneratorConfig.__post_init__), so
# no builder checks them again.

HF_LOADERS = {"decoder": (models.load_causal_lm, DecoderGenerator), "seq2seq": (models.load_seq2seq_lm, Seq2SeqGenerator)}


def _common(cfg) -> dict:
    return dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, strip_prefixes=cfg.strip_prefixes)


def _extractive(cfg, path, demonstrations, seed):
    return ExtractiveReader(str(path), batch_size=cfg.batch_size)


def _transformers(cfg, path, demonstrations, seed):
    load, cls = HF_LOADERS[cfg.kind]
    model, tokenizer = load(path)
    return cls(model, tokenizer, prompt_builder(cfg, tokenizer, demonstrations), **_common(cfg))


def _ctranslate2(cfg, path, demonstrations, seed):
    model, compute_type = load_ct2_generator(path, cfg.ct2_compute_type)  # converted once and cached
    tokenizer = models.load_tokenizer(str(path), padding_side="left")
    return CT2DecoderGenerator(model, tokenizer, prompt_builder(cfg, tokenizer, demonstrations), compute_type=compute_type,
                               **_common(cfg))


def _vllm(cfg, path, demonstrations, seed):
    model = load_vllm_engine(path, cfg.vllm_tensor_parallel, cfg.vllm_dtype, seed)
    tokenizer = models.load_tokenizer(str(path), padding_side="left")
    return VLLMGenerator(model, tokenizer, prompt_builder(cfg, tokenizer, demonstrations), **_common(cfg))


def _fid(cfg, path, demonstrations, seed):
    model, tokenizer = models.load_seq2seq_lm(path)
    return FiDGenerator(model, tokenizer, prompt_builder(cfg, tokenizer, demonstrations), **_common(cfg))


def _rag_sequence(cfg, path, demonstrations, seed):
    model, tokenizer = HF_LOADERS[cfg.kind][0](path)
    return RagSequenceGenerator(model, tokenizer, prompt_builder(cfg, tokenizer, demonstrations), decoding=cfg.rag_sequence_decoding,
                                decoder_only=cfg.kind == "decoder", **_common(cfg))


def _rag_token(cfg, path, demonstrations, seed):
    model, tokenizer = HF_LOADERS[cfg.kind][0](path)
    return RagTokenGenerator(model, tokenizer, prompt_builder(cfg, tokenizer, demonstrations), decoder_only=cfg.kind == "decoder",
                             **_common(cfg))


# keyed by `generator_route(cfg)`
BUILDERS = {"extractive": _extractive, "transformers": _transformers, "ctranslate2": _ctranslate2, "vllm": _vllm,
            "fid": _fid, "rag_sequence": _rag_sequence, "rag_token": _rag_token}


def generator_route(cfg) -> str:
    """Which builder reads this config: the extractive reader; else a reader that weighs passages
    (generator.combine, on transformers); else the engine of a one-prompt reader (generator.backend)."""
    if cfg.kind == "extractive":
        return "extractive"
    return cfg.combine if cfg.combine != "concat" else cfg.backend


def build_generator(cfg, train: Sequence[QAExample] = (), seed: int = 0, model_path=None):
    """A generator from a `GeneratorConfig`; demonstrations are drawn from `train` with `seed`.
    `model_path` (a fine-tuned checkpoint, or `cfg.model` already resolved) replaces `cfg.model`.
    The model is resolved here once; every loader gets the local path."""
    path = models.resolve_model(str(model_path or cfg.model))
    return BUILDERS[generator_route(cfg)](cfg, path, sample_demonstrations(train, cfg.n_few_shot, seed), seed)


__all__ = ["CT2DecoderGenerator", "DecoderGenerator", "ExtractiveReader", "FiDGenerator", "RagSequenceGenerator", "RagTokenGenerator",
           "Seq2SeqGenerator", "BUILDERS", "generator_route", "answer_logprobs", "marginal_logprob", "HFGenerator", "Prompt", "PromptBuilder", "build_generator", "prompt_builder",
           "clean_answer", "length_sorted_batches", "sample_demonstrations", "VLLMGenerator", "load_vllm_engine"]
