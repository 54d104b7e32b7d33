"""Run files and process state: atomic saves, the resume choice, signals, RNG state.

Everything a run needs to survive a kill: checkpoints written to a temporary file, fsynced and
renamed; the newest readable checkpoint for `--resume`; SIGINT/SIGTERM turned into a clean stop
at a step boundary; and every RNG stream, saved and restored for an exact continuation.
"""
from __future__ import annotations

import argparse
import glob
import os
import random
import signal
import sys
from typing import Callable

import numpy as np
import torch

OUTPUT_GLOBS = ("*checkpoint.pth.tar", "*model_SA_best.pth.tar", "latest.pth.tar", "rewind.pth.tar",
                "summary.csv", "summary.json", "args.yaml", "*.png")


class UsageError(Exception):
    """Bad command line or input: one line on stderr, exit code 2."""


def write_atomic(path: str, write: Callable, mode: str = "wb") -> None:
    """Call `write(f)` on a temporary file, fsync, then rename: a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_atomic(obj, path: str) -> None:
    """torch.save, atomically (see write_atomic)."""
    write_atomic(path, lambda f: torch.save(obj, f))


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, state: int, epoch: int) -> int:
    """Every epoch's randomness (order, augmentation, dropout) from (seed, state, epoch) alone,
    so a run resumed at an epoch boundary continues exactly."""
    return (seed * 1_000_003 + state * 10_007 + epoch * 101 + 17) % (2 ** 63)


def rng_states() -> dict:
    """Every RNG the training step draws from (dropout, drop path, mixup), for exact resume."""
    out = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop finishes its step, writes a checkpoint and exits."""
    signum: int | None = None


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def install_stop_handlers(stop: StopFlag) -> dict:
    """SIGINT/SIGTERM set `stop` (a second SIGINT interrupts at once); returns the old handlers."""
    def handler(signum, frame):
        if stop.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.signum = signum
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    return previous


def restore_handlers(previous: dict) -> None:
    for sig, h in previous.items():
        signal.signal(sig, h)



def find_existing_run(save_dir: str) -> list[str]:
    return sorted(f for pat in OUTPUT_GLOBS for f in glob.glob(os.path.join(save_dir, pat)))



def last_good_checkpoint(save_dir: str) -> str:
    path = os.path.join(save_dir, "latest.pth.tar")
    return path if os.path.isfile(path) else "none yet (failed in the first epoch)"



def load_resume_checkpoint(args: argparse.Namespace) -> dict:
    """The newest readable checkpoint: --checkpoint, else latest.pth.tar, else the highest
    {state}checkpoint.pth.tar; unreadable ones are skipped with a warning."""
    if args.checkpoint:
        candidates = [args.checkpoint]
    else:
        states = glob.glob(os.path.join(args.save_dir, "*checkpoint.pth.tar"))
        states.sort(key=lambda p: int(os.path.basename(p).split("checkpoint")[0] or -1), reverse=True)
        candidates = [os.path.join(args.save_dir, "latest.pth.tar")] + states
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            ck = torch.load(path, map_location="cpu", weights_only=False)
            if "file" in ck:  # latest.pth.tar points at the last finished state's checkpoint
                ck = torch.load(os.path.join(os.path.dirname(path), ck["file"]), map_location="cpu",
                                weights_only=False)
            if "state_dict" in ck and "masks" in ck:
                return ck
            raise ValueError("not a checkpoint of this tool")
        except Exception as e:
            print(f"warning: skipping unreadable checkpoint {path} ({type(e).__name__})", file=sys.stderr)
    where = args.checkpoint or args.save_dir
    raise UsageError(f"--resume: nothing to resume, no readable checkpoint in {where}")

