"""End-to-end RAG (RAG-Sequence, RAG-Token, perplexity distillation) and Fusion-in-Decoder, on tiny
random models built here: every loss against an explicit float64 computation, gradients, decoding,
resume, bad input."""
from __future__ import annotations

import dataclasses
import math

import faiss
import numpy as np
import pytest
import torch
from transformers import TrainerCallback

import rag_lab.generators.fusion as fusion
import rag_lab.training.joint as joint
from rag_lab.config import ConfigError, ExperimentConfig, GeneratorConfig, RetrieverConfig, TrainingConfig
from rag_lab.data.records import Passage, QAExample
from rag_lab.generators import FiDGenerator, RagSequenceGenerator, RagTokenGenerator, Seq2SeqGenerator, prompt_builder
from rag_lab.generators.fid import FiDModel, fid_batch
from rag_lab.generators.fusion import answer_logprobs
from rag_lab.models import load_causal_lm, load_sentence_encoder
from rag_lab.pipeline import dense_index
from rag_lab.training import (PassageIndex, Split, TrainSettings, TrainingError, perplexity_distillation_loss, rag_sequence_loss,
                              rag_token_loss, train_joint)
from rag_lab.training.joint import JointRAG, fit_joint, load_joint_model
from tiny_models import make_tiny_causal_lm, make_tiny_encoder, make_tiny_seq2seq

PASSAGES = [Passage(f"p{i}", t, x) for i, (t, x) in enumerate([
    ("france", "the capital of france is paris"), ("germany", "berlin is the capital city of germany"),
    ("river", "a river in the mountain"), ("king", "the king was born in the year"),
    ("queen", "the queen of the country"), ("president", "who was president of france"),
])]
QUESTIONS = [QAExample(f"q{i}", q, [a]) for i, (q, a) in enumerate([
    ("what is the capital of france", "paris"), ("what is the capital of germany", "berlin"),
    ("where was the king born", "the year"), ("who is the queen", "the queen"),
    ("which river is in the mountain", "a river"), ("who was president", "the president"),
])]


