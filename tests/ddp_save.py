"""Helper for test_training.py: one trainer kind, end to end through its saving path, as N processes.

    accelerate launch --config_file experiments/accelerate/cpu_2proc.yaml tests/ddp_save.py KIND OUT

KIND is generator (train_generator on a tiny Llama) or reader (train_reader on a tiny BERT). Every call of
the guarded save (`training.common.save_trained`) that reaches `atomic_dir` leaves OUT/saved-by-rank<r>, so
the test can see which ranks wrote the final model.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_extractive import BERLIN, FRANCE, LOUIS, save_tiny_bert  # noqa: E402
from tiny_models import make_tiny_causal_lm  # noqa: E402

from rag_lab.config import GeneratorConfig  # noqa: E402
from rag_lab.data.records import QAExample  # noqa: E402
from rag_lab.training import common  # noqa: E402
from rag_lab.training.common import Split, TrainSettings  # noqa: E402

kind, out = sys.argv[1], Path(sys.argv[2])
rank = int(os.environ.get("RANK", 0))
real_atomic_dir = common.atomic_dir


def recorded_atomic_dir(target):
    (out / f"saved-by-rank{rank}").write_text(str(target))
    return real_atomic_dir(target)


common.atomic_dir = recorded_atomic_dir
torch.set_num_threads(1)
settings = TrainSettings(learning_rate=1e-2, epochs=2, batch_size=2, eval_steps=100, group_by_length=False, warmup_ratio=0.0, seed=0)
questions = [QAExample(f"t{i}", q, (a,)) for i, (q, a) in enumerate([
    ("what is the capital of france?", "Paris"), ("what is the capital of germany?", "Berlin"),
    ("who was king of france?", "Louis XIV"), ("what river flows through paris?", "Seine")])]
if kind == "generator":
    from rag_lab.training.generator import train_generator

    make_tiny_causal_lm(out / "lm", seed=0)
    generator = GeneratorConfig(model=str(out / "lm"), use_chat_template=False, max_new_tokens=3, max_input_tokens=60)
    train_generator(Split(questions, []), None, settings, generator, out / "run", {"kind": kind})
elif kind == "reader":
    from rag_lab.training.reader import train_reader

    base = save_tiny_bert(out / "bert", with_qa_head=False)
    contexts = [[BERLIN, FRANCE], [FRANCE, BERLIN], [BERLIN, LOUIS], [LOUIS, FRANCE]]
    train_reader(Split(questions, []), Split(contexts, []), settings, str(base), out / "run", {"kind": kind})
else:
    raise SystemExit(f"unknown trainer kind {kind!r}")
