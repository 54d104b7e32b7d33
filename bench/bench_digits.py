"""Accuracy of res20s tickets on `digits` (real data, bundled, CPU): unstructured IMP, Refill
and RSST, 5 states at rate 0.2 (state 4 keeps 0.8^4 = 41 % of prunable weights).

Runs each method through the real CLI, then appends the commands, per-state test accuracy,
remaining weights, wall time and the machine to bench/RESULTS.md.

    python bench/bench_digits.py [--epochs 15] [--out runs/bench_digits]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

from common import ROOT, record

METHODS = {
    "unstructured IMP": ["--struct", "rsst", "--unstructured"],
    "Refill (channels)": ["--struct", "refill"],
    "RSST (channels)": ["--struct", "rsst"],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_digits"))
    a = p.parse_args()
    lines = ["| method | " + " | ".join(f"state {k} test acc (remaining %)" for k in range(5)) + " | dense -> state 4 | wall s |",
             "|---|" + "---|" * 7]
    commands = []
    for name, flags in METHODS.items():
        save = os.path.join(a.out, name.split()[0].lower())
        cmd = [sys.executable, "main_imp_fillback.py", "--arch", "res20s", "--dataset", "digits", "--rate", "0.2",
               "--pruning_times", "5", "--epochs", str(a.epochs), "--batch_size", "64", "--wandb", "disabled",
               "--save_dir", save, "--overwrite", *flags]
        t0 = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        wall = time.time() - t0
        with open(os.path.join(save, "summary.json")) as f:
            rows = json.load(f)
        cells = [f"{r['final_test_acc']:.2f} ({r['remaining_weights']:.1f})" for r in rows]
        drop = rows[-1]["final_test_acc"] - rows[0]["final_test_acc"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {drop:+.2f} | {wall:.0f} |")
        commands.append("python " + " ".join(shlex.quote(c) for c in cmd[1:]).replace(ROOT + "/", ""))
        print(lines[-1], flush=True)
    lines += ["", "Commands (one per method):", "```", *commands, "```"]
    record(f"digits, res20s, 5 states at rate 0.2, {a.epochs} epochs/state", "python bench/bench_digits.py", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
