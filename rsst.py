"""RSST: a growing L2 penalty that fades out the weights the regroup drops, then removes them.

During state s >= 1 the weights in P = M and not R get, after each optimizer step t < t_end,
`w <- w - lr0 * lambda(t) * w`, with `lambda(t) = G * f((t+1) / t_end)` (decoupled, like AdamW's
weight decay; `lr0` is the base learning rate, so a decaying schedule cannot cancel it).

- calibrated (default): `t_end = round(reg_end * T)` of the state's T steps, and G is chosen so
  that the pure decay `prod_{t < t_end} (1 - lr0 * lambda(t))` equals `reg_target`, then
  multiplied by `--reg_granularity_prune`. The loop removes P at t_end and trains on under R.
- raw (the seed's meaning): G = `--reg_granularity_prune`, t_end = T; removal at the state end.

Scaled updates (`--reg_scale_updates`, default on for AdamW in calibrated mode): the optimizer's
own step on P is multiplied by the planned remaining norm `rho(t) = prod_{tau < t} (1 - lr0 *
lambda(tau))`. Adam normalizes gradients, so a fading weight still gets steps of about lr in
size, which hold it at ~lr / (lr0 * lambda) however small its gradient gets (SGD's steps shrink
with the gradient, which fades with the unit). With the scaling, P's weights are exactly
`rho(t) * z(t)`, where z follows the optimizer's steps unpenalized: the measured norm ratio at
removal is the target times the growth of z, whatever the optimizer and the state length.

`lr0 * lambda` is clamped to MAX_SHRINK, so one step never zeroes or flips a weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pruning_utils import extra_masks, mask_like, unit_alive

_E1 = np.e - 1.0
MAX_SHRINK = 0.999

SCHEDULES: dict[str, Callable] = {  # f(u, n) on [0, 1], f(1) = 1; works on floats and arrays
    "x": lambda u, n: u,
    "x^2": lambda u, n: u**2,
    "x^3": lambda u, n: u**3,
    "exp": lambda u, n: (np.exp(u) - 1.0) / _E1,
    "exp_custom": lambda u, n: (np.exp(u) - 1.0) / _E1,
    "exp_custom_exponents": lambda u, n: (np.exp(u**n) - 1.0) / _E1,
}


def reg_lambda(step: int, total_steps: int, strength: float, schedule: str, exponents: float = 4) -> float:
    """lambda at optimizer step `step` (0-based) of a ramp of `total_steps`: `strength` at its end."""
    u = min(1.0, (step + 1) / max(1, total_steps))
    return float(strength * SCHEDULES[schedule](u, exponents))


def shrink_factors(end_step: int, lr0: float, strength: float, schedule: str, exponents: float) -> np.ndarray:
    """`lr0 * lambda(t)` for t = 0 .. end_step-1 (float64), clamped to MAX_SHRINK."""
    u = np.arange(1, end_step + 1, dtype=np.float64) / max(1, end_step)
    return np.minimum(lr0 * strength * SCHEDULES[schedule](u, exponents), MAX_SHRINK)


def pure_decay_ratio(end_step: int, lr0: float, strength: float, schedule: str, exponents: float) -> float:
    """What the penalty alone leaves of a weight after `end_step` steps: prod(1 - lr0 * lambda(t))."""
    return float(np.exp(np.log1p(-shrink_factors(end_step, lr0, strength, schedule, exponents)).sum()))


def calibrate_strength(end_step: int, lr0: float, target: float, schedule: str, exponents: float) -> float:
    """The G whose pure decay over `end_step` steps equals `target` (0 < target < 1).

    The ratio depends on lr0 * G alone and falls monotonically from 1 (at 0) to 0 (at
    lr0 * G = 1, where the last factor vanishes), so bisection on x = lr0 * G in (0, 1) finds it.
    """
    u = np.arange(1, end_step + 1, dtype=np.float64) / max(1, end_step)
    f = SCHEDULES[schedule](u, exponents)
    log_target = np.log(target)
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.log1p(-mid * f).sum() > log_target:
            lo = mid
        else:
            hi = mid
    return lo / lr0


@dataclass(frozen=True)
class PenaltyPlan:
    """One RSST state's penalty: peak strength G, the step where the ramp ends and P is removed,
    the predicted pure-decay ratio there, and whether lr0 * lambda had to be clamped."""

    strength: float
    end_step: int
    predicted_ratio: float
    clamped: bool


def plan_penalty(
    mode: str,
    total_steps: int,
    lr0: float,
    g: float,
    schedule: str,
    exponents: float,
    target: float = 1e-3,
    reg_end: float = 0.5,
) -> PenaltyPlan:
    """`--reg_mode calibrated`: G = g * calibrated strength, removal at round(reg_end * T);
    `raw`: G = g, removal at the state end T."""
    if mode == "raw":
        end, strength = total_steps, g
    else:
        end = min(total_steps, max(1, round(reg_end * total_steps)))
        strength = g * calibrate_strength(end, lr0, target, schedule, exponents)
    clamped = bool(lr0 * strength * SCHEDULES[schedule](1.0, exponents) > MAX_SHRINK * (1 + 1e-9))
    return PenaltyPlan(strength, end, pure_decay_ratio(end, lr0, strength, schedule, exponents), clamped)


def describe_plan(
    plan: PenaltyPlan, mode: str, target: float, g: float, total_steps: int, scale_updates: bool = False
) -> list[str]:
    """The lines a state prints about its penalty before training (and its warnings)."""
    lines = [
        f"RSST ({mode}): lambda grows to {plan.strength:.4g} over steps 0-{plan.end_step} of {total_steps}, "
        f"then P is removed; predicted pure-decay norm ratio {plan.predicted_ratio:.3g}"
        + (f" (target {target:g})" if mode == "calibrated" else "")
        + ("; optimizer steps on P scaled by the planned norm" if scale_updates else "")
    ]
    if plan.clamped:
        lines.append(
            f"warning: lr0 * lambda reaches 1 with --reg_granularity_prune {g:g}; clamped to {MAX_SHRINK} per step"
        )
    if mode == "raw" and plan.predicted_ratio > 0.01:
        lines.append(
            f"warning: --reg_mode raw leaves {100 * plan.predicted_ratio:.1f}% of the penalized norm by pure "
            "decay: its removal is nearly a one-shot prune (--reg_mode calibrated fades it out)"
        )
    return lines


class RSSTPenalty:
    """The decoupled, growing penalty on the weights in `penalty_masks` (P) for one state.

    lambda ramps over the first `end_step` optimizer steps; `step()` does nothing after that
    (`done`), when the loop removes P. `extra` holds (tensor, 0/1 mask) pairs penalized the same
    way but not counted as pruned weights: the BatchNorm scale and shift of the CNN channels
    being dropped (see `norm_penalty`). With `scale_updates`, `step()` also scales the optimizer
    step taken since the previous call by rho(t) on the penalized entries; it keeps a copy of the
    penalized tensors for that (taken at construction: build the penalty on the weights the next
    optimizer step starts from).
    """

    def __init__(
        self,
        weights: dict[str, torch.Tensor],
        penalty_masks: dict[str, torch.Tensor],
        lr0: float,
        strength: float,
        schedule: str,
        exponents: float,
        end_step: int,
        step: int = 0,
        extra: list[tuple[torch.Tensor, torch.Tensor]] = (),
        last_lambda: float = 0.0,
        scale_updates: bool = False,
    ):
        names = [n for n, p in penalty_masks.items() if bool(p.any())]
        self.weights = [weights[n] for n in names]
        self.masks = [mask_like(penalty_masks[n], weights[n]) for n in names]
        self.num_pruned = len(self.weights)  # the first entries are prunable weights (P)
        if self.weights:
            self.weights += [t for t, _ in extra]
            self.masks += [m.to(t.dtype) for t, m in extra]
        self.lr0, self.strength, self.schedule = lr0, strength, schedule
        self.exponents, self.end_step, self.step_count = exponents, end_step, step
        self.last_lambda = last_lambda
        # rho[t] = the planned (pure-decay) norm fraction before step t; the same after a resume
        decay = 1.0 - shrink_factors(end_step, lr0, strength, schedule, exponents)
        self.rho = np.concatenate([[1.0], np.cumprod(decay)])
        self.prev = [w.detach().clone() for w in self.weights] if scale_updates and self.weights else None

    @property
    def active(self) -> bool:
        """True when this state penalizes anything (RSST, state >= 1, P not empty)."""
        return bool(self.weights)

    @property
    def done(self) -> bool:
        """The ramp is over: P is due for removal (or was removed)."""
        return self.step_count >= self.end_step

    def planned_ratio(self) -> float:
        """What the penalty alone would have left of P's norm by now: rho(t)."""
        return float(self.rho[min(self.step_count, self.end_step)])

    def current_lambda(self) -> float:
        return reg_lambda(self.step_count, self.end_step, self.strength, self.schedule, self.exponents)

    @torch.no_grad()
    def step(self) -> float:
        """Shrink the penalized weights by lr0 * lambda(t) and advance t; returns lambda(t)."""
        if self.done:
            return 0.0
        lam = self.current_lambda()
        if self.prev is not None:
            # w <- w - (1 - rho) * P * (w - w_prev): the optimizer's step on P, times rho(t)
            torch._foreach_sub_(self.prev, self.weights)
            torch._foreach_addcmul_(self.weights, self.prev, self.masks, value=1.0 - float(self.rho[self.step_count]))
        if self.weights:
            # w <- w - lr0 * lam * (w * P), fused over all penalized weights
            torch._foreach_addcmul_(self.weights, self.weights, self.masks, value=-min(self.lr0 * lam, MAX_SHRINK))
        if self.prev is not None:
            torch._foreach_copy_(self.prev, self.weights)
        self.step_count += 1
        self.last_lambda = lam
        return lam

    @torch.no_grad()
    def remove(self) -> None:
        """Zero everything under the penalty (P and its BN entries)."""
        self.prev = None
        if self.weights:
            torch._foreach_mul_(self.weights, [1 - m for m in self.masks])

    @torch.no_grad()
    def penalized_norm(self) -> float:
        """L2 norm of the prunable weights currently under the penalty (P)."""
        if not self.weights:
            return 0.0
        pairs = list(zip(self.weights, self.masks))[: self.num_pruned]
        return float(torch.stack([(w * m).float().norm() for w, m in pairs]).norm())


def norm_penalty(groups, modules: dict, penalty_masks: dict[str, torch.Tensor]) -> list[tuple]:
    """(BN weight, mask) and (BN bias, mask) for the channels a regroup drops while they still
    hold weights in P. A BatchNorm after a conv makes the filter's scale irrelevant, so
    shrinking the filter alone never fades the channel out (train mode renormalizes it, eval
    mode lags behind); shrinking the channel's BN scale and shift does. The units' `extras`
    (a Mamba channel's conv1d, A_log, D and dt bias entries) are shrunk with them, so the whole
    unit fades out before it is removed."""
    out = []
    for g in groups:
        dropped = unit_alive(g, penalty_masks)
        if not bool(dropped.any()):
            continue
        out += [(p, m.to(p.device)) for p, m in extra_masks(g, modules, dropped)]
        if g.norm is not None:
            bn, d = modules[g.norm], dropped.float()
            out += [(bn.weight, d.to(bn.weight.device)), (bn.bias, d.to(bn.bias.device))]
    return out
