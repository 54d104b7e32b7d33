"""What the end-to-end tests share: the repository root, the environment of the runs they start (copied from
os.environ at import, after conftest.py pointed TMPDIR under pytest's basetemp), and a small CPU run's flags."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def small_run(images: int, batch: int) -> list[str]:
    """main_imp_fillback flags of a small run: `images` synthetic training images, one CPU thread, no wandb."""
    flags = ["--dataset", "synthetic", "--synthetic_size", str(images), "--batch_size", str(batch)]
    return flags + ["--wandb", "disabled", "--device", "cpu", "--threads", "1"]
