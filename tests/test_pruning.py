"""Masks, global magnitude pruning, unit scoring/selection and the CNN/ViT regroup (CPU, tiny models)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn

import pruning_utils as pu
import vit_pruning_utils as vpu
from models import create_model

CRITERIA = ("remain", "magnitude", "l1", "l2", "saliency")


# ------------------------------------------------------------------------------ helpers
def tiny_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("res20s", 10, 32, width=4)


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("vit_tiny", 10, 32, depth=2)


def random_batches(n: int = 2, size: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def clone_dict(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in d.items()}


def randomized_like(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Fresh random weights of the same shapes (stands in for a round of training)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(w.shape, generator=g) for n, w in weights.items()}


def magnitude_mask(weights: dict[str, torch.Tensor], density: float) -> pu.Masks:
    """One global magnitude pruning from all-ones to `density`."""
    alive = {n: torch.ones_like(w) for n, w in weights.items()}
    keep = pu.imp_keep_count(pu.count_total(alive), 1.0 - density, 1)
    return pu.global_magnitude_prune(weights, alive, keep)


def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().flatten().float() for t in d.values()])


def kept_units(mask: torch.Tensor) -> torch.Tensor:
    """Bool per output channel of a conv mask: any weight kept."""
    return mask.reshape(mask.shape[0], -1).amax(1) > 0


def masks_equal(a: pu.Masks, b: pu.Masks) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# ------------------------------------------------------------------ magnitude pruning
@pytest.mark.parametrize(
    "total, rate, k, expected",
    [
        (1000, 0.2, 1, 800),
        (1000, 0.2, 2, 640),
        (1000, 0.2, 3, 512),
        (17534, 0.2, 4, 7182),
        (10, 0.5, 1, 5),
        (7, 0.4, 1, 4),
        (100, 0.0, 3, 100),
        (100, 1.0, 1, 0),
    ],
)
def test_imp_keep_count_is_rounded_compound_density(total, rate, k, expected):
    assert pu.imp_keep_count(total, rate, k) == expected
    assert abs(pu.imp_keep_count(total, rate, k) - total * (1 - rate) ** k) <= 0.5


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.9])
def test_global_magnitude_prune_keeps_exact_count(rate):
    weights = pu.prunable_weights(tiny_resnet())
    alive = {n: torch.ones_like(w) for n, w in weights.items()}
    keep = pu.imp_keep_count(pu.count_total(alive), rate, 1)
    new = pu.global_magnitude_prune(weights, alive, keep)
    assert pu.count_ones(new) == keep
    assert new.keys() == alive.keys()
    for n in alive:
        assert new[n].shape == weights[n].shape
        assert set(new[n].unique().tolist()) <= {0.0, 1.0}


def test_global_magnitude_prune_uses_one_threshold_across_layers():
    weights = clone_dict(pu.prunable_weights(tiny_resnet()))
    names = list(weights)
    weights[names[3]] *= 10.0  # a per-layer threshold would prune this layer like the others
    alive = magnitude_mask(randomized_like(weights, seed=1), 0.7)  # a non-trivial alive mask
    keep = pu.imp_keep_count(pu.count_total(alive), 0.5, 2)
    new = pu.global_magnitude_prune(weights, alive, keep)

    mag, a, m = flat(weights).abs(), flat(alive) > 0, flat(new) > 0
    dropped = a & ~m
    assert m.any() and dropped.any()
    assert mag[m].min() >= mag[dropped].max()
    # the scaled layer keeps (nearly) all its alive weights; the others lose many
    scaled_density = new[names[3]].sum() / alive[names[3]].sum()
    other_density = new[names[4]].sum() / alive[names[4]].sum()
    assert scaled_density > 0.95 and other_density < 0.75


def test_global_magnitude_prune_stays_inside_alive_mask():
    model = tiny_resnet()
    weights = pu.prunable_weights(model)
    alive = magnitude_mask(randomized_like(weights, seed=2), 0.6)
    # dead weights are made the largest: they must still not come back
    big = {n: torch.where(alive[n] > 0, w.detach(), 1e3 * torch.ones_like(w)) for n, w in weights.items()}
    new = pu.global_magnitude_prune(big, alive, pu.imp_keep_count(pu.count_total(alive), 0.2, 2))
    for n in alive:
        assert bool((new[n] <= alive[n]).all()), n


def test_global_magnitude_prune_iterations_follow_compound_density_and_nest():
    model = tiny_resnet()
    weights = pu.prunable_weights(model)
    total = sum(w.numel() for w in weights.values())
    masks = pu.ones_masks(model)
    for k in range(1, 5):
        trained = randomized_like(weights, seed=10 + k)  # weights change between states
        new = pu.global_magnitude_prune(trained, masks, pu.imp_keep_count(total, 0.2, k))
        assert abs(pu.density(new) - 0.8**k) <= 0.002, k
        assert all(bool((new[n] <= masks[n]).all()) for n in masks), k
        masks = new


def test_global_magnitude_prune_is_deterministic():
    weights = pu.prunable_weights(tiny_resnet())
    alive = magnitude_mask(randomized_like(weights, seed=3), 0.8)
    keep = pu.imp_keep_count(pu.count_total(alive), 0.2, 2)
    a = pu.global_magnitude_prune(weights, alive, keep)
    b = pu.global_magnitude_prune(clone_dict(weights), clone_dict(alive), keep)
    assert masks_equal(a, b)


@pytest.mark.parametrize("keep", [0, 1, 37, 500, 4000])
def test_global_magnitude_prune_ties_keep_exact_count(keep):
    weights = {"a": torch.ones(20, 10), "b": torch.ones(4, 2, 3, 3), "c": torch.full((300,), -1.0)}
    alive = {"a": torch.ones(20, 10), "b": torch.ones(4, 2, 3, 3), "c": (torch.arange(300) % 3 != 0).float()}
    n_alive = pu.count_ones(alive)
    new = pu.global_magnitude_prune(weights, alive, keep)
    assert pu.count_ones(new) == min(keep, n_alive)
    assert all(bool((new[n] <= alive[n]).all()) for n in alive)
    assert masks_equal(new, pu.global_magnitude_prune(weights, alive, keep))
    if 0 < keep < n_alive:  # ties go to the first alive weights in flat order
        kept = torch.nonzero(flat(new)).flatten()
        first = torch.nonzero(flat(alive)).flatten()[:keep]
        assert torch.equal(kept, first)


# ---------------------------------------------------------------------------- apply
def test_apply_masks_keeps_pruned_weights_zero_during_sgd():
    model = tiny_resnet()
    weights = pu.prunable_weights(model)
    masks = magnitude_mask(weights, 0.5)
    pu.apply_masks(weights, masks)
    before = clone_dict(weights)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()
    for x, y in random_batches(n=3, size=4, seed=5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        # without the mask the optimizer moves pruned weights (so the check below can fail)
        assert any(bool((w[masks[n] == 0] != 0).any()) for n, w in weights.items())
        pu.apply_masks(weights, masks)
    for n, w in weights.items():
        assert bool((w[masks[n] == 0] == 0).all()), n
    # the kept weights did train
    assert any(not torch.equal(w[masks[n] > 0], before[n][masks[n] > 0]) for n, w in weights.items())


# ------------------------------------------------------------------------ selection
@pytest.mark.parametrize(
    "d, n, f, expected",
    [
        (0.7, 3, 0.0, 2),
        (0.49, 3, 0.0, 1),
        (0.0, 3, 0.0, 1),
        (0.0, 64, 0.0, 1),
        (1.0, 3, 0.0, 3),
        (1.0, 64, 0.0, 64),
        (0.5, 10, 0.1, 6),
        (0.5, 10, 0.0, 5),
        (0.2, 10, 1.0, 10),
        (0.25, 4, 0.5, 3),
        (0.3, 768, 0.0, 230),
    ],
)
def test_unit_budget_cases(d, n, f, expected):
    assert pu.unit_budget(d, n, f) == expected


@pytest.mark.parametrize("n", [1, 3, 12, 64])
@pytest.mark.parametrize("f", [0.0, 0.1, 0.5, 1.0])
def test_unit_budget_matches_formula_and_clamp(n, f):
    for d in torch.linspace(0, 1, 41).tolist():
        expected = min(max(math.floor(d * n + (n - d * n) * f + 0.5), 1), n)
        assert pu.unit_budget(d, n, f) == expected, (d, n, f)


def test_select_layerwise_top_k_ties_to_lower_index():
    s = torch.tensor([1.0, 3.0, 3.0, 2.0, -math.inf])
    assert pu.select_layerwise(s, 1).tolist() == [False, True, False, False, False]
    assert pu.select_layerwise(s, 2).tolist() == [False, True, True, False, False]
    assert pu.select_layerwise(s, 3).tolist() == [False, True, True, True, False]
    assert pu.select_layerwise(torch.full((5,), 7.0), 2).tolist() == [True, True, False, False, False]


def test_select_global_normalizes_by_layer_mean():
    scores = {"a": torch.tensor([10.0, 20.0, 30.0]), "b": torch.tensor([1.0, 2.0, 3.0])}
    keep = pu.select_global(scores, {"a": 2, "b": 2})
    assert keep["a"].tolist() == [False, True, True]
    assert keep["b"].tolist() == [False, True, True]  # unnormalized, "a" would take all its units
    keep = pu.select_global(scores, {"a": 2, "b": 1})  # tie between layers: earlier layer wins
    assert keep["a"].tolist() == [False, True, True]
    assert keep["b"].tolist() == [False, False, True]


def test_select_global_keeps_one_unit_per_layer_and_total_budget():
    # after normalization every unit of "b" (1.0) ranks below the top of "a" (~1.25)
    scores = {
        "a": torch.tensor([1.0, 100.0, 100.0, 100.0, 100.0]),
        "b": torch.tensor([5.0, 5.0, 5.0]),
        "c": torch.tensor([0.1, 0.2]),
    }
    budgets = {"a": 3, "b": 1, "c": 1}
    keep = pu.select_global(scores, budgets)
    assert all(int(k.sum()) >= 1 for k in keep.values())
    assert sum(int(k.sum()) for k in keep.values()) == sum(budgets.values())
    assert keep["b"].tolist() == [True, False, False]
    assert keep["c"].tolist() == [False, True]
    assert keep["a"].tolist() == [False, True, True, True, False]


# ------------------------------------------------------------------------- criteria
class OneConv(nn.Module):
    """A single prunable conv whose output channels are scaled copies of one feature map."""

    def __init__(self, in_ch: int, out_ch: int, k: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, k, bias=False)
        self.fc = nn.Linear(out_ch, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))

    def prunable_layers(self) -> list[str]:
        return ["conv"]


def test_remain_and_magnitude_scores_count_only_alive_weights():
    torch.manual_seed(0)
    model = OneConv(2, 3, 2)  # 3 units of 8 weights
    w = torch.full((3, 8), 100.0)  # dead weights are huge: they must not count
    m = torch.zeros(3, 8)
    m[0, :] = 1
    w[0, :] = -0.5  # 8 alive, magnitude 4.0
    m[1, [1, 4, 6]] = 1
    w[1, [1, 4, 6]] = 2.0  # 3 alive, magnitude 6.0
    m[2, :5] = 1
    w[2, :5] = 0.1  # 5 alive, magnitude 0.5
    with torch.no_grad():
        model.conv.weight.copy_(w.view(3, 2, 2, 2))
    weights, masks = pu.prunable_weights(model), {"conv": m.view(3, 2, 2, 2)}
    (group,) = pu.channel_groups(model)
    assert group.num_units == 3
    remain = pu.CRITERIA["remain"](group, weights, masks, None)
    magnitude = pu.CRITERIA["magnitude"](group, weights, masks, None)
    assert torch.allclose(remain, torch.tensor([8.0, 3.0, 5.0]))
    assert torch.allclose(magnitude, torch.tensor([4.0, 6.0, 0.5]))
    # the regroup (density 16/24 of 3 units -> budget 2) keeps the top 2 by each criterion
    expected = {"remain": [True, False, True], "magnitude": [True, True, False]}
    for criterion, keep in expected.items():
        r, _ = pu.regroup([group], weights, masks, criterion, fillback_rate=0.0)
        assert kept_units(r["conv"]).tolist() == keep, criterion


def test_activation_scores_rank_channels_by_their_activation():
    torch.manual_seed(0)
    model = OneConv(2, 4, 1)
    scales = torch.tensor([1.0, -3.0, 2.0, 0.0])  # channel 1 has the largest |a|, channel 3 none
    with torch.no_grad():
        model.conv.weight.copy_(scales.view(4, 1, 1, 1).expand(4, 2, 1, 1))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(3, 2, 5, 5, generator=g), torch.randint(0, 3, (3,), generator=g)) for _ in range(2)]
    groups = pu.channel_groups(model)
    stats = pu.collect_activation_stats(model, groups, batches, "cpu", with_saliency=True)["conv"]

    s = torch.cat([x.sum(1).flatten() for x, _ in batches])  # every channel is scale * s
    assert torch.allclose(stats["l1"], scales.abs() * s.abs().mean(), rtol=1e-5)
    assert torch.allclose(stats["l2"], scales.abs() * s.pow(2).mean().sqrt(), rtol=1e-5)
    assert int(stats["l1"].argmax()) == 1 and int(stats["l2"].argmax()) == 1
    assert stats["l1"][3] == 0 and stats["l2"][3] == 0

    sal = stats["saliency"]
    assert sal.shape == (4,) and bool(torch.isfinite(sal).all()) and bool((sal >= 0).all())
    assert sal[3] == 0 and bool((sal[:3] > 0).all())
    ref, count = torch.zeros(4), 0
    for x, y in batches:  # mean |a * dL/da| by autograd
        a = model.conv(x)
        a.retain_grad()
        nn.functional.cross_entropy(model.fc(a.mean((2, 3))), y).backward()
        ref += (a * a.grad).abs().sum((0, 2, 3)).detach()
        count += a.shape[0] * a.shape[2] * a.shape[3]
    assert torch.allclose(sal, ref / count, rtol=1e-4, atol=1e-9)


def test_activation_stats_score_each_resnet_layer_with_its_own_output():
    model = tiny_resnet()
    groups = pu.channel_groups(model)
    batches = random_batches(n=2, size=4)
    stats = pu.collect_activation_stats(model, groups, batches, "cpu", with_saliency=False)

    modules = dict(model.named_modules())
    abs_sum, sq_sum, counts, handles = {}, {}, {}, []

    def make_hook(name):
        def hook(mod, args, out):
            a = out.detach().transpose(0, 1).reshape(out.shape[1], -1)
            abs_sum[name] = abs_sum.get(name, 0) + a.abs().sum(1)
            sq_sum[name] = sq_sum.get(name, 0) + a.pow(2).sum(1)
            counts[name] = counts.get(name, 0) + a.shape[1]

        return hook

    for g in groups:
        handles.append(modules[g.layer].register_forward_hook(make_hook(g.layer)))
    model.eval()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in handles:
        h.remove()

    assert set(stats) == set(model.prunable_layers())
    for g in groups:
        st = stats[g.layer]
        assert st["l1"].shape == (modules[g.layer].out_channels,)
        assert torch.allclose(st["l1"], abs_sum[g.layer] / counts[g.layer], rtol=1e-4), g.layer
        assert torch.allclose(st["l2"], (sq_sum[g.layer] / counts[g.layer]).sqrt(), rtol=1e-4), g.layer
    # layers of the same width do not share one feature map
    same_width = [g.layer for g in groups if g.num_units == groups[0].num_units]
    assert len(same_width) >= 2
    for a, b in zip(same_width, same_width[1:]):
        assert not torch.allclose(stats[a]["l1"], stats[b]["l1"]), (a, b)


def test_collect_activation_stats_restores_mode_and_clears_grads():
    model = tiny_resnet()
    model.train()
    stats = pu.collect_activation_stats(model, pu.channel_groups(model), random_batches(1), "cpu", with_saliency=True)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    for st in stats.values():
        assert bool(torch.isfinite(st["saliency"]).all()) and bool((st["saliency"] >= 0).all())
        assert float(st["saliency"].sum()) > 0
    # no hooks left behind
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------- CNN regroup
@pytest.fixture(scope="module")
def cnn_case():
    model = tiny_resnet()
    weights = pu.prunable_weights(model)
    masks = magnitude_mask(weights, 0.5)
    groups = pu.channel_groups(model)
    stats = pu.collect_activation_stats(model, groups, random_batches(), "cpu", with_saliency=True)
    return model, weights, masks, groups, stats


def test_channel_groups_cover_every_prunable_conv(cnn_case):
    model, weights, _, groups, _ = cnn_case
    assert [g.layer for g in groups] == model.prunable_layers()
    for g in groups:
        assert g.kind == "channel" and g.num_units == weights[g.layer].shape[0]


@pytest.mark.parametrize("criterion", CRITERIA)
def test_regroup_cnn_makes_whole_channels(cnn_case, criterion):
    _, weights, masks, groups, stats = cnn_case
    assert not pu.units_all_or_nothing(groups, masks)  # M is unstructured
    r, reports = pu.regroup(groups, weights, clone_dict(masks), criterion, stats)
    assert pu.units_all_or_nothing(groups, r)
    assert r.keys() == masks.keys()
    for g, rep in zip(groups, reports):
        assert rep["layer"] == g.layer
        assert rep["kept"] == int(kept_units(r[g.layer]).sum()) >= 1


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("fillback", [0.0, 0.3])
def test_regroup_cnn_layerwise_budget(cnn_case, criterion, fillback):
    _, weights, masks, groups, stats = cnn_case
    r, _ = pu.regroup(groups, weights, masks, criterion, stats, fillback_rate=fillback)
    for g in groups:
        d = float(masks[g.layer].float().mean())
        assert int(kept_units(r[g.layer]).sum()) == pu.unit_budget(d, g.num_units, fillback), g.layer


@pytest.mark.parametrize("criterion", CRITERIA)
def test_regroup_cnn_returns_new_mask_and_leaves_input_unchanged(cnn_case, criterion):
    _, weights, masks, groups, stats = cnn_case
    m = clone_dict(masks)
    r, _ = pu.regroup(groups, weights, m, criterion, stats)
    assert masks_equal(m, masks)
    assert r is not m and all(r[n] is not m[n] for n in m)
    penalty = {n: m[n].float() * (1 - r[n].float()) for n in m}
    assert pu.count_ones(penalty) > 0  # P = M and not R: what RSST regularizes


@pytest.mark.parametrize("criterion", CRITERIA)
def test_regroup_cnn_is_deterministic(cnn_case, criterion):
    _, weights, masks, groups, stats = cnn_case
    a, _ = pu.regroup(groups, weights, masks, criterion, stats)
    b, _ = pu.regroup(groups, weights, clone_dict(masks), criterion, stats)
    assert masks_equal(a, b)


def test_regroup_cnn_ties_go_to_lower_channel_index(cnn_case):
    _, weights, masks, groups, _ = cnn_case
    m = clone_dict(masks)
    layer = groups[4].layer
    m[layer] = torch.zeros_like(m[layer])
    m[layer][:, : m[layer].shape[1] // 2] = 1  # every channel: the same count of alive weights
    d = float(m[layer].float().mean())
    k = pu.unit_budget(d, m[layer].shape[0], 0.0)
    assert 1 <= k < m[layer].shape[0]
    r, _ = pu.regroup(groups, weights, m, "remain")
    keep = kept_units(r[layer])
    assert keep.tolist() == [i < k for i in range(keep.numel())]
    assert pu.units_all_or_nothing(groups, r)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_regroup_never_refills_units_with_nothing_alive(cnn_case, criterion):
    _, weights, masks, groups, stats = cnn_case
    m = clone_dict(masks)
    layer = groups[2].layer
    m[layer][:2] = 0  # channels 0 and 1 of this layer are fully pruned
    r, _ = pu.regroup(groups, weights, m, criterion, stats, fillback_rate=1.0)
    keep = kept_units(r[layer])
    assert not keep[0] and not keep[1] and bool(keep[2:].all())


@pytest.mark.parametrize("criterion", CRITERIA)
def test_regroup_cnn_global_keeps_a_unit_in_every_layer_at_low_density(cnn_case, criterion):
    _, weights, _, groups, stats = cnn_case
    w = clone_dict(weights)
    small = groups[-1].layer
    w[small] *= 1e-3  # this layer loses (nearly) everything in the global magnitude prune
    m = magnitude_mask(w, 0.02)
    assert float(m[small].sum()) <= 1
    r, _ = pu.regroup(groups, w, m, criterion, stats, sorting_mode="global")
    assert pu.units_all_or_nothing(groups, r)
    budgets = 0
    for g in groups:
        n_alive = int(pu.unit_alive(g, m).sum())
        budgets += min(pu.unit_budget(float(m[g.layer].float().mean()), g.num_units, 0.0), max(1, n_alive))
        assert int(kept_units(r[g.layer]).sum()) >= 1, g.layer
    assert sum(int(kept_units(r[g.layer]).sum()) for g in groups) == budgets


# ---------------------------------------------------------------------- ViT regroup
@pytest.fixture(scope="module")
def vit_case():
    model = tiny_vit()
    weights = pu.prunable_weights(model)
    masks = magnitude_mask(weights, 0.6)
    groups = vpu.vit_unit_groups(model, "both")
    stats = pu.collect_activation_stats(model, groups, random_batches(n=1, size=2), "cpu", with_saliency=True)
    return model, weights, masks, groups, stats


def test_vit_unit_groups_by_target(vit_case):
    model = vit_case[0]
    heads, neurons = vpu.head_groups(model), vpu.neuron_groups(model)
    assert [g.layer for g in heads] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert [g.layer for g in neurons] == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    for i, g in enumerate(heads):
        assert g.kind == "head" and g.num_units == 3
        assert [m.name for m in g.members] == [f"blocks.{i}.attn.qkv", f"blocks.{i}.attn.proj"]
    for i, g in enumerate(neurons):
        assert g.kind == "neuron" and g.num_units == 384
        assert [m.name for m in g.members] == [f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2"]
    assert vpu.vit_unit_groups(model, "head") == heads
    assert vpu.vit_unit_groups(model, "mlp") == neurons
    assert vpu.vit_unit_groups(model, "both") == heads + neurons
    with pytest.raises(ValueError):
        vpu.vit_unit_groups(model, "channel")


def head_slices(model, r: pu.Masks, block: int) -> list[torch.Tensor]:
    """Per head: its qkv rows (q, k and v thirds) and proj input columns, flattened together."""
    layout = model.blocks_layout()[block]
    qkv, proj = r[layout.qkv], r[layout.proj]
    c, hd = qkv.shape[1], layout.head_dim
    out = []
    for h in range(layout.num_heads):
        parts = [qkv[t * c + h * hd : t * c + (h + 1) * hd] for t in range(3)] + [proj[:, h * hd : (h + 1) * hd]]
        out.append(torch.cat([p.flatten() for p in parts]))
    return out


def test_vit_head_scores_cover_qkv_rows_and_proj_columns(vit_case):
    model, weights, masks, _, _ = vit_case
    for block, g in enumerate(vpu.head_groups(model)):
        w = head_slices(model, {n: weights[n].detach() for n in weights}, block)
        m = head_slices(model, masks, block)
        remain = pu.CRITERIA["remain"](g, weights, masks, None)
        magnitude = pu.CRITERIA["magnitude"](g, weights, masks, None)
        assert torch.allclose(remain, torch.stack([mi.float().sum() for mi in m]))
        assert torch.allclose(magnitude, torch.stack([(wi.abs() * mi).sum() for wi, mi in zip(w, m)]), rtol=1e-4)


def test_vit_activation_stats_use_proj_input_heads_and_fc2_input_neurons(vit_case):
    model, _, _, groups, stats = vit_case
    modules = dict(model.named_modules())
    seen, handles = {}, []
    for b in model.blocks_layout():
        for name in (b.proj, b.fc2):
            handles.append(
                modules[name].register_forward_pre_hook(
                    lambda mod, args, name=name: seen.__setitem__(name, args[0].detach())
                )
            )
    model.eval()
    with torch.no_grad():
        model(random_batches(n=1, size=2)[0][0])
    for h in handles:
        h.remove()
    for b in model.blocks_layout():
        a = seen[b.proj]
        per_head = a.reshape(-1, b.num_heads, b.head_dim).abs().mean((0, 2))
        assert torch.allclose(stats[b.qkv]["l1"], per_head, rtol=1e-4), b.qkv
        per_neuron = seen[b.fc2].reshape(-1, seen[b.fc2].shape[-1])
        assert torch.allclose(stats[b.fc1]["l1"], per_neuron.abs().mean(0), rtol=1e-4, atol=1e-7), b.fc1
        assert torch.allclose(stats[b.fc1]["l2"], per_neuron.pow(2).mean(0).sqrt(), rtol=1e-4, atol=1e-7)
    for g in groups:
        sal = stats[g.layer]["saliency"]
        assert sal.shape == (g.num_units,) and bool(torch.isfinite(sal).all()) and bool((sal >= 0).all())


@pytest.mark.parametrize("criterion", CRITERIA)
def test_vit_regroup_both_makes_whole_heads_and_neurons(vit_case, criterion):
    model, weights, masks, groups, stats = vit_case
    m = clone_dict(masks)
    r, _ = pu.regroup(groups, weights, m, criterion, stats)
    assert masks_equal(m, masks)
    assert pu.units_all_or_nothing(groups, r)
    for block, b in enumerate(model.blocks_layout()):
        kept = []
        for h, s in enumerate(head_slices(model, r, block)):
            assert bool((s == 0).all() | (s == 1).all()), (b.qkv, h)
            kept.append(bool(s[0]))
        assert sum(kept) >= 1
        assert sum(kept) == pu.unit_budget(float(masks[b.qkv].float().mean()), b.num_heads, 0.0)
        sparsity = 1 - float(r[b.qkv].float().mean())
        assert abs(sparsity * 3 - round(sparsity * 3)) < 1e-6
        fc1, fc2 = r[b.fc1], r[b.fc2]
        rows, cols = fc1.amax(1), fc2.amax(0)
        assert torch.equal(fc1, rows[:, None].expand_as(fc1))
        assert torch.equal(fc2, cols[None, :].expand_as(fc2))
        assert torch.equal(rows, cols)
        assert int(rows.sum()) == pu.unit_budget(float(masks[b.fc1].float().mean()), fc1.shape[0], 0.0)
    assert pu.count_ones({n: m[n].float() * (1 - r[n].float()) for n in m}) > 0


@pytest.mark.parametrize("target, untouched", [("head", ("fc1", "fc2")), ("mlp", ("qkv", "proj"))])
def test_vit_regroup_leaves_the_other_unit_kind_unstructured(vit_case, target, untouched):
    model, weights, masks, _, stats = vit_case
    r, _ = pu.regroup(vpu.vit_unit_groups(model, target), weights, masks, "l1", stats)
    for b in model.blocks_layout():
        for attr in untouched:
            name = getattr(b, attr)
            assert torch.equal(r[name], masks[name]), name
        structured = {"head": b.qkv, "mlp": b.fc1}[target]
        assert not torch.equal(r[structured], masks[structured])


@pytest.mark.parametrize("criterion", ("magnitude", "l1"))
@pytest.mark.parametrize("sorting", ("layerwise", "global"))
def test_vit_regroup_keeps_a_unit_of_each_kind_per_layer_at_low_density(vit_case, criterion, sorting):
    model, weights, _, groups, stats = vit_case
    w = clone_dict(weights)
    w["blocks.1.attn.qkv"] *= 1e-3
    w["blocks.1.attn.proj"] *= 1e-3
    m = magnitude_mask(w, 0.05)
    assert float(m["blocks.1.attn.qkv"].float().mean()) < 0.01
    r, _ = pu.regroup(groups, w, m, criterion, stats, sorting_mode=sorting)
    assert pu.units_all_or_nothing(groups, r)
    for kind in ("head", "neuron"):
        kept, budget = 0, 0
        for g in (g for g in groups if g.kind == kind):
            n = int(pu.unit_alive(g, r).sum())
            assert n >= 1, g.layer
            kept += n
            budget += min(
                pu.unit_budget(float(m[g.layer].float().mean()), g.num_units, 0.0),
                max(1, int(pu.unit_alive(g, m).sum())),
            )
        assert kept == budget, kind


def test_head_report_lists_every_qkv_layer(vit_case):
    model, weights, masks, groups, stats = vit_case
    _, reports = pu.regroup(groups, weights, masks, "l1", stats)
    text = vpu.head_report(model, reports)
    assert "Layer: blocks.0.attn.qkv" in text and "Layer: blocks.1.attn.qkv" in text
    assert text.count("Layer: ") == 2  # neuron groups are not reported
    assert "Shape: torch.Size([576, 192])" in text
    assert "Num heads: 3, Head dim: 64" in text and "Embed dim: 192" in text
    assert "head-level" in text
    new = re.findall(r"New sparsity: ([0-9.]+)% \(head-level\)", text)
    assert len(new) == 2 and all(v in ("0.00", "33.33", "66.67") for v in new)
    for rep in (r for r in reports if r["kind"] == "head"):
        assert f"Keeping {rep['kept']}/3 heads:" in text