def plain_cfg(path, **kw) -> GeneratorConfig:
    return GeneratorConfig(kind=kw.pop("kind", "decoder"), model=str(path), use_chat_template=False, max_new_tokens=4,
                           batch_size=kw.pop("batch_size", 4), max_input_tokens=60, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_tiny_causal_lm(root / "lm")
    make_tiny_seq2seq(root / "t5")
    make_tiny_encoder(root / "enc", [p.text for p in PASSAGES] + [q.question for q in QUESTIONS])
    return root


def brute_token_probs(model, tokenizer, prompt: str, answer: str, decoder_only: bool) -> list[float]:
    """p(y_t | x, z, y_<t) for each target token, one unpadded sequence, in float64."""
    target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        if decoder_only:
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            logits = model(input_ids=torch.tensor([ids + target])).logits[0].double()
            probs = torch.softmax(logits, -1)
            return [float(probs[len(ids) - 1 + t, tok]) for t, tok in enumerate(target)]
        enc = tokenizer(prompt, return_tensors="pt")
        logits = model(**enc, labels=torch.tensor([target])).logits[0].double()
        return [float(torch.softmax(logits[t], -1)[tok]) for t, tok in enumerate(target)]


@pytest.mark.parametrize("family", ["decoder", "seq2seq"])
def test_rag_sequence_and_token_losses_equal_brute_force(tiny, family):
    decoder_only = family == "decoder"
    model, tokenizer = (make_tiny_causal_lm if decoder_only else make_tiny_seq2seq)()
    questions, answers = ["what is the capital of france", "who was the king"], ["paris", "the year of the king"]
    passages = [PASSAGES[0].text, PASSAGES[3].text + " of the river in the mountain", "a"]
    k = len(passages)
    prompts = [f"{p} question {q} answer" for q in questions for p in passages]
    flat_answers = [a for a in answers for _ in passages]
    logp, mask = answer_logprobs(model, tokenizer, prompts, flat_answers, add_special_tokens=True, decoder_only=decoder_only)
    logp, mask = logp.view(2, k, -1), mask.view(2, k, -1)[:, 0]
    doc_logits = torch.tensor([[0.3, -1.2, 2.0], [1.0, 1.0, -0.5]])
    weights = torch.softmax(doc_logits.double(), -1)

    for i, (q, a) in enumerate(zip(questions, answers)):
        per_passage = [brute_token_probs(model, tokenizer, f"{p} question {q} answer", a, decoder_only) for p in passages]
        sequence = sum(float(weights[i, z]) * math.prod(per_passage[z]) for z in range(k))
        token = math.prod(sum(float(weights[i, z]) * per_passage[z][t] for z in range(k)) for t in range(len(per_passage[0])))
        assert float(rag_sequence_loss(doc_logits, logp, mask)[i]) == pytest.approx(-math.log(sequence), rel=1e-5)
        assert float(rag_token_loss(doc_logits, logp, mask)[i]) == pytest.approx(-math.log(token), rel=1e-5)


def test_with_one_passage_both_losses_are_the_plain_fine_tuning_loss():
    model, tokenizer = make_tiny_causal_lm()
    prompt, answer = "the capital of france is paris question what is the capital answer", "paris"
    logp, mask = answer_logprobs(model, tokenizer, [prompt], [answer], add_special_tokens=True)
    ids = tokenizer(prompt)["input_ids"]
    target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labels = [-100] * len(ids) + target
    with torch.no_grad():  # the model's own loss: the mean token cross-entropy over the answer
        plain = model(input_ids=torch.tensor([ids + target]), labels=torch.tensor([labels])).loss * len(target)
    logits = torch.tensor([[0.7]])
    assert float(rag_sequence_loss(logits, logp[:, None], mask)[0]) == pytest.approx(float(plain), rel=1e-5)
    assert float(rag_token_loss(logits, logp[:, None], mask)[0]) == pytest.approx(float(plain), rel=1e-5)


def test_perplexity_distillation_is_the_kl_to_detached_reader_scores():
    doc_logits = torch.tensor([[0.2, 1.5, -0.3]], requires_grad=True)
    seq_logp = torch.tensor([[-4.0, -1.0, -2.5]], requires_grad=True)
    loss = perplexity_distillation_loss(doc_logits, seq_logp, target_temperature=2.0)
    target = np.exp(np.array([-4.0, -1.0, -2.5]) / 2.0)
    target /= target.sum()
    p_eta = np.exp([0.2, 1.5, -0.3]) / np.exp([0.2, 1.5, -0.3]).sum()
    assert float(loss[0]) == pytest.approx(float((target * np.log(target / p_eta)).sum()), rel=1e-5)
    loss.sum().backward()
    assert seq_logp.grad is None or not seq_logp.grad.any()  # the reader's scores are the target, never trained by it
    assert doc_logits.grad.abs().sum() > 0


def tiny_index(tiny) -> PassageIndex:
    encoder = load_sentence_encoder(str(tiny / "enc"))
    vecs = np.ascontiguousarray(encoder.encode([p.text for p in PASSAGES], normalize_embeddings=True), dtype=np.float32)
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(vecs)
    return PassageIndex(PASSAGES, vecs, index, str(tiny / "enc"), max_length=32)


def tiny_joint(tiny, objective="rag_sequence", k=3, family="decoder") -> JointRAG:
    cfg = plain_cfg(tiny / ("lm" if family == "decoder" else "t5"), kind=family)
    return load_joint_model(cfg, tiny_index(tiny), objective, k, temperature=0.1, target_temperature=1.0)


@pytest.mark.parametrize("objective", ["rag_sequence", "rag_token", "pdist"])
def test_gradients_reach_the_query_encoder_and_never_the_passage_index(tiny, objective):
    model = tiny_joint(tiny, objective).eval()
    frozen = model.index.embeddings.copy()
    model(QUESTIONS[:3])["loss"].backward()
    query_grads = [p.grad for p in model.query_encoder.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in query_grads)
    reader_grads = [p.grad for p in model.reader.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in reader_grads)
    # the passage side is data, not a parameter: nothing of it is trainable, and a step leaves it unchanged
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"reader", "query_encoder"}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert np.array_equal(model.index.embeddings, frozen)


