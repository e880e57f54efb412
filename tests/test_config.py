"""Typed config: strict loading, profiles, and errors that name the key."""
import pytest

from rag_lab.config import ConfigError, ExperimentConfig, config_help, from_dict, load_experiment


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_override(tmp_path):
    cfg = load_experiment(write(tmp_path, "regime: rag\nretriever: {kind: bm25, k: 3}\ntraining: {learning_rate: 1}\n"))
    assert cfg.name == "exp"  # defaults to the file name
    assert (cfg.regime, cfg.retriever.kind, cfg.retriever.k) == ("rag", "bm25", 3)
    assert cfg.training.learning_rate == 1.0 and isinstance(cfg.training.learning_rate, float)
    assert cfg.generator == ExperimentConfig().generator


def test_profiles_override_only_their_keys(tmp_path):
    path = write(tmp_path, "data: {n_eval: 500}\nprofiles:\n  smoke: {data: {n_eval: 20}}\n")
    assert load_experiment(path).data.n_eval == 500
    smoke = load_experiment(path, "smoke")
    assert smoke.data.n_eval == 20 and smoke.data.dataset == "nq-mini"
    with pytest.raises(ConfigError, match="unknown profile 'tiny'"):
        load_experiment(path, "tiny")


@pytest.mark.parametrize("text, message", [
    ("retriever: {kind: bm25, kk: 3}", r"unknown key 'retriever.kk' \(did you mean 'k'\?\); valid keys: kind, k, "),
    ("modle: x", r"unknown key 'modle'; valid keys: name, regime"),
    ("retriever: {k: three}", r"'retriever.k' = 'three' is not of type int"),
    ("retriever: {k: true}", r"'retriever.k' = True is not of type int"),
    ("retriever: {kind: splade}", r"'retriever.kind' = 'splade' is not of type"),
    ("retriever: {k: 0}", r"retriever.k must be positive"),
    ("generator: {rag_template: 'no slots {question}'}", r"rag_template must contain \{context\}"),
    ("generator: {closed_book_template: 'Answer:'}", r"closed_book_template must contain \{question\}"),
    ("data: 5", r"'data' must be a mapping"),
    ("profiles: {tiny: {}}", r"'profiles' keys must be among"),
    ("retriever: {kind: bm25\n  k: [", r"exp.yaml:\d+: invalid YAML"),
    ("regime: rag\nretriever: {kind: oracle}", r"retriever.kind: gold or oracle goes with regime: oracle"),
        ("regime: rag\nretriever: {kind: gold}", r"retriever.kind: gold or oracle goes with regime: oracle"),
    ("regime: oracle\nretriever: {kind: bm25}", r"retriever.kind: gold or oracle goes with regime: oracle"),
    ("generator: {backend: tensorrt}", r"'generator.backend' = 'tensorrt' is not of type"),
    ("generator: {kind: seq2seq, backend: ctranslate2}", r"backend: ctranslate2 serves decoder readers"),
    ("data: {only_answer_in_corpus: 'false'}", r"'data.only_answer_in_corpus' = 'false' is not of type bool"),
])
def test_bad_configs_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(write(tmp_path, text))


def test_missing_file():
    with pytest.raises(ConfigError, match="no such experiment file"):
        load_experiment("does/not/exist.yaml")


def test_from_dict_roundtrip_and_help():
    cfg = ExperimentConfig()
    assert from_dict(ExperimentConfig, cfg.to_dict()) == cfg
    lines = config_help()
    assert any(line.startswith("retriever.k = 5  # ") for line in lines)
    assert all("#" in line for line in lines)
