"""End-to-end RAG: the retriever's query encoder trained through the reader, from question-answer pairs alone.

For each question x the current query encoder q(x) searches the fixed passage index for its top-k
passages z; their scores s(x, z) = q(x) . e(z) (cosine: both normalised) with gradient through q give

    p_eta(z|x) = softmax_k( s(x, z) / temperature )

and the reader scores the answer y with each passage alone, log p_theta(y|x,z). The objectives:

    rag_sequence_loss   -log sum_z p_eta(z|x) p_theta(y|x,z)                     (Lewis et al. 2020)
    rag_token_loss      -sum_t log sum_z p_eta(z|x) p_theta(y_t|x,z,y_<t)         (Lewis et al. 2020)
    perplexity_distillation_loss  KL(p_target || p_eta), p_target ∝ exp(log p_theta(y|x,z) / tau),
                        the reader's scores detached; the reader trains on its usual loss (question +
                        the k passages concatenated -> answer)                  (Izacard et al. 2022, Atlas)

No gold passage is used: the retriever learns which passages help the reader produce the answer.
The passage encoder and the index stay fixed (as in the RAG paper) unless `refresh_every` re-encodes
the corpus with the current query encoder every N steps (an Atlas-style refresh; passage side tied
to the query side), cached by the encoder's weights under `cache_dir` so a resumed run reuses it.

Built on the Hugging Face Trainer, like the other trainers: the same checkpoints, exact resume,
`accelerate launch` / `torchrun` for several processes. The trainer takes data (questions and a
`PassageIndex`), never the experiment config: the runner builds the index (`pipeline.dense_index`).

    index = pipeline.dense_index(cfg.retriever, passages)
    info = train_joint(split, index, settings, cfg.generator, cfg.retriever.k, cfg.retriever.temperature, out, record)
    # -> out/final (the reader, loadable by path) and out/final/query_encoder (a sentence-transformers folder)
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
import torch
from transformers import EarlyStoppingCallback, TrainerCallback

from rag_lab.config import GeneratorConfig
from rag_lab.data.records import Passage, QAExample, passage_text
from rag_lab.generators import prompt_builder
from rag_lab.generators.fusion import answer_logprobs, marginal_logprob
from rag_lab.io import read_checked, write_checked, write_json
from rag_lab.models import load_causal_lm, load_seq2seq_lm, load_sentence_encoder
from rag_lab.training.common import (CONFIG_FILE, FINAL, ListDataset, ModuleTrainer, Split, StopOnNonFiniteLoss, TrainingError,
                                     TrainSettings, finish_checkpoints, resume_point, save_trained, timed_train, training_arguments)

QUERY_ENCODER = "query_encoder"  # the subfolder of a final model that holds the trained query encoder
OBJECTIVES = ("rag_sequence", "rag_token", "pdist")
REFRESH_FILE = "rag_lab_refresh.json"  # step -> the embeddings file in use from that step (resume reads it)


# ---------------------------------------------------------------- the objectives (pure functions)

def rag_sequence_loss(doc_logits: torch.Tensor, token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RAG-Sequence: -log sum_z p_eta(z|x) prod_t p_theta(y_t|x,z,y_<t), per question.

    doc_logits [b, k] (scores / temperature), token_logp [b, k, m] (0 where masked), mask [b, m]. Returns [b]."""
    seq_logp = (token_logp * mask[:, None, :]).sum(-1)
    return -marginal_logprob(doc_logits, seq_logp)


