"""RSST: a growing L2 penalty that shrinks the weights the regroup will drop.

During state s >= 1 the weights in P = M and not R get, after every optimizer step,
`w <- w - lr0 * lambda(t) * w` with `lambda(t) = g * f((t+1)/T)` over the state's T steps.
`lr0` is the base learning rate, so a decaying schedule cannot cancel the penalty.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from pruning_utils import unit_alive

_E1 = math.e - 1.0

SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "x": lambda u, n: u,
    "x^2": lambda u, n: u ** 2,
    "x^3": lambda u, n: u ** 3,
    "exp": lambda u, n: (math.exp(u) - 1.0) / _E1,
    "exp_custom": lambda u, n: (math.exp(u) - 1.0) / _E1,
    "exp_custom_exponents": lambda u, n: (math.exp(u ** n) - 1.0) / _E1,
}


def reg_lambda(step: int, total_steps: int, strength: float, schedule: str, exponents: float = 4) -> float:
    """lambda at optimizer step `step` (0-based) of `total_steps`: reaches `strength` at the end."""
    u = min(1.0, (step + 1) / max(1, total_steps))
    return strength * SCHEDULES[schedule](u, exponents)


class RSSTPenalty:
    """The decoupled, growing penalty on the weights in `penalty_masks` (P) for one state.

    `extra` holds (tensor, 0/1 mask) pairs penalized the same way but not counted as pruned
    weights: the BatchNorm scale and shift of the CNN channels being dropped (see `norm_penalty`).
    """

    def __init__(self, weights: dict[str, torch.Tensor], penalty_masks: dict[str, torch.Tensor],
                 lr0: float, strength: float, schedule: str, exponents: float, total_steps: int,
                 step: int = 0, extra: list[tuple[torch.Tensor, torch.Tensor]] = ()):
        names = [n for n, p in penalty_masks.items() if bool(p.any())]
        self.weights = [weights[n] for n in names]
        self.masks = [penalty_masks[n].to(weights[n].dtype) for n in names]
        self.num_pruned = len(self.weights)  # the first entries are prunable weights (P)
        if self.weights:
            self.weights += [t for t, _ in extra]
            self.masks += [m.to(t.dtype) for t, m in extra]
        self.lr0, self.strength, self.schedule = lr0, strength, schedule
        self.exponents, self.total_steps, self.step_count = exponents, total_steps, step
        self.last_lambda = 0.0

    @property
    def active(self) -> bool:
        return bool(self.weights)

    def current_lambda(self) -> float:
        return reg_lambda(self.step_count, self.total_steps, self.strength, self.schedule, self.exponents)

    @torch.no_grad()
    def step(self) -> float:
        """Shrink the penalized weights by lr0 * lambda(t) and advance t; returns lambda(t)."""
        lam = self.current_lambda()
        if self.weights:
            # w <- w - lr0 * lam * (w * P), fused over all penalized weights
            torch._foreach_addcmul_(self.weights, self.weights, self.masks, value=-self.lr0 * lam)
        self.step_count += 1
        self.last_lambda = lam
        return lam

    @torch.no_grad()
    def remove(self) -> None:
        """Zero everything under the penalty: the end of an RSST state."""
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
    mode lags behind); shrinking the channel's BN scale and shift does."""
    out = []
    for g in groups:
        if g.norm is None:
            continue
        dropped = unit_alive(g, penalty_masks).float()
        if bool(dropped.any()):
            bn = modules[g.norm]
            out += [(bn.weight, dropped.to(bn.weight.device)), (bn.bias, dropped.to(bn.bias.device))]
    return out