def test_finite_difference_matches_the_query_encoder_gradient(tiny):
    model = tiny_joint(tiny, "rag_sequence").double().eval()
    weight = next(p for n, p in model.query_encoder.named_parameters() if n.endswith("layer.0.attention.self.query.weight"))
    model(QUESTIONS[:2])["loss"].backward()
    analytic = float(weight.grad[3, 5])
    eps = 1e-5
    with torch.no_grad():
        weight[3, 5] += eps
        up = float(model(QUESTIONS[:2])["loss"])
        weight[3, 5] -= 2 * eps
        down = float(model(QUESTIONS[:2])["loss"])
    assert abs(analytic) > 1e-8
    assert (up - down) / (2 * eps) == pytest.approx(analytic, rel=1e-4, abs=1e-9)


# ---------------------------------------------------------------- Fusion-in-Decoder

def test_fid_with_one_passage_is_the_plain_encoder_decoder(tiny):
    model, tokenizer = make_tiny_seq2seq()
    text = "the capital of france is paris question what is the capital"
    enc = tokenizer([text], return_tensors="pt")
    labels = torch.tensor([tokenizer("paris", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]])
    batch = fid_batch(tokenizer, [[text]])
    with torch.no_grad():
        fid = FiDModel(model)(batch["input_ids"], batch["attention_mask"], labels=labels)
        plain = model(**enc, labels=labels)
    assert torch.allclose(fid.logits, plain.logits, atol=1e-6) and float(fid.loss) == pytest.approx(float(plain.loss), rel=1e-6)

    cfg = plain_cfg(tiny / "t5", kind="seq2seq")
    fid_gen = FiDGenerator(model, tokenizer, prompt_builder(cfg, tokenizer), max_new_tokens=5)
    seq_gen = Seq2SeqGenerator(model, tokenizer, prompt_builder(cfg, tokenizer), max_new_tokens=5)
    ctx = [[PASSAGES[i]] for i in range(len(QUESTIONS))]
    assert [p["raw"] for p in fid_gen.generate(QUESTIONS, ctx)] == [p["raw"] for p in seq_gen.generate(QUESTIONS, ctx)]


def test_fid_batched_equals_unbatched(tiny):
    model, tokenizer = make_tiny_seq2seq(seed=3)
    cfg = plain_cfg(tiny / "t5", kind="seq2seq")
    ctx = [PASSAGES[i:i + 1 + i % 3] for i in range(len(QUESTIONS))]  # 1 to 3 passages of varied lengths
    one = FiDGenerator(model, tokenizer, prompt_builder(cfg, tokenizer), max_new_tokens=6, batch_size=1).generate(QUESTIONS, ctx)
    many = FiDGenerator(model, tokenizer, prompt_builder(cfg, tokenizer), max_new_tokens=6, batch_size=4).generate(QUESTIONS, ctx)
    assert [p["raw"] for p in one] == [p["raw"] for p in many]
    assert [p["n_passages"] for p in many] == [len(c) for c in ctx]


# ---------------------------------------------------------------- decoding

