"""Mask pictures: units kept per layer across states (masks.png).

A unit is kept when any of its weights is alive in the state's hard mask (`pruning_utils.unit_alive`).
ViTs get two heatmaps (heads per block, MLP neurons per block), Vision Mambas two (SSM inner
channels and MLP neurons per block), CNNs one (channels per conv);
blocks or layers run along x, states along y, and every cell is annotated with its count.

    plot_masks("run/masks.png", "vit_tiny", [mask_state0, mask_state1], unit_kinds(model))
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

import pruning_utils as pu
from families import family_of_model
from reporting import pyplot

UnitKinds = dict[str, list[pu.UnitGroup]]  # "heads" / "neurons" / "channels" -> groups, one per layer
KIND_AXIS = {"heads": "block", "neurons": "block", "inner channels": "block", "channels": "conv layer"}


def unit_kinds(model: nn.Module) -> UnitKinds:
    """The unit groups drawn for `model`: heads and neurons per block (ViT) or channels per conv."""
    return family_of_model(model).unit_kinds(model)


def kept_by_state(kinds: UnitKinds, masks_by_state: list[dict[str, torch.Tensor]]) -> dict[str, list[list[int]]]:
    """For each unit kind, a [state][layer] table of units kept."""
    return {kind: [pu.units_kept(groups, m) for m in masks_by_state] for kind, groups in kinds.items()}


def _short_name(layer: str) -> str:
    """blocks.3.attn.qkv -> 3; layers.1.0.conv2 -> 1.0.conv2 (tick labels stay narrow)."""
    match = re.match(r"blocks\.(\d+)\.", layer)
    return match.group(1) if match else re.sub(r"^(layers|features)\.", "", layer)


def _draw_heatmap(ax, kind: str, groups: list[pu.UnitGroup], table: list[list[int]]):
    """One kind's [state][layer] counts as a heatmap coloured by the fraction kept; returns the image."""
    counts = torch.tensor(table, dtype=torch.float32)
    totals = torch.tensor([g.num_units for g in groups], dtype=torch.float32)
    image = ax.imshow(counts / totals, cmap="viridis", vmin=0, vmax=1, aspect="auto", origin="lower")
    small = len(groups) > 14 or len(table) > 14
    for s, row in enumerate(table):
        for j, n in enumerate(row):
            shade = "black" if n / totals[j] > 0.6 else "white"
            ax.text(j, s, str(n), ha="center", va="center", color=shade, fontsize=6 if small else 8)
    same_total = bool((totals == totals[0]).all())
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(
        [_short_name(g.layer) + ("" if same_total else f" /{g.num_units}") for g in groups],
        rotation=0 if KIND_AXIS[kind] == "block" else 90,
        fontsize=7,
    )
    ax.set_yticks(range(len(table)))
    ax.set_yticklabels([str(s) for s in range(len(table))], fontsize=7)
    of = f" (of {int(totals[0])})" if same_total else ""
    ax.set(xlabel=KIND_AXIS[kind], ylabel="state", title=f"{kind} kept per {KIND_AXIS[kind]}{of}")
    return image


def plot_masks(
    path: str, model_name: str, masks_by_state: list[dict[str, torch.Tensor]], units: nn.Module | UnitKinds
) -> dict[str, list[list[int]]]:
    """Write the heatmaps of units kept per layer across states to `path`; returns the counts.

    `masks_by_state[s]` is state s's hard mask; `units` is the model or its `unit_kinds(model)`
    (pass the groups when calling at every state end, they are cheap to reuse).
    """
    kinds = unit_kinds(units) if isinstance(units, nn.Module) else units
    table = kept_by_state(kinds, masks_by_state)
    plt = pyplot()
    widest = max(len(g) for g in kinds.values())
    height = 1.2 + 0.3 * max(len(masks_by_state), 3)
    fig, axes = plt.subplots(
        len(kinds),
        1,
        figsize=(max(6.0, 0.55 * widest + 2), height * len(kinds) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for ax, (kind, groups) in zip(axes[:, 0], kinds.items()):
        image = _draw_heatmap(ax, kind, groups, table[kind])
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="fraction kept", shrink=0.8)
    fig.suptitle(f"{model_name}: units kept per layer across states")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return table


def load_state_masks(run_dir: str) -> list[dict[str, torch.Tensor]]:
    """The hard mask of every finished state, from `{state}checkpoint.pth.tar`, in state order,
    up to the first missing or unreadable one (skipped with one warning line)."""
    from checkpoints import read_checkpoint, state_checkpoints

    found = state_checkpoints(run_dir)
    masks = []
    while len(masks) in found:  # states 0, 1, ... up to the first missing one
        ck = read_checkpoint(found[len(masks)])
        if ck is None:
            break
        masks.append(ck["mask"])
    return masks
