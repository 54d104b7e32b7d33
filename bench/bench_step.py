"""One CPU training step of vit_tiny at batch 64 (AdamW, cross entropy): dense, under a 50 % mask
(pruning_utils.apply_masks after the step), and under the mask with the RSST penalty active
(rsst.RSSTPenalty.step on a nonempty P with AdamW's default scaled updates, then apply_masks).
Target: masked + RSST within 5 % of dense.

    python bench/bench_step.py [--steps 5] [--warmup 2] [--batch 64] [--threads N] [--record]

The three variants take turns within each repeat (so a change in machine load hits all
alike) and the median step is reported. The per-step extras (apply_masks, penalty step) are
also timed alone, which is steadier than a difference of two whole steps on a shared machine.
"""

from __future__ import annotations

import shlex
import statistics
import sys
import time

from common import apply_threads, bench_parser, machine, median_seconds, record

import torch
import torch.nn.functional as F

import pruning_utils as pu  # noqa: E402  (common puts the repository root on sys.path)
from models import create_model  # noqa: E402
from rsst import RSSTPenalty  # noqa: E402
from vit_pruning_utils import vit_unit_groups  # noqa: E402

TARGET = 0.05


def rsst_masks(model: torch.nn.Module) -> tuple[pu.Masks, pu.Masks, pu.Masks]:
    """(M, H, P) of an RSST state: M at 50 % density, R its head+neuron regroup,
    H = R or M, P = M and not R (nonempty)."""
    weights = pu.prunable_weights(model)
    ones = pu.ones_masks(model)
    imp = pu.global_magnitude_prune(weights, ones, pu.count_total(ones) // 2)
    target, _ = pu.regroup(vit_unit_groups(model, "both"), weights, imp, "magnitude")
    hard = {n: target[n] | imp[n] for n in imp}
    penalty = {n: imp[n] & ~target[n] for n in imp}
    return imp, hard, penalty


class Variant:
    """A model, its optimizer and what runs after each optimizer step."""

    def __init__(self, seed_state: dict, masks: pu.Masks | None, penalty: pu.Masks | None):
        self.model = create_model("vit_tiny", 100, 32)
        self.model.load_state_dict(seed_state)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.05)
        self.weights = pu.prunable_weights(self.model)
        self.masks = masks
        self.pen = (
            None
            if penalty is None
            else RSSTPenalty(self.weights, penalty, 1e-3, 1.0, "exp_custom_exponents", 4, 10_000, scale_updates=True)
        )
        if masks is not None:
            pu.apply_masks(self.weights, masks)

    def after_step(self) -> None:
        if self.pen is not None:
            self.pen.step()
        if self.masks is not None:
            pu.apply_masks(self.weights, self.masks)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.after_step()


def time_steps(variants: dict[str, Variant], batch: int, warmup: int, steps: int) -> dict[str, list[float]]:
    """Seconds of each timed training step per variant, the variants taking turns."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 100, (batch,), generator=g)
    times: dict[str, list[float]] = {n: [] for n in variants}
    for i in range(warmup + steps):
        for name, v in variants.items():
            t0 = time.perf_counter()
            v.step(x, y)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    a = p.parse_args(argv)
    apply_threads(a.threads)
    print(machine())
    torch.manual_seed(0)
    base = create_model("vit_tiny", 100, 32)
    imp, hard, penalty = rsst_masks(base)
    print(
        f"masked: M at {100 * pu.density(imp):.1f} % density; masked + RSST: H at {100 * pu.density(hard):.1f} %, "
        f"penalty on {pu.count_ones(penalty):,} weights"
    )
    state = base.state_dict()
    variants = {
        "dense": Variant(state, None, None),
        "masked": Variant(state, imp, None),
        "masked + RSST": Variant(state, hard, penalty),
    }
    times = time_steps(variants, a.batch, a.warmup, a.steps)
    step = {n: statistics.median(t) for n, t in times.items()}
    rsst = variants["masked + RSST"]
    extra = {
        "apply_masks": median_seconds(lambda: pu.apply_masks(rsst.weights, hard), 2, 20),
        "RSST penalty step": median_seconds(rsst.pen.step, 2, 20),
    }
    dense = step["dense"]
    fastest = {n: min(t) for n, t in times.items()}
    lines = ["| variant | median step s | overhead vs dense | fastest step s | overhead |", "|---|---|---|---|---|"]
    lines += [
        f"| {n} | {s:.3f} | {100 * (s / dense - 1):+.1f} % | {fastest[n]:.3f} | "
        f"{100 * (fastest[n] / fastest['dense'] - 1):+.1f} % |"
        for n, s in step.items()
    ]
    lines += [f"| {n} alone | {s:.4f} | {100 * s / dense:.2f} % of a dense step | | |" for n, s in extra.items()]
    alone = sum(extra.values()) / dense
    lines.append(
        f"\nvit_tiny, batch {a.batch}, AdamW, {a.steps} timed steps. Target masked + RSST within "
        f"{100 * TARGET:g} % of dense: whole-step difference {100 * (step['masked + RSST'] / dense - 1):+.1f} %, "
        f"extras timed alone {100 * alone:.2f} % ({'met' if alone <= TARGET else 'MISSED'})."
    )
    print("\n".join(lines), flush=True)
    if a.record:
        record("Training step under masks (CPU)", "python bench/bench_step.py " + shlex.join(sys.argv[1:]), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