def rag_token_loss(doc_logits: torch.Tensor, token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RAG-Token: -sum_t log sum_z p_eta(z|x) p_theta(y_t|x,z,y_<t), per question (shapes as rag_sequence_loss)."""
    per_token = torch.logsumexp(torch.log_softmax(doc_logits, -1)[..., None] + token_logp, dim=1)  # [b, m]
    return -(per_token * mask).sum(-1)


def perplexity_distillation_loss(doc_logits: torch.Tensor, seq_logp: torch.Tensor, target_temperature: float = 1.0) -> torch.Tensor:
    """Atlas perplexity distillation: KL(p_target || p_eta) per question, with
    p_target(z) = softmax_z(log p_theta(y|x,z) / target_temperature) computed from detached reader scores.

    doc_logits [b, k], seq_logp [b, k]. Returns [b]; the gradient reaches only the retriever."""
    target = torch.log_softmax(seq_logp.detach() / target_temperature, -1)
    return (target.exp() * (target - torch.log_softmax(doc_logits, -1))).sum(-1)


def passage_entropy(doc_logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of p_eta(.|x) per question: log k when uniform, 0 when one passage takes all."""
    logp = torch.log_softmax(doc_logits.detach().float(), -1)
    return -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------- the index and the model

@dataclass
class PassageIndex:
    """What the joint trainer searches: the corpus, its fixed normalised embeddings [n, d] (float32),
    a FAISS inner-product index over them, and the encoder the query side starts from."""

    passages: list[Passage]
    embeddings: np.ndarray
    index: faiss.Index
    encoder: str
    query_prefix: str = ""
    passage_prefix: str = ""
    max_length: int = 256


class JointRAG(torch.nn.Module):
    """The reader and the query encoder as one module, so the Trainer optimises, checkpoints and
    restores both. `forward(examples)` returns {"loss"} for a batch of questions."""

    def __init__(self, reader, tokenizer, builder, query_encoder, index: PassageIndex, objective: str, k: int,
                 temperature: float, target_temperature: float = 1.0, decoder_only: bool = True):
        super().__init__()
        if objective not in OBJECTIVES:
            raise TrainingError(f"training.objective {objective!r}: end-to-end objectives are {', '.join(OBJECTIVES)}")
        if k > len(index.passages):
            raise TrainingError(f"retriever.k = {k} but the corpus holds {len(index.passages)} passages")
        self.reader, self.query_encoder = reader, query_encoder
        self.tokenizer, self.builder, self.index = tokenizer, builder, index
        self.objective, self.k, self.temperature, self.target_temperature = objective, k, temperature, target_temperature
        self.decoder_only = decoder_only
        self.stats: list[float] = []  # passage-weight entropy of each question since the last log

    def encode_queries(self, questions: Sequence[QAExample]) -> torch.Tensor:
        """Normalised query embeddings [b, d], with gradient through the query encoder."""
        texts = [self.index.query_prefix + q.question for q in questions]
        encoder = self.query_encoder  # sentence-transformers 6 renamed `tokenize` to `preprocess`
        features = encoder.preprocess(texts) if hasattr(encoder, "preprocess") else encoder.tokenize(texts)
        device = next(encoder.parameters()).device
        out = encoder({k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()})["sentence_embedding"]
        return torch.nn.functional.normalize(out, dim=-1)

    def doc_scores(self, questions: Sequence[QAExample]) -> tuple[torch.Tensor, np.ndarray]:
        """(scores [b, k] with gradient through the query side, passage rows [b, k]) of the top-k."""
        q = self.encode_queries(questions)
        _, rows = self.index.index.search(np.ascontiguousarray(q.detach().float().cpu().numpy()), self.k)
        if (rows < 0).any():
            raise TrainingError(f"the index returned fewer than k = {self.k} passages")
        emb = torch.from_numpy(self.index.embeddings[rows]).to(q.device, q.dtype)  # [b, k, d], fixed
        return torch.einsum("bd,bkd->bk", q, emb), rows

    def answer_scores(self, questions: Sequence[QAExample], rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """log p_theta(y_t | x, z, y_<t) for every question's k passages: ([b, k, m], mask [b, m])."""
        prompts = [self.builder.rag(q, [self.index.passages[j]]).text for q, row in zip(questions, rows) for j in row]
        answers = [q.answers[0] for q in questions for _ in range(self.k)]
        logp, mask = answer_logprobs(self.reader, self.tokenizer, prompts, answers, not self.builder.use_chat, self.decoder_only)
        b = len(questions)
        return logp.view(b, self.k, -1), mask.view(b, self.k, -1)[:, 0]

    def forward(self, examples: Sequence[QAExample], rows: torch.Tensor | None = None, **kwargs) -> dict:
        scores, top = self.doc_scores(examples)
        doc_logits = scores / self.temperature
        self.stats += passage_entropy(doc_logits).tolist()
        if self.objective == "pdist":
            with torch.no_grad():
                logp, mask = self.answer_scores(examples, top)
            kl = perplexity_distillation_loss(doc_logits, (logp * mask[:, None]).sum(-1), self.target_temperature)
            prompts = [self.builder.rag(q, [self.index.passages[j] for j in row]).text for q, row in zip(examples, top)]
            reader_logp, reader_mask = answer_logprobs(self.reader, self.tokenizer, prompts, [q.answers[0] for q in examples],
                                                       not self.builder.use_chat, self.decoder_only)
            nll = -(reader_logp * reader_mask).sum(-1)
            return {"loss": (nll + kl).mean()}
        logp, mask = self.answer_scores(examples, top)
        loss = rag_sequence_loss(doc_logits, logp, mask) if self.objective == "rag_sequence" else rag_token_loss(doc_logits, logp, mask)
        return {"loss": loss.mean()}


def question_collate(batch: list[dict]) -> dict:
    """Questions stay objects; `rows` (a tensor) tells the Trainer the batch size."""
    return {"rows": torch.tensor([b["row"] for b in batch]), "examples": [b["example"] for b in batch]}


class JointTrainer(ModuleTrainer):
    """The Trainer with two learning rates (reader, query encoder), the loss of `JointRAG.forward`,
    and the mean passage-weight entropy in every log."""

    def __init__(self, *args, query_learning_rate: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.query_learning_rate = query_learning_rate

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model
            decay = self.args.weight_decay
            groups = [{"params": [p for p in model.reader.parameters() if p.requires_grad], "lr": self.args.learning_rate},
                      {"params": [p for p in model.query_encoder.parameters() if p.requires_grad], "lr": self.query_learning_rate}]
            self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate, weight_decay=decay)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        return (out["loss"], out) if return_outputs else out["loss"]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = model(**inputs)["loss"]
        self.model.stats.clear()  # the entropy logged is the training batches'
        return loss.detach(), None, None

    def log(self, logs: dict, *args, **kwargs) -> None:
        stats = self.model.stats
        if stats and "loss" in logs:
            logs["passage_entropy"] = round(float(np.mean(stats)), 4)
            stats.clear()
        super().log(logs, *args, **kwargs)


class RefreshIndex(TrainerCallback):
    """Every `every` steps: re-encode the corpus with the current query encoder and swap in a new
    Flat index. Embeddings are cached by a hash of the encoder's weights under `cache`, and the
    file in use from each step is recorded in `output_dir`, so a resumed run searches the same index."""

    def __init__(self, model: JointRAG, every: int, cache: Path, output_dir: Path, batch_size: int = 64):
        self.model, self.every, self.cache, self.output_dir, self.batch_size = model, every, Path(cache), output_dir, batch_size
        self.cache.mkdir(parents=True, exist_ok=True)

    def _log(self) -> dict:
        path = self.output_dir / REFRESH_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    def on_train_begin(self, args, state, control, **kwargs):
        done = {int(s): f for s, f in self._log().items() if int(s) <= state.global_step}
        if done:  # a resumed run: the embeddings of the last refresh before the checkpoint
            self._use(self.cache / done[max(done)])

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            name = self._encode()
            write_json(self.output_dir / REFRESH_FILE, {**self._log(), str(state.global_step): name})

    def _encode(self) -> str:
        encoder = self.model.query_encoder
        digest = hashlib.sha256()
        for key, t in sorted(encoder.state_dict().items()):
            digest.update(key.encode())
            digest.update(t.detach().cpu().numpy().tobytes())
        name = f"emb-refresh-{digest.hexdigest()[:16]}.npy"
        if read_checked(self.cache / name) is None:
            was = encoder.training
            encoder.eval()
            texts = [self.model.index.passage_prefix + passage_text(p) for p in self.model.index.passages]
            vecs = encoder.encode(texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True)
            encoder.train(was)
            buf = _npy_bytes(np.ascontiguousarray(vecs, dtype=np.float32))
            write_checked(self.cache / name, buf)
        self._use(self.cache / name)
        return name

    def _use(self, path: Path) -> None:
        vecs = np.load(io.BytesIO(read_checked(path)), allow_pickle=False)
        index = faiss.IndexFlatIP(vecs.shape[1])
        index.add(vecs)
        self.model.index.embeddings, self.model.index.index = vecs, index


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


# ---------------------------------------------------------------- from questions and an index

def load_joint_model(generator: GeneratorConfig, index: PassageIndex, objective: str, k: int, temperature: float,
                     target_temperature: float) -> JointRAG:
    """The reader of `generator.model` and the query encoder `index.encoder`, in training mode."""
    if generator.kind not in ("decoder", "seq2seq"):
        raise TrainingError(f"generator.kind {generator.kind!r}: end-to-end training needs a generative reader (decoder or seq2seq)")
    if generator.n_few_shot:
        raise TrainingError("fine-tuned regimes train and evaluate without demonstrations: set generator.n_few_shot: 0")
    decoder_only = generator.kind == "decoder"
    reader, tokenizer = (load_causal_lm if decoder_only else load_seq2seq_lm)(generator.model)
    if decoder_only and generator.use_chat_template and getattr(tokenizer, "chat_template", None) is None:
        raise TrainingError(f"generator.use_chat_template is true but {generator.model} has no chat template: the prompts "
                            "would silently fall back to plain text; set generator.use_chat_template: false")
    builder = prompt_builder(generator, tokenizer)  # plain text for a seq2seq reader
    encoder = load_sentence_encoder(index.encoder)
    encoder.max_seq_length = index.max_length
    return JointRAG(reader, tokenizer, builder, encoder, index, objective, k, temperature, target_temperature, decoder_only)


def fit_joint(model: JointRAG, train: Sequence[QAExample], dev: Sequence[QAExample], output_dir: Path, settings: TrainSettings,
              record: dict, query_learning_rate: float, refresh_every: int = 0, refresh_cache: Path | None = None) -> dict:
    """Train `model` on question -> first answer; the best checkpoint by dev loss (the objective on the
    dev questions) is left in `model`. Resumes from the last checkpoint in `output_dir` whose record matches."""
    if settings.method != "full":
        raise TrainingError("end-to-end training supports training.method: full (LoRA on the reader is not wired in yet)")
    if refresh_every and refresh_cache is None:
        raise TrainingError("training.refresh_every re-encodes the corpus into a cache: it needs a cache directory")
    output_dir = Path(output_dir)
    record, resume = resume_point(output_dir, settings, record)
    args = training_arguments(settings, output_dir, len(dev), dev_em=False)
    args.train_sampling_strategy = "random"  # batches of questions: no token lengths to group by
    callbacks: list = [StopOnNonFiniteLoss()]
    if dev:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=settings.patience))
    if refresh_every:
        callbacks.append(RefreshIndex(model, refresh_every, refresh_cache, output_dir))
    trainer = JointTrainer(model=model, args=args, train_dataset=ListDataset([{"row": i, "example": q} for i, q in enumerate(train)]),
                           eval_dataset=ListDataset([{"row": i, "example": q} for i, q in enumerate(dev)]) if dev else None,
                           data_collator=question_collate, callbacks=callbacks, query_learning_rate=query_learning_rate)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / CONFIG_FILE, record)
    result, cost = timed_train(trainer, resume)
    return {**cost, "train_loss": result.training_loss, "global_step": trainer.state.global_step,
            "log_history": trainer.state.log_history, "best_checkpoint": trainer.state.best_model_checkpoint}