def test_thorough_decoding_picks_the_argmax_of_the_marginal(tiny, monkeypatch):
    """Hand-built: weights (0.5, 0.25, 0.25); passage 1 yields "paris", passages 2 and 3 "berlin".
    p(paris|z) = (0.6, 0.1, 0.1), p(berlin|z) = (0.3, 0.5, 0.5): the marginal favours berlin (0.4 vs
    0.35), while scoring each candidate only against its own passages (fast) favours paris (0.3 vs 0.25)."""
    table = {"paris": [0.6, 0.1, 0.1], "berlin": [0.3, 0.5, 0.5]}
    model, tokenizer = load_causal_lm(str(tiny / "lm"))
    cfg = plain_cfg(tiny / "lm")

    def fake_scores(model, tokenizer, prompts, answers, *args):
        z = [int(p.split("[1] ")[1].split(":")[0][1:]) for p in prompts]  # the passage id p<z> in the prompt
        return torch.tensor([[math.log(table[a][j])] for a, j in zip(answers, z)]), torch.ones(len(answers), 1, dtype=torch.bool)

    monkeypatch.setattr(fusion, "answer_logprobs", fake_scores)
    passages = [Passage(f"p{j}", f"p{j}", "text") for j in range(3)]
    logits = [math.log(0.5), math.log(0.25), math.log(0.25)]
    picks = {}
    for decoding in ("thorough", "fast"):
        gen = RagSequenceGenerator(model, tokenizer, prompt_builder(cfg, tokenizer), decoding=decoding)
        gen.is_decoder_only = False  # the from-scratch scoring path, whose scorer the table replaces
        monkeypatch.setattr(gen, "generate_batch", lambda prompts: ["paris\n", "berlin", " berlin\nmore"])
        picks[decoding] = gen.generate(QUESTIONS[:1], [passages], doc_logits=[logits])[0]["prediction"]
    assert picks == {"thorough": "berlin", "fast": "paris"}


def test_cached_candidate_scores_equal_scoring_from_scratch(tiny):
    """RAG-Sequence reads each prompt once and scores candidates from its key-value cache: the same
    greedy candidates as `generate`, the same scores as `answer_logprobs` on the whole sequences."""
    model, tokenizer = load_causal_lm(str(tiny / "lm"))
    cfg = plain_cfg(tiny / "lm")
    gen = RagSequenceGenerator(model, tokenizer, prompt_builder(cfg, tokenizer), max_new_tokens=4, batch_size=4)
    prompts = [gen.builder.rag(q, [p]).text for q, p in zip(QUESTIONS, PASSAGES)]
    with torch.no_grad():
        state = gen.prefill(prompts)
        greedy = tokenizer.batch_decode(gen.greedy(state), skip_special_tokens=True)
        pairs = [(i, c) for i in range(len(prompts)) for c in ("paris", "the capital of", "")]
        cached = gen.pair_scores(state, None, pairs)
        scratch, _ = answer_logprobs(model, tokenizer, [prompts[i] for i, _ in pairs], [c for _, c in pairs], True)
    plain = [g.generate_batch([gen.builder.rag(q, [p])])[0] for g in [gen] for q, p in zip(QUESTIONS, PASSAGES)]
    assert greedy == plain
    assert np.allclose(cached, scratch.sum(-1).double().numpy(), atol=1e-4)


def test_rag_token_greedy_equals_the_brute_force_mixture(tiny):
    model, tokenizer = load_causal_lm(str(tiny / "lm"))
    cfg = plain_cfg(tiny / "lm")
    builder = prompt_builder(cfg, tokenizer)
    ctx = [PASSAGES[0:3], PASSAGES[2:5]]
    logits = [[0.5, -1.0, 2.0], [0.0, 0.3, 0.1]]
    gen = RagTokenGenerator(model, tokenizer, builder, max_new_tokens=5, batch_size=8, stop_at_newline=False)
    preds = gen.generate(QUESTIONS[:2], ctx, doc_logits=logits)
    for q, passages, w, pred in zip(QUESTIONS[:2], ctx, logits, preds):
        prompts = [tokenizer(builder.rag(q, [p]).text)["input_ids"] for p in passages]
        weights = torch.softmax(torch.tensor(w, dtype=torch.float64), -1)
        out: list[int] = []
        for _ in range(5):  # no cache, no padding: each passage's sequence run whole at every step
            with torch.no_grad():
                probs = [torch.softmax(model(input_ids=torch.tensor([ids + out])).logits[0, -1].double(), -1) for ids in prompts]
            out.append(int(sum(weights[z] * probs[z] for z in range(len(passages))).argmax()))
            if out[-1] == tokenizer.eos_token_id:
                break
        assert pred["raw"] == tokenizer.decode(out, skip_special_tokens=True)


