"""Seconds for one pruning step on CPU: global magnitude pruning over all prunable weights and one
regroup (vit_small: heads + MLP neurons, magnitude; res56s: conv channels, magnitude).
Target: each under 1 s for vit_small (21M prunable weights) on a 2-core machine.

    python bench/bench_pruning.py [--repeats 5] [--threads N] [--record]

Numbers are medians after one warmup call. On a shared machine every multi-threaded op can
wait a scheduler slice for its second thread; the load average is printed with the numbers.
"""
from __future__ import annotations

import shlex
import sys

import torch

from common import apply_threads, bench_parser, machine, median_seconds, record

import pruning_utils as pu  # noqa: E402  (common puts the repository root on sys.path)
from models import create_model  # noqa: E402
from vit_pruning_utils import vit_unit_groups  # noqa: E402

TARGET_S = 1.0


def trained_like(arch: str) -> torch.nn.Module:
    """The full-size model with weights moved off init (stands in for a trained state)."""
    torch.manual_seed(0)
    model = create_model(arch, 100, 32)
    with torch.no_grad():
        for w in pu.prunable_weights(model).values():
            w.add_(torch.randn_like(w) * 0.02)
    return model


def bench_arch(arch: str, repeats: int) -> list[tuple[str, int, float]]:
    """(step, weights, median seconds) for the magnitude pruning and the regroup of `arch`."""
    model = trained_like(arch)
    weights, alive = pu.prunable_weights(model), pu.ones_masks(model)
    total = pu.count_total(alive)
    keep = pu.imp_keep_count(total, 0.2, 1)
    imp = pu.global_magnitude_prune(weights, alive, keep)
    groups = vit_unit_groups(model, "both") if arch.startswith("vit") else pu.channel_groups(model)
    kind = "heads + MLP neurons" if arch.startswith("vit") else "channels"
    prune_s = median_seconds(lambda: pu.global_magnitude_prune(weights, alive, keep), 1, repeats)
    regroup_s = median_seconds(lambda: pu.regroup(groups, weights, imp, "magnitude"), 1, repeats)
    return [(f"{arch} global magnitude prune", total, prune_s),
            (f"{arch} regroup ({kind}, magnitude)", total, regroup_s)]


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per step (median)")
    a = p.parse_args(argv)
    apply_threads(a.threads)
    lines = ["| step | prunable weights | median s | target |", "|---|---|---|---|"]
    print(machine())
    for arch in ("vit_small", "res56s"):
        for name, total, sec in bench_arch(arch, a.repeats):
            target = (f"< {TARGET_S:g} s: {'met' if sec < TARGET_S else 'MISSED'}"
                      if arch == "vit_small" else "")
            lines.append(f"| {name} | {total:,} | {sec:.3f} | {target} |")
            print(lines[-1], flush=True)
    if a.record:
        record("Pruning step cost (CPU)", "python bench/bench_pruning.py " + shlex.join(sys.argv[1:]), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
