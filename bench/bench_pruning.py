"""Seconds for one pruning step on CPU: global magnitude pruning over all prunable weights and one
regroup (vit_small: heads + MLP neurons, magnitude; res56s: conv channels, magnitude), against
the one-pass floor of magnitude pruning: read every weight once and compare it with a known
threshold (`|w| >= t` per layer). Targets for vit_small (21M prunable weights): each step under
1 s; global pruning within 2x of the floor. Peak memory: the extra resident memory of one global
pruning call in a fresh process (peak resident VmHWM, reset just before the call, minus the
resident memory then, freed heap pages trimmed first), against the weights' own size.

    python bench/bench_pruning.py [--repeats 5] [--threads N] [--record]

Pruning and floor are timed in turns and the fastest of each is reported; the regroup is a
median after one warmup call. On a shared machine every multi-threaded op can
wait a scheduler slice for its second thread; the load average is printed with the numbers.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time

from common import ROOT, apply_threads, bench_parser, machine, median_seconds, record

import torch

import pruning_utils as pu  # noqa: E402  (common puts the repository root on sys.path)
from models import create_model  # noqa: E402
from vit_pruning_utils import vit_unit_groups  # noqa: E402

TARGET_S, TARGET_FLOOR = 1.0, 2.0


def trained_like(arch: str) -> torch.nn.Module:
    """The full-size model, weights scaled off init (stands in for a trained state)."""
    torch.manual_seed(0)
    model = create_model(arch, 100, 32)
    with torch.no_grad():
        for w in pu.prunable_weights(model).values():
            w.mul_(1.5)  # in place: no temporary raises the process's peak memory
    return model


def one_pass_floor(weights: dict, thr: float) -> list:
    """The least any magnitude pruning does, layer by layer: read each weight once and write
    its bool mask against a known threshold."""
    return [torch.abs(w.detach()) >= thr for w in weights.values()]


def flat_one_pass_floor(weights: dict, thr: float) -> torch.Tensor:
    """The same as one tensor-level operation: all |w| in one vector, compared once."""
    return torch.cat([w.detach().reshape(-1) for w in weights.values()]).abs_() >= thr


def interleaved(fns, repeats: int) -> list[float]:
    """Fastest seconds of each function, timed in turns (a load spike hits all alike)."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [min(ts) for ts in times]


def bench_arch(arch: str, repeats: int) -> list[tuple[str, int, float, str]]:
    """(step, weights, median seconds, note) for the magnitude pruning, its floor and the regroup."""
    model = trained_like(arch)
    weights, alive = pu.prunable_weights(model), pu.ones_masks(model)
    total = pu.count_total(alive)
    keep = pu.imp_keep_count(total, 0.2, 1)
    imp = pu.global_magnitude_prune(weights, alive, keep)
    # state 2's step: a masked network pruned again inside its mask (the common case after state 0)
    pu.apply_masks(weights, imp)
    keep2 = pu.imp_keep_count(total, 0.2, 2)
    groups = vit_unit_groups(model, "both") if arch.startswith("vit") else pu.channel_groups(model)
    kind = "heads + MLP neurons" if arch.startswith("vit") else "channels"
    prune_s, floor_s, flat_s = interleaved(
        [
            lambda: pu.global_magnitude_prune(weights, imp, keep2),
            lambda: one_pass_floor(weights, 0.01),
            lambda: flat_one_pass_floor(weights, 0.01),
        ],
        repeats,
    )
    regroup_s = median_seconds(lambda: pu.regroup(groups, weights, imp, "magnitude"), 1, repeats)
    return [
        (
            f"{arch} global magnitude prune (inside a mask)",
            total,
            prune_s,
            f"{prune_s / flat_s:.2f}x the flat floor, {prune_s / floor_s:.2f}x the per-layer floor",
        ),
        (f"{arch} one-pass floor, one flat vector (cat, abs, compare)", total, flat_s, ""),
        (f"{arch} one-pass floor, per layer (abs, compare)", total, floor_s, ""),
        (f"{arch} regroup ({kind}, magnitude)", total, regroup_s, ""),
    ]


PEAK = """
import ctypes, gc, sys, torch
sys.path.insert(0, {root!r})
import pruning_utils as pu
from models import create_model
torch.set_num_threads(1)
with torch.device("meta"):  # shapes only: nothing allocated
    shapes = {{n: w.shape for n, w in pu.prunable_weights(create_model({arch!r}, 100, 32)).items()}}
# filled in place: no full-size temporaries whose freed pages the pruning could reuse unseen
weights = {{n: torch.empty(s).normal_() for n, s in shapes.items()}}
alive = {{n: torch.empty(s, dtype=torch.bool).bernoulli_(0.8) for n, s in shapes.items()}}
keep = pu.imp_keep_count(pu.count_ones(alive), 0.2, 1)
gc.collect()
ctypes.CDLL(None).malloc_trim(0)  # freed heap pages back to the OS: resident = live now
def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
open("/proc/self/clear_refs", "w").write("5")  # reset this process's peak (ru_maxrss would carry the parent's)
before = kib("VmRSS")
pu.global_magnitude_prune(weights, alive, keep)
print((kib("VmHWM") - before) * 1024, sum(w.numel() * w.element_size() for w in weights.values()))
"""


def peak_extra_bytes(arch: str) -> tuple[int, int]:
    """(extra peak resident bytes of one global pruning call, bytes of the prunable weights)."""
    code = PEAK.format(root=ROOT, arch=arch)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), int(out[1])


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per step (median)")
    a = p.parse_args(argv)
    apply_threads(a.threads)
    lines = ["| step | prunable weights | median s | note |", "|---|---|---|---|"]
    print(machine())
    for arch in ("vit_small", "res56s"):
        for name, total, sec, note in bench_arch(arch, a.repeats):
            if arch == "vit_small" and "floor" not in name:
                note += f"{'; ' if note else ''}< {TARGET_S:g} s: {'met' if sec < TARGET_S else 'MISSED'}"
            lines.append(f"| {name} | {total:,} | {sec:.3f} | {note} |")
            print(lines[-1], flush=True)
    extra, size = peak_extra_bytes("vit_small")
    lines += [
        "",
        f"vit_small, one global pruning call: peak resident memory +{extra / 2**20:.0f} MiB over the model "
        f"({size / 2**20:.0f} MiB of prunable weights; {extra / size:.2f}x). Target: pruning within "
        f"{TARGET_FLOOR:g}x of the one-pass floor.",
    ]
    print(lines[-1])
    if a.record:
        record("Pruning step cost (CPU)", "python bench/bench_pruning.py " + shlex.join(sys.argv[1:]), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