# ---------------------------------------------------------------- training, resume

def settings(**kw) -> TrainSettings:
    base = dict(learning_rate=1e-3, epochs=2, batch_size=2, eval_steps=2, warmup_ratio=0.0, dev_size=2, patience=5,
                group_by_length=False, objective="rag_sequence", query_learning_rate=1e-3)
    return TrainSettings.from_config(TrainingConfig(enabled=True, **{**base, **kw}), seed=0)


class InterruptAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


@pytest.mark.parametrize("objective", ["rag_token", "pdist"])
def test_joint_training_saves_a_reader_and_a_query_encoder(tiny, tmp_path, objective):
    split = Split(QUESTIONS[:4], QUESTIONS[4:])
    info = train_joint(split, tiny_index(tiny), settings(objective=objective), plain_cfg(tiny / "lm"), 2, 0.1, tmp_path / "run",
                       {"test": objective})
    final = tmp_path / "run" / "final"
    assert info["global_step"] == 4 and info["objective"] == objective
    assert [e["step"] for e in info["passage_entropy"]]  # logged over training
    assert all(0 <= e["passage_entropy"] <= math.log(2) + 1e-6 for e in info["passage_entropy"])
    load_causal_lm(str(final))
    trained = load_sentence_encoder(str(final / "query_encoder"))
    start = load_sentence_encoder(str(tiny / "enc"))
    assert not np.allclose(trained.encode(["what is the capital of france"]), start.encode(["what is the capital of france"]))


def test_resume_after_a_kill_gives_the_same_weights(tiny, tmp_path, monkeypatch):
    def run(out):
        model = tiny_joint(tiny, "rag_sequence", k=2)
        fit_joint(model, QUESTIONS[:4], QUESTIONS[4:], out, settings(), {"r": 1}, 1e-3)
        return model

    straight = run(tmp_path / "a")
    monkeypatch.setattr(joint, "StopOnNonFiniteLoss", lambda: InterruptAt(3))  # dies after checkpoint-2
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    monkeypatch.undo()
    resumed = run(tmp_path / "b")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_index_refresh_re_encodes_and_resumes(tiny, tmp_path):
    model = tiny_joint(tiny, "rag_sequence", k=2)
    start = model.index.embeddings.copy()
    fit_joint(model, QUESTIONS[:4], [], tmp_path / "run", settings(eval_steps=2), {"r": 2}, 1e-2, refresh_every=2,
              refresh_cache=tmp_path / "cache")
    assert sorted(p.name.startswith("emb-refresh-") for p in (tmp_path / "cache").glob("*.npy")) == [True, True]
    assert not np.allclose(model.index.embeddings, start)  # the passage side followed the trained encoder


# ---------------------------------------------------------------- bad input

