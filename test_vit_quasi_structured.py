"""ViT quasi-structured pruning checks, on CPU, in seconds.

Run directly (`python test_vit_quasi_structured.py`: exits non-zero on any failure and ends
with the five-line summary) or through pytest (it is collected with the tests/ folder).
"""

from __future__ import annotations

import sys

import torch

import pruning_utils as pu
from models import create_model
from vit_pruning_utils import head_report, vit_unit_groups

RATE = 0.3


def _trained_like_vit(depth: int = 2):
    """A small vit_tiny (3 heads of 64) with weights perturbed away from init, and a batch."""
    torch.manual_seed(0)
    model = create_model("vit_tiny", 10, 32, depth=depth).eval()
    with torch.no_grad():
        for w in pu.prunable_weights(model).values():
            w.add_(torch.randn_like(w) * 0.02 * torch.rand(w.shape[0], 1))
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    return model, (x, y)


def _imp_mask(model):
    weights = pu.prunable_weights(model)
    ones = pu.ones_masks(model)
    return weights, pu.global_magnitude_prune(weights, ones, pu.imp_keep_count(pu.count_total(ones), RATE, 1))


def _head_slices(mask_qkv, mask_proj, h, hd):
    """All mask entries of head h: its q, k and v rows of qkv and its proj input columns."""
    c = mask_qkv.shape[1]
    rows = [mask_qkv[t * c + h * hd : t * c + (h + 1) * hd] for t in range(3)]
    return torch.cat([r.flatten() for r in rows] + [mask_proj[:, h * hd : (h + 1) * hd].flatten()])


def _regroup(model, batch, criterion, target="head"):
    weights, imp = _imp_mask(model)
    groups = vit_unit_groups(model, target)
    stats = None
    if criterion in pu.ACTIVATION_CRITERIA:
        stats = pu.collect_activation_stats(model, groups, [batch], "cpu", criterion == "saliency")
    target_masks, reports = pu.regroup(groups, weights, imp, criterion, stats)
    return imp, target_masks, reports


def test_1_global_l1_elementwise_pruning_reaches_density():
    model, _ = _trained_like_vit()
    weights, imp = _imp_mask(model)
    assert abs(pu.density(imp) - (1 - RATE)) < 1e-3
    kept = torch.cat([weights[n].abs()[imp[n] > 0] for n in imp])
    dropped = torch.cat([weights[n].abs()[imp[n] == 0] for n in imp])
    assert kept.min() >= dropped.max()  # one global threshold across layers
    layer_density = [float(m.float().mean()) for m in imp.values()]
    assert max(layer_density) - min(layer_density) > 1e-3  # element-wise, not uniform per layer


def test_2_head_regroup_masks_every_qkv_and_proj():
    model, batch = _trained_like_vit()
    _, target, reports = _regroup(model, batch, "magnitude")
    for b in model.blocks_layout():
        assert b.qkv in target and b.proj in target
    assert len([r for r in reports if r["kind"] == "head"]) == len(model.blocks_layout())
    text = head_report(model, reports)
    assert "Layer: blocks.0.attn.qkv" in text and "(head-level)" in text


def test_3_all_five_criteria_give_valid_masks():
    model, batch = _trained_like_vit()
    for criterion in ("remain", "magnitude", "l1", "l2", "saliency"):
        imp, target, reports = _regroup(model, batch, criterion, target="both")
        for n, m in target.items():
            assert m.shape == imp[n].shape
            assert bool(((m == 0) | (m == 1)).all())
        for r in reports:
            assert torch.isfinite(r["scores"]).all() and 1 <= r["kept"] <= r["num_units"]
        assert pu.units_all_or_nothing(vit_unit_groups(model, "both"), target)


def test_4_every_head_is_all_zero_or_all_one():
    model, batch = _trained_like_vit()
    for criterion in ("magnitude", "saliency"):
        _, target, _ = _regroup(model, batch, criterion)
        for b in model.blocks_layout():
            heads_kept = 0
            for h in range(b.num_heads):
                s = _head_slices(target[b.qkv], target[b.proj], h, b.head_dim)
                assert bool((s == 0).all() or (s == 1).all()), f"{b.qkv} head {h} is mixed"
                heads_kept += int(s[0])
            assert heads_kept >= 1
            sparsity = 1 - float(target[b.qkv].float().mean())
            assert abs(sparsity * b.num_heads - round(sparsity * b.num_heads)) < 1e-6


def test_5_mask_shapes_match_and_penalty_set_is_usable():
    model, batch = _trained_like_vit()
    imp, target, _ = _regroup(model, batch, "magnitude")
    weights = pu.prunable_weights(model)
    penalty = {n: imp[n] & ~target[n] for n in imp}
    for n, w in weights.items():
        assert target[n].shape == w.shape == penalty[n].shape
        assert bool((penalty[n] <= imp[n]).all())  # P is inside the current mask M
        assert not bool((penalty[n] * target[n]).any())  # P holds only weights R drops
    assert pu.count_ones(penalty) > 0


SUMMARY = """All tests passed
  1. global L1 pruning (element-wise) OK
  2. head-level quasi-structured mask regroup OK
  3. all 5 criteria supported
  4. masks are head-level (each head all 0 or all 1)
  5. mask shapes match; usable for regularization"""


def main() -> int:
    tests = [
        test_1_global_l1_elementwise_pruning_reaches_density,
        test_2_head_regroup_masks_every_qkv_and_proj,
        test_3_all_five_criteria_give_valid_masks,
        test_4_every_head_is_all_zero_or_all_one,
        test_5_mask_shapes_match_and_penalty_set_is_usable,
    ]
    failed = 0
    for t in tests:
        try:
            t()
            print(f"PASS {t.__name__}")
        except AssertionError as e:
            failed += 1
            print(f"FAIL {t.__name__}: {e}")
    if failed:
        print(f"{failed} of {len(tests)} tests failed")
        return 1
    print(SUMMARY)
    return 0


if __name__ == "__main__":
    sys.exit(main())
