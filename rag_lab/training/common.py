"""What every trainer shares: the settings, the train/dev split, datasets and collation, dev EM and
checkpoint selection, resume, the Trainer's arguments, and the one guarded way to save a model.

Each trainer (generator, fid, reader, joint, retriever) builds its own Trainer and data, then ends in
`fit_and_save` (or `save_trained`): the model is saved by the main process alone under DDP
(`accelerate launch` / `torchrun`), atomically, with a manifest and how it was made.

    result = fit_and_save(trainer, resume, output_dir, settings, write=lambda tmp: model.save_pretrained(tmp),
                          info=lambda result, cost: {"record": record, **cost, "train_loss": result.training_loss})
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import json
import math
import random
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Sequence, TypeVar

import safetensors.torch
import torch
from accelerate import PartialState
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from rag_lab.config import TrainingConfig
from rag_lab.data.records import QAExample
from rag_lab.io import UserError, atomic_dir, discard, verified_folder, write_json, write_manifest
from rag_lab.metrics import score_predictions
from rag_lab.models import unreported

CONFIG_FILE = "rag_lab_config.json"  # the settings that made a checkpoint folder
TRAINING_FILE = "rag_lab_training.json"  # how a final model was made, written beside its weights
FINAL = "final"  # the subfolder of a training run's output folder that holds the chosen model
IGNORE = -100
T = TypeVar("T")


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (bad data, diverged loss, a resume with another config)."""


# how a run is carried out, not what it learns: changing them neither moves the checkpoint folder nor blocks a resume
RUNTIME_ONLY = ("gradient_checkpointing", "save_optimizer", "keep_checkpoints")


@dataclass
class TrainSettings(TrainingConfig):
    """What a trainer needs: the `training:` section of the config, plus the seed of this run and
    the decoding budget of its dev evaluations. Built from the config by `from_config` alone."""

    seed: int = 0
    max_new_tokens: int = 16

    @classmethod
    def from_config(cls, training: TrainingConfig, seed: int, max_new_tokens: int = 16) -> "TrainSettings":
        values = {f.name: getattr(training, f.name) for f in dataclasses.fields(TrainingConfig)}
        return cls(**values, seed=seed, max_new_tokens=max_new_tokens)


@dataclass(frozen=True)
class Split(Generic[T]):
    """Training items and the dev items held out from them (questions, or their contexts)."""

    train: list[T]
    dev: list[T]


def split_train_dev(train: list[QAExample], dev_size: int, n_train: int | None, seed: int) -> Split[QAExample]:
    """A seeded dev slice held out from train, and (optionally) the first n_train of the seeded
    shuffle of the rest; both kept in file order."""
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    dev, pool = order[:dev_size], order[dev_size:]
    if n_train is not None:
        pool = pool[:n_train]
    return Split([train[i] for i in sorted(pool)], [train[i] for i in sorted(dev)])


def finished(output_dir: Path, record: dict) -> dict | None:
    """The training info of a finished run in `output_dir` made with `record`, else None (train it)."""
    done = Path(output_dir) / FINAL / TRAINING_FILE
    if not done.exists():
        return None
    info = json.loads(done.read_text(encoding="utf-8"))
    if info.get("record") != json.loads(json.dumps(record)):
        return None
    return info if verified_folder(Path(output_dir) / FINAL) else None  # damaged weights: deleted, trained again


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def pad_collate(pad_id: int):
    """Right-pad ids with `pad_id`, labels with -100; attention mask 1 on real tokens."""
    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
    return collate


CHECKPOINT_RULE = ("the checkpoint with the highest dev EM; ties (common at small scale, where dev EM moves in steps "
                   "of 1/n_dev) go to the lower dev loss, then to the later step; without a dev EM callback, the lowest dev loss")


def selection_score(dev_em: float, dev_loss: float | None, step: int) -> float:
    """What picks the checkpoint (`CHECKPOINT_RULE`), as one number the Trainer maximises: dev EM, minus
    1e-6 x dev loss (below any EM step of a dev set under 10^5 questions), plus 1e-12 x step (a full tie
    goes to the later, longer-trained checkpoint; the Trainer keeps the earlier one on equal values)."""
    loss = 0.0 if dev_loss is None or not math.isfinite(dev_loss) else min(dev_loss, 100.0)
    return dev_em - 1e-6 * loss + 1e-12 * step