def save_joint_model(model: JointRAG, path: Path, info: dict) -> Path:
    """The reader (loadable by path, as any fine-tuned reader) with the query encoder in `query_encoder/`."""
    def write(tmp: Path) -> None:
        model.reader.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        model.query_encoder.save(str(tmp / QUERY_ENCODER))

    return save_trained(path, write, info)


def train_joint(examples: Split[QAExample], index: PassageIndex, settings: TrainSettings, generator: GeneratorConfig,
                k: int, temperature: float, output_dir: str | Path, record: dict, refresh_cache: Path | None = None) -> dict:
    """Train the reader and the query encoder end to end with `settings.objective` on the train questions
    (first gold answer), choosing the checkpoint by the objective on the dev questions; save to
    `output_dir/final` (+ `final/query_encoder`) with the training info, which is also returned.
    `record` is everything that changes the weights: a rerun with the same record resumes."""
    if settings.objective not in OBJECTIVES:
        raise TrainingError(f"training.objective {settings.objective!r}: end-to-end objectives are {', '.join(OBJECTIVES)}")
    output_dir = Path(output_dir)
    torch.manual_seed(settings.seed)
    model = load_joint_model(generator, index, settings.objective, k, temperature, settings.target_temperature)
    report = fit_joint(model, examples.train, examples.dev, output_dir, settings, record, settings.query_learning_rate,
                       settings.refresh_every, refresh_cache)
    entropy = [{"step": h["step"], "passage_entropy": h["passage_entropy"]} for h in report["log_history"] if "passage_entropy" in h]
    info = {"record": record, "objective": settings.objective, "n_train": len(examples.train), "n_dev": len(examples.dev), "k": k,
            "temperature": temperature, "uniform_entropy": round(math.log(k), 4), "passage_entropy": entropy,
            "train_seconds": report["train_seconds"], "peak_rss_gb": report["peak_rss_gb"], "train_loss": report["train_loss"],
            "global_step": report["global_step"], "best_checkpoint": report["best_checkpoint"], "log_history": report["log_history"]}
    info = json.loads(json.dumps(info, default=str))
    save_joint_model(model, output_dir / FINAL, info)
    finish_checkpoints(output_dir, settings)
    return info
