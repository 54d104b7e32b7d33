"""RSST: a growing L2 penalty that shrinks the weights the regroup will drop.

During state s >= 1 the weights in P = M and not R get, after every optimizer step,
`w <- w - lr0 * lambda(t) * w` with `lambda(t) = g * f((t+1)/T)` over the state's T steps.
`lr0` is the base learning rate, so a decaying schedule cannot cancel the penalty.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

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
    """The decoupled, growing penalty on the weights in `penalty_masks` (P) for one state."""

    def __init__(self, weights: dict[str, torch.Tensor], penalty_masks: dict[str, torch.Tensor],
                 lr0: float, strength: float, schedule: str, exponents: float, total_steps: int,
                 step: int = 0):
        names = [n for n, p in penalty_masks.items() if bool(p.any())]
        self.weights = [weights[n] for n in names]
        self.masks = [penalty_masks[n].to(weights[n].dtype) for n in names]
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
    def penalized_norm(self) -> float:
        """L2 norm of the weights currently under the penalty."""
        if not self.weights:
            return 0.0
        return float(torch.stack([(w * m).float().norm() for w, m in zip(self.weights, self.masks)]).norm())