class DevEMCallback(TrainerCallback):
    """At each evaluation: greedy answers on the dev slice -> `eval_dev_em` (and F1) in the metrics,
    before the Trainer picks the best checkpoint and before early stopping looks."""

    def __init__(self, make_generator, dev: Sequence[QAExample], dev_contexts=None):
        self.make_generator, self.dev, self.dev_contexts = make_generator, list(dev), dev_contexts
        self.history: list[dict] = []

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        was_training = model.training
        model.eval()
        preds = self.make_generator(model).generate(self.dev, self.dev_contexts)
        model.train(was_training)
        scores = score_predictions([p["prediction"] for p in preds], [q.answers for q in self.dev])
        metrics["eval_dev_em"] = float(scores["em"].mean())
        metrics["eval_dev_f1"] = float(scores["f1"].mean())
        metrics["eval_dev_select"] = selection_score(metrics["eval_dev_em"], metrics.get("eval_loss"), state.global_step)
        self.history.append({"step": state.global_step, "dev_em": metrics["eval_dev_em"], "dev_f1": metrics["eval_dev_f1"],
                             "eval_loss": metrics.get("eval_loss"), "select": metrics["eval_dev_select"]})
        state.log_history.append({"step": state.global_step, "eval_dev_em": metrics["eval_dev_em"], "eval_dev_f1": metrics["eval_dev_f1"]})


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop with a clear error when the logged loss is NaN or inf. Logging comes before saving
    in the Trainer's step, so the last checkpoint on disk is the last good one."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise TrainingError(f"training loss became {loss} at step {state.global_step}; the last good checkpoint "
                                f"is kept in {args.output_dir} (lower the learning rate?)")