def test_bad_inputs_fail_clearly(tiny, tmp_path):
    with pytest.raises(TrainingError, match="retriever.k = 7 but the corpus holds 6"):
        tiny_joint(tiny, k=7)
    with pytest.raises(ConfigError, match="retriever.kind 'bm25'.*query encoder"):
        ExperimentConfig(name="x", regime="rag_e2e_ft", retriever=RetrieverConfig(kind="bm25"),
                         training=TrainingConfig(enabled=True, objective="rag_sequence"))
    with pytest.raises(ConfigError, match="training.objective"):
        ExperimentConfig(name="x", regime="rag_ft", retriever=RetrieverConfig(kind="dense"),
                         training=TrainingConfig(enabled=True, objective="rag_token"))
    with pytest.raises(ValueError, match="no trainable query encoder"):
        dense_index(RetrieverConfig(kind="bm25"), PASSAGES)
    with pytest.raises(TrainingError, match="no chat template"):
        load_joint_model(GeneratorConfig(model=str(tiny / "lm"), use_chat_template=True), tiny_index(tiny), "rag_sequence", 2, 0.1, 1.0)
    with pytest.raises(TrainingError, match="refresh_every.*cache directory"):
        fit_joint(tiny_joint(tiny, k=2), QUESTIONS[:2], [], tmp_path / "r", settings(), {}, 1e-3, refresh_every=2)
    with pytest.raises(ConfigError, match="combine: fid needs an encoder-decoder"):
        GeneratorConfig(combine="fid")
    with pytest.raises(ValueError, match="needs contexts and doc_logits"):
        model, tokenizer = load_causal_lm(str(tiny / "lm"))
        RagSequenceGenerator(model, tokenizer, prompt_builder(plain_cfg(tiny / "lm"), tokenizer)).generate(QUESTIONS, None)


# ---------------------------------------------------------------- through the runner

def test_the_runner_trains_end_to_end_and_retrieves_with_the_trained_query_encoder(tiny, tmp_path, monkeypatch):
    import json

    from rag_lab.config import from_dict
    from rag_lab.pipeline import contexts
    from rag_lab.runner import run_experiment

    monkeypatch.setenv("RAG_LAB_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("RAG_LAB_CACHE", str(tmp_path / "cache"))
    write = lambda path, rows: path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # noqa: E731
    write(tmp_path / "eval.jsonl", [{"id": q.id, "question": q.question, "answers": q.answers} for q in QUESTIONS[:3]])
    write(tmp_path / "train.jsonl", [{"id": f"t{i}", "question": q.question + " now", "answers": q.answers} for i, q in enumerate(QUESTIONS)])
    write(tmp_path / "corpus.jsonl", [{"id": p.id, "title": p.title, "text": p.text} for p in PASSAGES])
    cfg = from_dict(ExperimentConfig, {
        "name": "tiny_e2e", "regime": "rag_e2e_ft",
        "data": {"dataset": str(tmp_path / "eval.jsonl"), "train_split": str(tmp_path / "train.jsonl"), "corpus": str(tmp_path / "corpus.jsonl")},
        "retriever": {"kind": "dense", "k": 2, "encoder": str(tiny / "enc"), "max_length": 32, "temperature": 0.1},
        "generator": {"model": str(tiny / "lm"), "use_chat_template": False, "max_new_tokens": 3, "max_input_tokens": 60, "combine": "rag_sequence"},
        "training": {"enabled": True, "objective": "rag_sequence", "learning_rate": 1e-3, "query_learning_rate": 1e-2, "epochs": 1,
                     "batch_size": 2, "eval_steps": 2, "dev_size": 2, "group_by_length": False}})
    result = run_experiment(cfg, show_progress=False)
    info = result.training[0]
    assert info["objective"] == "rag_sequence" and info["global_step"] == 2 and info["passage_entropy"]
    final = tmp_path / "cache" / "train"
    (folder,) = [p for p in final.iterdir() if p.name.startswith("tiny_e2e-")]
    assert (folder / "final" / "query_encoder").is_dir()
    # the eval questions were retrieved again, by the trained query encoder over the fixed passage embeddings
    trained = dataclasses.replace(cfg.retriever, query_encoder=str(folder / "final" / "query_encoder"))
    (ctx,) = contexts(trained, PASSAGES, 2, [QAExample(q.id, q.question, q.answers) for q in QUESTIONS[:3]], show_progress=False)
    assert [r["passage_ids"] for r in result.predictions] == ctx.ids()
    assert "retrieve_seed0_s" in result.timings
    again = run_experiment(cfg, show_progress=False)  # everything reused: the same run folder and predictions
    assert again.run_dir == result.run_dir and again.predictions == result.predictions
