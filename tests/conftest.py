"""Test-wide settings: nothing phones home, and the repo's data folder is the default."""
import os

# Set before any Hugging Face import: no hub calls, no telemetry, in every test.
for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE",
            "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
    os.environ[key] = "1"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # Ray reports usage to its servers unless told not to
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
