"""The fast exact selection behind global magnitude pruning, at sizes where it takes effect."""

from __future__ import annotations

import pytest
import torch

import pruning_utils as pu

N = 1_200_000  # above 16 * 65536: the sampled bracket is used


def reference_prune(weights: dict, alive: dict, keep: int) -> dict:
    """Stable sort by |w| (alive only), ties to the lower flat index, as the spec says."""
    mag = torch.cat([w.abs().flatten() for w in weights.values()])
    live = torch.cat([a.flatten() for a in alive.values()]) > 0
    order = torch.argsort(torch.where(live, mag, -1.0), descending=True, stable=True)
    flat = torch.zeros(mag.numel())
    flat[order[: min(keep, int(live.sum()))]] = 1.0
    return dict(
        zip(
            weights, (p.view_as(w) for p, w in zip(flat.split([w.numel() for w in weights.values()]), weights.values()))
        )
    )


@pytest.mark.parametrize("quantized", [False, True])
def test_global_magnitude_prune_matches_sorted_reference_on_large_layers(quantized):
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (600, 1000), "b": (300, 64, 3, 3), "c": (250_000,)}
    weights = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    if quantized:  # many ties at the threshold
        weights = {n: (w * 4).round() for n, w in weights.items()}
    alive = {n: (torch.rand(s, generator=g) < 0.8).float() for n, s in shapes.items()}
    keep = pu.imp_keep_count(pu.count_ones(alive), 0.3, 1)
    new = pu.global_magnitude_prune(weights, alive, keep)
    assert pu.count_ones(new) == keep
    ref = reference_prune(weights, alive, keep)
    assert all(new[n].dtype == torch.bool and torch.equal(new[n].float(), ref[n]) for n in shapes)


@pytest.mark.parametrize("keep", [1, 17, N // 5, N // 2, N - 3, N])
@pytest.mark.parametrize("kind", ["normal", "ties", "sorted", "sample_misses", "dead_nonzero"])
def test_global_prune_matches_the_reference_for_any_budget_and_data(kind, keep):
    """Exact top-`keep` by |w| among the alive weights, ties to the lower flat index, whether the
    sampled bracket holds the threshold or misses it (then the exact fallback runs)."""
    g = torch.Generator().manual_seed(keep)
    values = {
        "normal": torch.randn(N, generator=g),
        "ties": torch.randint(0, 7, (N,), generator=g).float(),
        "sorted": torch.linspace(-1, 1, N),
        "sample_misses": torch.randn(N, generator=g),
        "dead_nonzero": torch.randn(N, generator=g) * 10,
    }[kind]
    if kind == "sample_misses":  # every sampled entry is an outlier: the bracket misses
        values[:: N // 65536] = 100.0
    weights = {"a": values[: N // 3].view(-1, 100), "b": values[N // 3 :].clone()}
    alive = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    if kind == "dead_nonzero":  # dead weights keep large values: they must never be chosen
        alive = {n: torch.rand(w.shape, generator=g) < 0.7 for n, w in weights.items()}
    keep = min(keep, pu.count_ones(alive))
    new = pu.global_magnitude_prune(weights, alive, keep)
    assert pu.count_ones(new) == keep
    ref = reference_prune(weights, {n: m.float() for n, m in alive.items()}, keep)
    assert all(torch.equal(new[n].float(), ref[n]) for n in weights)
