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


def build_generator(cfg, train: Sequence[QAExample] = (), seed: int = 0, model_path: str | None = None):
    """A generator from a `GeneratorConfig`; demonstrations are drawn from `train` with `seed`.
    `model_path` (a fine-tuned checkpoint) replaces `cfg.model`."""
    name = model_path or cfg.model
    if cfg.kind == "extractive":
        return ExtractiveReader(name, batch_size=cfg.batch_size)
    loaders = {"decoder": (models.load_causal_lm, DecoderGenerator), "seq2seq": (models.load_seq2seq_lm, Seq2SeqGenerator)}
    if cfg.kind not in loaders:
        raise ValueError(f"generator.kind {cfg.kind!r}: kinds are {', '.join([*loaders, 'extractive'])}")
    load, cls = loaders[cfg.kind]
    extra = {}
    if cfg.combine != "concat":  # the config checks these at load; a config built in code is checked here
        if cfg.backend != "transformers":
            raise ValueError(f"generator.combine {cfg.combine!r} needs generator.backend: transformers (it scores passages one by one)")
        if cfg.combine == "fid" and cfg.kind != "seq2seq":
            raise ValueError("generator.combine 'fid' needs an encoder-decoder reader (generator.kind: seq2seq)")
        model, tokenizer = load(name)
        builder = prompt_builder(cfg, tokenizer, sample_demonstrations(train, cfg.n_few_shot, seed))
        common = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, strip_prefixes=cfg.strip_prefixes)
        if cfg.combine == "fid":
            return FiDGenerator(model, tokenizer, builder, **common)
        decoder_only = cfg.kind == "decoder"
        if cfg.combine == "rag_sequence":
            return RagSequenceGenerator(model, tokenizer, builder, decoding=cfg.rag_sequence_decoding, decoder_only=decoder_only, **common)
        return RagTokenGenerator(model, tokenizer, builder, decoder_only=decoder_only, **common)
    if cfg.backend == "ctranslate2":
        path = models.resolve_model(name)
        model, extra["compute_type"] = load_ct2_generator(path, cfg.ct2_compute_type)  # converted once and cached
        tokenizer, cls = models.load_tokenizer(str(path), padding_side="left"), CT2DecoderGenerator
    elif cfg.backend == "vllm":
        path = models.resolve_model(name)
        model = load_vllm_engine(path, cfg.vllm_tensor_parallel, cfg.vllm_dtype, seed)
        tokenizer, cls = models.load_tokenizer(str(path), padding_side="left"), VLLMGenerator
    else:
        model, tokenizer = load(name)
    builder = prompt_builder(cfg, tokenizer, sample_demonstrations(train, cfg.n_few_shot, seed))
    return cls(model, tokenizer, builder, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
               strip_prefixes=cfg.strip_prefixes, **extra)


__all__ = ["CT2DecoderGenerator", "DecoderGenerator", "ExtractiveReader", "FiDGenerator", "RagSequenceGenerator", "RagTokenGenerator",
           "Seq2SeqGenerator", "answer_logprobs", "marginal_logprob", "HFGenerator", "Prompt", "PromptBuilder", "build_generator", "prompt_builder",
           "clean_answer", "length_sorted_batches", "sample_demonstrations", "VLLMGenerator", "load_vllm_engine"]