class ModuleTrainer(Trainer):
    """The Trainer for a model that is a plain `torch.nn.Module` around transformers models (the joint
    retriever + reader, the FiD wrapper): checkpoints hold its state dict as safetensors, with tied
    tensors (embeddings and LM head) cloned apart, which safetensors requires; resuming sets both
    from equal values."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        path = Path(output_dir or self.args.output_dir)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone().contiguous() for k, v in (state_dict or self.model.state_dict()).items()}
        safetensors.torch.save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def check_resume_config(output_dir: Path, record: dict) -> bool:
    """True if `output_dir` holds checkpoints made with `record`; error naming the differing keys otherwise."""
    path = output_dir / CONFIG_FILE
    if not path.exists():
        return False
    saved = json.loads(path.read_text(encoding="utf-8"))
    diff = sorted(k for k in saved.keys() | record.keys() if saved.get(k) != record.get(k))
    if diff:
        raise TrainingError(f"{output_dir} holds checkpoints from a different config; differing keys: {', '.join(diff)} "
                            "(use another output folder, or delete it to start over)")
    return True


def resume_point(output_dir: Path, settings: TrainSettings, record: dict | None) -> tuple[dict, str | None]:
    """The run's record as it reads back from disk (default: `settings` less the runtime-only keys)
    and the checkpoint to resume from: the last one when the record matches and checkpoints keep
    the optimizer state, else None (a differing record is an error naming the keys)."""
    record = record or {k: v for k, v in dataclasses.asdict(settings).items() if k not in RUNTIME_ONLY}
    record = json.loads(json.dumps(record))
    resume = check_resume_config(output_dir, record) and settings.save_optimizer and last_checkpoint(output_dir)
    return record, resume or None


def timed_train(trainer, resume: str | None) -> tuple[object, dict]:
    """`trainer.train(resume)` and what it cost: seconds, and the process's peak RSS so far (GB).
    Under torchrun, the process group the Trainer opened is closed at exit."""
    t0 = time.perf_counter()
    with tied_head_unreported(trainer.model):
        result = trainer.train(resume_from_checkpoint=resume)
    close_process_group_at_exit()
    return result, {"train_seconds": round(time.perf_counter() - t0, 1),
                    "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def tied_head_unreported(model):
    """Loading the best checkpoint back at the end, the Trainer says `lm_head.weight` is missing when the
    model ties its output layer to its input embeddings (SmolLM2 and Qwen2.5 do): the checkpoint stores the
    shared tensor once and loading it restores both. Only that line is dropped, and only for a tied model."""
    config = getattr(model, "config", None)
    tied = getattr(config, "tie_word_embeddings", False) or getattr(getattr(config, "text_config", None), "tie_word_embeddings", False)
    return (unreported("transformers.trainer", "missing keys in the checkpoint model loaded: ['lm_head.weight']") if tied
            else contextlib.nullcontext())


@functools.cache
def close_process_group_at_exit() -> None:
    """Under `torchrun` / `accelerate launch` the Trainer opens a torch.distributed process group. One still
    open when the interpreter exits can abort that rank (gloo: "terminate called without an active
    exception", 2 runs in 26 on this machine), so destroy it at exit. Once per process; no-op alone."""
    def close() -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(close)


def last_checkpoint(output_dir: Path) -> str | None:
    """The last complete checkpoint. The Trainer writes `trainer_state.json` last, so a folder without
    it was cut off by a kill mid-write: it is reported and deleted, and the one before it is used."""
    while output_dir.exists() and (last := get_last_checkpoint(str(output_dir))):
        if (Path(last) / "trainer_state.json").is_file():
            return last
        discard(Path(last), "a checkpoint cut off mid-write (no trainer_state.json)")
    return None


def training_arguments(settings: TrainSettings, output_dir: Path, n_dev: int, dev_em: bool) -> TrainingArguments:
    """Trainer arguments; with a dev set the best checkpoint is kept by `CHECKPOINT_RULE` (dev EM, ties to the
    lower dev loss and then the later step; dev loss alone without the EM callback)."""
    return TrainingArguments(
        output_dir=str(output_dir), seed=settings.seed, data_seed=settings.seed,
        learning_rate=settings.learning_rate, num_train_epochs=settings.epochs, weight_decay=settings.weight_decay,
        per_device_train_batch_size=settings.batch_size, per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum, lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        train_sampling_strategy="group_by_length" if settings.group_by_length else "random",
        eval_strategy="steps" if n_dev else "no", eval_steps=settings.eval_steps,
        save_strategy="steps", save_steps=settings.eval_steps, save_total_limit=2,
        save_only_model=not settings.save_optimizer, **_checkpointing_argument(settings.gradient_checkpointing),
        logging_steps=settings.eval_steps if settings.eval_steps < 10 else 10, logging_nan_inf_filter=False,
        load_best_model_at_end=bool(n_dev), metric_for_best_model=("dev_select" if dev_em else "loss") if n_dev else None,
        greater_is_better=dev_em,
        report_to=["tensorboard"] if settings.tensorboard else [], dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=False, remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every parameter gets a gradient (LoRA: frozen ones need none)
    )


def _checkpointing_argument(enabled: bool) -> dict:
    """transformers 5 renamed `gradient_checkpointing` to `activation_checkpointing` (the old name warns)."""
    fields = TrainingArguments.__dataclass_fields__
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": enabled}


def finish_checkpoints(output_dir: Path, settings: TrainingConfig) -> None:
    """After the final model is saved: `training.keep_checkpoints: false` deletes the checkpoint folders
    (the main process alone; the others wait). The final model never lives in one."""
    state = PartialState()
    if not settings.keep_checkpoints and state.is_main_process:
        for checkpoint in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
            shutil.rmtree(checkpoint)
    state.wait_for_everyone()


def save_trained(folder: str | Path, write: Callable[[Path], None], info: dict) -> Path:
    """The one way a trainer saves its model: on the main process alone (the other ranks wait for it),
    into `folder` atomically, with how it was made (TRAINING_FILE) and a manifest. `write(tmp)` writes
    the weights and whatever else loads them (tokenizer, query encoder)."""
    folder, state = Path(folder), PartialState()
    if state.is_main_process:
        with atomic_dir(folder) as tmp:
            write(tmp)
            write_json(tmp / TRAINING_FILE, info)
            write_manifest(tmp)
    state.wait_for_everyone()
    return folder


def save_model(model, tokenizer, path: str | Path, info: dict) -> Path:
    """Save a transformers model (safetensors) + tokenizer + how it was made, loadable by path."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return save_trained(path, write, info)


def fit_and_save(trainer, resume: str | None, output_dir: Path, settings: TrainingConfig,
                 write: Callable[[Path], None], info: Callable[[object, dict], dict]) -> dict:
    """A trainer's tail: train (from `resume`), then save the chosen model once to `output_dir/final`
    (`save_trained`), its info `info(train_output, cost)` made JSON-plain, the checkpoints kept or
    deleted (`training.keep_checkpoints`). Returns the info."""
    result, cost = timed_train(trainer, resume)
    report = json.loads(json.dumps(info(result, cost), default=str))
    save_trained(Path(output_dir) / FINAL, write, report)
    finish_checkpoints(output_dir, settings)
    return report
