"""The Vision Mamba family (families.py): inner channels and MLP neurons, the ViT recipe.

Mamba regroups by default, as CNNs do (`--unstructured` gives plain IMP); `--mamba_prune_target`
chooses the unit kinds. Imports no torch at import time (the command line looks families up
before torch loads); the unit groups and the compaction load on first use.
"""

from __future__ import annotations

from families import Family, depth_kwargs, register
from models import MODELS


def _groups(model, args):
    from mamba_pruning_utils import mamba_unit_groups

    return mamba_unit_groups(model, getattr(args, "mamba_prune_target", None) or "both")


def _kinds(model):
    from mamba_pruning_utils import channel_groups, neuron_groups

    return {"inner channels": channel_groups(model), "neurons": neuron_groups(model)}


def _compact(model, masks, sd, index, silent=False):
    from compact_mamba import compact_mamba

    return compact_mamba(model, masks, sd, index, silent)


def _resize(model, desc):
    from compact_mamba import resize_mamba

    resize_mamba(model, desc)


def _describe(desc: dict, model) -> str:
    inner, hidden = model.blocks[0].mixer.d_inner, model.blocks[0].mlp.fc1.out_features
    return (
        "SSM inner channels kept per block: "
        + " ".join(f"{c}/{inner}" for c in desc["d_inner"])
        + "\nMLP neurons kept per block: "
        + " ".join(f"{n}/{hidden}" for n in desc["mlp_hidden"])
    )


def _fit(model, sd):
    from models.mamba import fit_mamba_state_dict

    return fit_mamba_state_dict(model, sd)


def _model_kwargs(args) -> dict:
    kw = depth_kwargs(args)
    direction = getattr(args, "mamba_direction", None)
    return {**kw, "direction": direction} if direction and direction != "bidirectional" else kw


MAMBA = register(
    Family(
        name="mamba",
        matches=lambda arch: MODELS.get(arch) == "mamba",
        owns=lambda model: hasattr(model, "mamba_layout"),
        recipe="vit",
        finetune_recipe="vit_finetune",
        strong_augment=True,
        channels_last=False,
        regroups_by_default=True,
        vit_flags=False,
        unit_groups=_groups,
        unit_kinds=_kinds,
        compact_units=_compact,
        resize=_resize,
        describe=_describe,
        fit_weights=_fit,
        model_kwargs=_model_kwargs,
    )
)
