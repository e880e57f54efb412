"""Helper for test_training.py: train a tiny model with the Trainer, as 1 or N processes.

    torchrun --nproc_per_node 2 tests/ddp_train.py OUT PER_DEVICE_BATCH   (or python tests/ddp_train.py ...)

Every rank writes its final weights to OUT/rank<r>.safetensors so the test can compare ranks.
"""
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import make_tiny_causal_lm  # noqa: E402

from rag_lab.training.common import TrainSettings  # noqa: E402
from rag_lab.training.generator import build_sft_examples, fit_generator  # noqa: E402

out, per_device = Path(sys.argv[1]), int(sys.argv[2])
model, tok = make_tiny_causal_lm(seed=0)
# equal lengths everywhere: each rank's token-mean loss then averages to the global one
prompts = ["question who was king answer", "question what is paris answer", "question where is berlin answer", "question when was france answer"]
examples, _ = build_sft_examples(prompts, ["louis", "city", "germany", "year"], tok, add_special_tokens=False)
settings = TrainSettings(learning_rate=1e-2, epochs=3, batch_size=per_device, eval_steps=100, group_by_length=False,
                         warmup_ratio=0.0, seed=0)
report = fit_generator(model, tok, examples, out / "ckpt", settings)
rank = int(os.environ.get("RANK", 0))
save_file({k: v.contiguous() for k, v in report["model"].state_dict().items() if k != "lm_head.weight"}, str(out / f"rank{rank}.safetensors"))
