"""Harness of the fault-injection test: `python tests/fault_run.py POINT CONFIG` runs `rag-lab run CONFIG`
and SIGKILLs its own process at POINT (none: runs to the end). Test-only: it patches the functions at
whose moment a real kill would hurt most."""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def inject(point: str) -> None:
    if point == "retrieval-cache":  # the results file is on disk, its checksum not yet
        import rag_lab.io as io
        from rag_lab.retrievers import cache

        cache.write_checked = lambda path, data: (io.atomic_write_bytes(path, data), die())
    elif point == "mid-generation":  # after the first batch was logged to partial.jsonl
        from rag_lab.generators.hf import HFGenerator

        real, calls = HFGenerator.generate_batch, []

        def batch(self, prompts):
            calls.append(1)
            if len(calls) == 2:
                die()
            return real(self, prompts)

        HFGenerator.generate_batch = batch
    elif point == "table-upsert":  # half of the new main_table.csv written into its temporary file
        from rag_lab.reporting import results

        real = results.atomic_write_text

        def write(path, text):
            if Path(path).name == "main_table.csv":
                tmp = Path(path).with_name(f".main_table.csv.tmp-pid{os.getpid()}.x.tmp")
                tmp.write_text(text[: len(text) // 2])
                die()
            real(path, text)

        results.atomic_write_text = write
    elif point == "checkpoint":  # the second checkpoint's weights written, its optimizer state and trainer_state not
        import transformers

        real, calls = transformers.Trainer._save_optimizer_and_scheduler, []

        def save(self, output_dir):
            calls.append(1)
            if len(calls) == 2:
                die()
            real(self, output_dir)

        transformers.Trainer._save_optimizer_and_scheduler = save
    elif point != "none":
        raise SystemExit(f"unknown point {point}")


if __name__ == "__main__":
    inject(sys.argv[1])
    from rag_lab.cli import main

    main(["run", sys.argv[2]])
