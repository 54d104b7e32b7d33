"""ViT quasi-structured regroup: attention heads and MLP neurons as whole units.

Head `h` of a block owns rows [h*hd, (h+1)*hd) of each of the q, k and v thirds of
`attn.qkv.weight` (timm layout: rows are [3, heads, head_dim]) and the same input columns of
`attn.proj.weight`; it is scored by its slice of the attention output entering `proj`.
MLP neuron `j` owns row j of `mlp.fc1.weight` and column j of `mlp.fc2.weight`; it is scored by
the fc1 output after the activation (the input of fc2). The model keeps its shape; a kept
head is all ones and a dropped head all zeros, so the pruned model can be exported smaller.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pruning_utils import Member, UnitGroup, prunable_weights

VIT_TARGETS = ("head", "mlp", "both")


def head_groups(model: nn.Module) -> list[UnitGroup]:
    """One group per block: its heads across qkv rows and proj input columns."""
    weights = prunable_weights(model)
    groups = []
    for b in model.blocks_layout():
        qkv, proj = weights[b.qkv], weights[b.proj]
        h, hd = b.num_heads, b.head_dim
        members = (Member(b.qkv, (3, h, hd * qkv.shape[1]), 1), Member(b.proj, (proj.shape[0], h, hd), 1))
        groups.append(UnitGroup(b.qkv, "head", h, members, b.proj, True, -1))
    return groups


def neuron_groups(model: nn.Module) -> list[UnitGroup]:
    """One group per block: MLP hidden neurons across fc1 rows and fc2 columns."""
    weights = prunable_weights(model)
    groups = []
    for b in model.blocks_layout():
        fc1, fc2 = weights[b.fc1], weights[b.fc2]
        n = fc1.shape[0]
        members = (Member(b.fc1, tuple(fc1.shape), 0), Member(b.fc2, tuple(fc2.shape), 1))
        groups.append(UnitGroup(b.fc1, "neuron", n, members, b.fc2, True, -1))
    return groups


def vit_unit_groups(model: nn.Module, target: str) -> list[UnitGroup]:
    """The unit groups `--vit_prune_target` regroups: heads, MLP neurons, or both."""
    if target not in VIT_TARGETS:
        raise ValueError(f"vit_prune_target {target!r}; choose from {', '.join(VIT_TARGETS)}")
    groups = head_groups(model) if target in ("head", "both") else []
    return groups + (neuron_groups(model) if target in ("mlp", "both") else [])


def head_report(model: nn.Module, reports: list[dict]) -> str:
    """The per-qkv-layer block of ALGORITHM.md for every head group in `reports`."""
    weights = prunable_weights(model)
    layouts = {b.qkv: b for b in model.blocks_layout()}
    lines = []
    for r in reports:
        if r["kind"] != "head":
            continue
        b = layouts[r["layer"]]
        scores = " ".join(f"{float(s):.2f}" for s in r["scores"])
        order = torch.argsort(-r["scores"].float(), stable=True).tolist()
        kept = " ".join(str(i) for i in order if bool(r["keep"][i]))
        lines += [
            f"Layer: {r['layer']}",
            f"  Shape: {weights[r['layer']].shape}",
            f"  Num heads: {b.num_heads}, Head dim: {b.head_dim}, Embed dim: {weights[r['layer']].shape[1]}",
            f"  Head importance: [{scores}]",
            f"  Keeping {r['kept']}/{b.num_heads} heads: [{kept}]",
            f"  Original sparsity: {100 * (1 - r['density_before']):.2f}%",
            f"  New sparsity: {100 * (1 - r['density_after']):.2f}% (head-level)",
        ]
    return "\n".join(lines)
