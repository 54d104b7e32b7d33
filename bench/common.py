"""Shared helpers of the bench scripts: the machine description, timing, and --record."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def machine() -> str:
    """CPU, threads, GPU, library versions and the load average when the numbers were taken."""
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), torch threads {torch.get_num_threads()}, {gpu}, "
        f"torch {torch.__version__}, Python {platform.python_version()}, load average {load}"
    )


def median_seconds(fn: Callable[[], object], warmup: int = 1, repeats: int = 5) -> float:
    """Median wall seconds of `fn()` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def record(title: str, command: str, lines: list[str]) -> None:
    """Append a section (title, date, machine, command, result lines) to bench/RESULTS.md."""
    with open(RESULTS, "a") as f:
        f.write(
            f"\n## {title} ({time.strftime('%Y-%m-%d')})\n\nMachine: {machine()}\n\n"
            f"Command: `{command}`\n\n" + "\n".join(lines) + "\n"
        )
    print(f"appended to {RESULTS}")


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The bench scripts' parser: their own flags plus --threads and --record."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--record", action="store_true", help="append the numbers to bench/RESULTS.md")
    return p


def apply_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
