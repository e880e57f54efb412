"""Generator fine-tuning: label masking, a step lowers the loss, resume == uninterrupted,
LoRA merge, bad inputs, and a 2-process run equal to a single-process one."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from rag_lab.training.common import IGNORE, TrainingError, TrainSettings, pad_collate
from rag_lab.training.generator import (answer_logits_collate, answer_logits_loss, apply_lora, build_sft_examples, fit_generator,
                                        keeps_logits_at_positions, padding_fraction)
from tiny_models import make_tiny_causal_lm

PROMPTS = ["question who was king answer", "question what is the capital of france answer",
           "question where is berlin answer", "question which river is in paris answer", "question when was the king born answer",
           "question who was the queen answer"]
ANSWERS = ["louis", "paris", "germany", "seine", "year", "marie"]


def settings(**kw):
    base = dict(learning_rate=5e-3, epochs=2, batch_size=2, eval_steps=2, group_by_length=False, warmup_ratio=0.0, seed=0)
    return TrainSettings(**{**base, **kw})


def mean_loss(model, examples):
    batch = pad_collate(0)(examples)
    with torch.no_grad():
        return model(**batch).loss.item()


def test_labels_mask_the_prompt_and_keep_the_answer():
    _, tok = make_tiny_causal_lm()
    examples, skipped = build_sft_examples(["question who was king answer"], ["louis"], tok)
    (ex,), eos = examples, tok.eos_token_id
    prompt_ids = tok("question who was king answer", add_special_tokens=False)["input_ids"]
    answer_ids = tok("louis", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == prompt_ids + answer_ids + [eos]
    assert ex["labels"] == [IGNORE] * len(prompt_ids) + answer_ids + [eos]
    assert skipped == 0
    batch = pad_collate(tok.pad_token_id)([ex, build_sft_examples(["question"], ["paris"], tok)[0][0]])
    assert batch["labels"][1].tolist()[3:] == [IGNORE] * (len(ex["input_ids"]) - 3)  # padding is never a target
    assert batch["attention_mask"][1].sum() == 3


def test_loss_covers_answer_tokens_only():
    model, tok = make_tiny_causal_lm()
    examples, _ = build_sft_examples(PROMPTS[:1], ANSWERS[:1], tok)
    batch = pad_collate(0)(examples)
    logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
    targets = batch["labels"][0, 1:]
    keep = targets != IGNORE
    by_hand = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert model(**batch).loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert keep.sum() == 2  # "louis" + EOS


def test_answer_logits_loss_equals_the_full_loss():
    """The trainer's LM head runs only at answer positions; the loss (mean, and normalised by a
    token count as under gradient accumulation) and its gradients equal the model's own on all positions."""
    model, tok = make_tiny_causal_lm()
    examples, _ = build_sft_examples(PROMPTS, ANSWERS, tok)
    full_batch = pad_collate(tok.pad_token_id)(examples)
    batch = answer_logits_collate(tok.pad_token_id)(examples)
    kept = batch["logits_to_keep"]
    assert 0 < len(kept) < full_batch["input_ids"].shape[1] - 1  # fewer positions than the model's own loss reads
    labels = batch.pop("labels")
    outputs = model(**batch)
    assert outputs.logits.shape[1] == len(kept)
    n = int((labels[:, 1:] != IGNORE).sum())
    for count in (None, torch.tensor(2 * n)):
        full = model(**full_batch, num_items_in_batch=count).loss
        assert answer_logits_loss(outputs, labels, count).item() == pytest.approx(full.item(), rel=1e-6)
    model.zero_grad()
    model(**full_batch).loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    answer_logits_loss(model(**batch), labels).backward()
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
    assert keeps_logits_at_positions(model)


def test_bad_training_inputs():
    _, tok = make_tiny_causal_lm()
    with pytest.raises(TrainingError, match="empty training set"):
        build_sft_examples([], [], tok)
    examples, skipped = build_sft_examples(PROMPTS[:3], ["louis", "   ", "germany"], tok)
    assert (len(examples), skipped) == (2, 1)
    with pytest.raises(TrainingError, match="all 2 answers tokenised to nothing"):
        build_sft_examples(PROMPTS[:2], ["", " "], tok)


def test_training_lowers_the_loss(tmp_path):
    model, tok = make_tiny_causal_lm()
    examples, _ = build_sft_examples(PROMPTS, ANSWERS, tok)
    before = mean_loss(model, examples)
    report = fit_generator(model, tok, examples, tmp_path / "out", settings(epochs=3))
    assert mean_loss(report["model"], examples) < before - 0.5
    assert report["global_step"] == 9


class InterruptAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    _, tok = make_tiny_causal_lm()
    examples, _ = build_sft_examples(PROMPTS, ANSWERS, tok)
    straight = fit_generator(make_tiny_causal_lm()[0], tok, examples, tmp_path / "a", settings())["model"]

    import rag_lab.training.generator as gen

    real_cls = gen.StopOnNonFiniteLoss
    monkeypatch.setattr(gen, "StopOnNonFiniteLoss", lambda: InterruptAt(5))  # dies after checkpoint-4
    with pytest.raises(KeyboardInterrupt):
        fit_generator(make_tiny_causal_lm()[0], tok, examples, tmp_path / "b", settings())
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    monkeypatch.setattr(gen, "StopOnNonFiniteLoss", real_cls)
    resumed = fit_generator(make_tiny_causal_lm()[0], tok, examples, tmp_path / "b", settings())["model"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)

    with pytest.raises(TrainingError, match="differing keys: learning_rate"):
        fit_generator(make_tiny_causal_lm()[0], tok, examples, tmp_path / "b", settings(learning_rate=1e-3))


def test_runtime_options_keep_the_weights(tmp_path, monkeypatch):
    """Gradient checkpointing and model-only checkpoints change how a run goes, not what it learns."""
    _, tok = make_tiny_causal_lm()
    examples, _ = build_sft_examples(PROMPTS, ANSWERS, tok)
    straight = fit_generator(make_tiny_causal_lm()[0], tok, examples, tmp_path / "a", settings())["model"]
    lean = settings(gradient_checkpointing=True, save_optimizer=False)

    import rag_lab.training.generator as gen

    real_cls = gen.StopOnNonFiniteLoss
    monkeypatch.setattr(gen, "StopOnNonFiniteLoss", lambda: InterruptAt(5))
    with pytest.raises(KeyboardInterrupt):
        fit_generator(make_tiny_causal_lm()[0], tok, examples, tmp_path / "b", lean)
    checkpoint = tmp_path / "b" / "checkpoint-4"
    assert (checkpoint / "model.safetensors").exists() and not (checkpoint / "optimizer.pt").exists()
    monkeypatch.setattr(gen, "StopOnNonFiniteLoss", real_cls)
    report = fit_generator(make_tiny_causal_lm()[0], tok, examples, tmp_path / "b", lean)  # starts over: no optimizer state
    assert report["global_step"] == 6
    for (name, a), b in zip(straight.state_dict().items(), report["model"].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


class PoisonAt(TrainerCallback):
    """Make the weights NaN after step `step`, as a diverging run would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model, tok = make_tiny_causal_lm()
    examples, _ = build_sft_examples(PROMPTS, ANSWERS, tok)
    import rag_lab.training.generator as gen

    real = gen.fit_generator.__globals__["StopOnNonFiniteLoss"]

    class Both(real):
        def __init__(self):
            self.poison = PoisonAt(3)

        def on_step_end(self, *a, **kw):
            return self.poison.on_step_end(*a, **kw)

    monkeypatch.setattr(gen, "StopOnNonFiniteLoss", Both)
    with pytest.raises(TrainingError, match=r"training loss became nan at step 4"):
        fit_generator(model, tok, examples, tmp_path / "out", settings())
    good = load_file(str(tmp_path / "out" / "checkpoint-2" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in good.values())
    assert not (tmp_path / "out" / "checkpoint-4").exists()


def test_lora_merge_is_equivalent():
    model, tok = make_tiny_causal_lm()
    lora = apply_lora(model, settings(lora_targets=("q_proj", "v_proj"), lora_r=4)).eval()  # no dropout
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero (a no-op adapter): make it do something
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        before = lora(input_ids=ids).logits
        merged = lora.merge_and_unload()
        after = merged(input_ids=ids).logits
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-5)


def test_lora_targets_must_match():
    model, _ = make_tiny_causal_lm()
    with pytest.raises(TrainingError, match=r"LoRA target modules \['query'\] match nothing"):
        apply_lora(model, settings(lora_targets=("q_proj", "query")))


def test_lora_training_runs_and_merges(tmp_path):
    model, tok = make_tiny_causal_lm()
    examples, _ = build_sft_examples(PROMPTS, ANSWERS, tok)
    before = mean_loss(model, examples)
    report = fit_generator(model, tok, examples, tmp_path / "out", settings(method="lora", learning_rate=5e-2, epochs=3))
    assert not any("lora" in n for n, _ in report["model"].named_parameters())
    assert mean_loss(report["model"], examples) < before


def test_padding_fraction_is_lower_with_length_grouping():
    _, tok = make_tiny_causal_lm()
    prompts = [" ".join(["question"] * n) + " answer" for n in range(1, 40)]
    examples, _ = build_sft_examples(prompts, ["paris"] * len(prompts), tok)
    assert padding_fraction(examples, 4, group_by_length=True) < padding_fraction(examples, 4, group_by_length=False)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """`accelerate launch` with the repo's 2-process CPU config (DDP over gloo): both ranks end identical,
    and equal to one process with the same global batch (2 x 2 = 4)."""
    here = __import__("pathlib").Path(__file__).parent
    script, config = str(here / "ddp_train.py"), str(here.parent / "experiments" / "accelerate" / "cpu_2proc.yaml")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
    subprocess.run(launch + [script, str(tmp_path / "two"), "2"], check=True, timeout=600)
    subprocess.run([sys.executable, script, str(tmp_path / "one"), "4"], check=True, timeout=600)
    r0, r1 = load_file(str(tmp_path / "two" / "rank0.safetensors")), load_file(str(tmp_path / "two" / "rank1.safetensors"))
    single = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    initial = make_tiny_causal_lm(seed=0)[0].state_dict()
    assert any(not torch.equal(single[k], initial[k]) for k in single)  # training changed the weights
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0, msg=f"ranks differ on {k}")
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-5, msg=f"2 processes != 1 process on {k}")


def test_a_finished_model_with_damaged_weights_is_trained_again(tmp_path):
    """Issue 13: `finished` vouches for a final folder only when its files match the manifest written with it."""
    from rag_lab.io import CacheRepaired
    from rag_lab.training.common import FINAL, finished, save_model

    model, tok = make_tiny_causal_lm()
    record = {"what": "tiny"}
    save_model(model, tok, tmp_path / "out" / FINAL, {"record": record, "train_loss": 1.0})
    assert finished(tmp_path / "out", record)["train_loss"] == 1.0
    assert finished(tmp_path / "out", {"what": "else"}) is None
    weights = tmp_path / "out" / FINAL / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.warns(CacheRepaired):
        assert finished(tmp_path / "out", record) is None
    assert not (tmp_path / "out" / FINAL).exists()


def test_checkpoint_rule_breaks_dev_em_ties_by_dev_loss_then_the_later_step():
    from rag_lab.training.common import selection_score

    assert selection_score(0.02, 3.0, 10) > selection_score(0.01, 0.1, 50)  # dev EM first: one dev question outweighs loss
    assert selection_score(0.01, 2.8, 38) > selection_score(0.01, 2.9, 13)  # a tie goes to the lower dev loss
    assert selection_score(0.01, 2.8, 38) > selection_score(0.01, 2.8, 13)  # a full tie to the later step
    assert selection_score(0.0, float("nan"), 5) == pytest.approx(0.0, abs=1e-9)  # no finite loss: EM alone


def test_flat_dev_em_picks_the_lowest_dev_loss_not_the_first_checkpoint(tmp_path):
    """At small scale dev EM is often flat (the same at every evaluation): the Trainer used to keep the earliest
    checkpoint. The rule picks the checkpoint with the lowest dev loss."""
    from rag_lab.training.common import DevEMCallback

    class Silent:  # a reader that is always wrong: dev EM 0.0 at every evaluation
        def generate(self, questions, contexts=None):
            return [{"prediction": "zzz"} for _ in questions]

    model, tok = make_tiny_causal_lm()
    examples, _ = build_sft_examples(PROMPTS, ANSWERS, tok)
    from rag_lab.data.records import QAExample

    dev = [QAExample(f"d{i}", p, (a,)) for i, (p, a) in enumerate(zip(PROMPTS[:2], ANSWERS[:2]))]
    callback = DevEMCallback(lambda m: Silent(), dev)
    report = fit_generator(model, tok, examples, tmp_path / "out", settings(epochs=3, patience=10), examples[:2], callback)
    history = report["dev_history"]
    assert len(history) >= 3 and {h["dev_em"] for h in history} == {0.0}
    best = min(history, key=lambda h: (h["eval_loss"], -h["step"]))
    assert best["step"] != history[0]["step"]  # training lowers the dev loss: the first checkpoint is not the best
    assert report["best_checkpoint"].endswith(f"checkpoint-{best['step']}")


def test_keep_checkpoints_false_deletes_them_once_the_final_model_is_saved(tmp_path):
    """Issue 22, item 6 (disk): a smoke reproduce left 6.6 GB of checkpoints. The Trainer keeps the chosen and
    the last one; `training.keep_checkpoints: false` deletes those too, never the final model, and moves no key."""
    from rag_lab.config import load_experiment
    from rag_lab.paths import REPO_ROOT
    from rag_lab.runner import training_record
    from rag_lab.training.common import FINAL, finish_checkpoints

    for name in ("checkpoint-38", "checkpoint-88", FINAL):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"w")
    finish_checkpoints(tmp_path, settings())  # the default keeps them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-38", "checkpoint-88", FINAL]
    finish_checkpoints(tmp_path, settings(keep_checkpoints=False))
    assert [p.name for p in tmp_path.iterdir()] == [FINAL]
    path = REPO_ROOT / "experiments" / "finetune_rag.yaml"
    assert training_record(load_experiment(path, overrides=["training.keep_checkpoints=false"]), 0) == \
        training_record(load_experiment(path), 0)


@pytest.mark.parametrize("kind", ["generator", "reader"])
def test_under_two_processes_one_rank_saves_the_trained_model(tmp_path, kind):
    """Issue 23: fid, reader and joint saved from every rank under DDP. Every trainer saves through
    `training.common.save_trained`, on the main process alone: one writer, one complete final folder."""
    from rag_lab.io import verified_folder
    from rag_lab.training.common import FINAL

    here = __import__("pathlib").Path(__file__).parent
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(here.parent / "experiments" / "accelerate" / "cpu_2proc.yaml"), str(here / "ddp_save.py"), kind, str(tmp_path)]
    done = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("saved-by-rank*")) == ["saved-by-rank0"]
    assert verified_folder(tmp_path / "run" / FINAL)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temp folder left by a second writer
