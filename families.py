"""Model families: everything the search does differently for ViTs, CNNs (and, once added, Mamba).

The state loop, the regroup, export, masks.png, compact training and the command line ask the
family of an arch (`family_of`) or of a built model (`family_of_model`) instead of branching on
the arch name. A family is a frozen `Family`; the registered ones are `FAMILIES`.

Adding a family: define `MY = Family(...)` in its own module, call `register(MY)` there, and add
that module's name to `FAMILY_MODULES` below (one line). Modules load on the first lookup.
This module imports no torch at import time (the command line validates before torch loads).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from models import MODELS, TIMM_PREFIX

FAMILY_MODULES: tuple[str, ...] = ("mamba_family",)  # modules that define and register further families


def depth_kwargs(args) -> dict:
    """create_model's keywords for --depth (every family's default `model_kwargs`)."""
    return {"depth": args.depth} if getattr(args, "depth", None) else {}


@dataclass(frozen=True)
class Family:
    """What one model family needs from the search.

    - `matches(arch)` / `owns(model)`: the arch names and built models of the family.
    - `recipe` / `finetune_recipe`: the trainer.RECIPES entries for training from scratch and
      from pretrained weights (None: no fine-tuning recipe).
    - `strong_augment`: `--augment recipe` means TrivialAugment + mixup/cutmix (else crop/flip).
    - `channels_last`: convert the model to channels_last on CUDA (convs).
    - `regroups_by_default`: regroup into units without `--vit_structured` (CNN channels).
    - `vit_flags`: takes --vit_structured, --vit_prune_target, --vit_pretrained.
    - `unit_groups(model, args)`: the `pruning_utils.UnitGroup`s the regroup uses.
    - `unit_kinds(model)`: {row label of masks.png: groups}, e.g. heads and neurons per block.
    - `compact_units(model, masks, sd, index, silent)`: slice `sd` to the compact form (compact.py);
      returns the description `resize(model, desc)` rebuilds. None: the family cannot be compacted
      (no export, and --compact_train auto trains it masked dense).
    - `describe(desc, model)`: the units kept, in words (export, state header).
    - `fit_weights(model, sd)`: loads a `--pretrained_file` state dict into a built model and
      returns the info lines (ValueError when it does not fit; models/weights.py). None: the
      family takes no --pretrained_file.
    - `model_kwargs(args)`: the size/shape keywords of create_model this run asks for (--depth, and
      the family's own flags); saved in checkpoints so resume, export and compare rebuild the model.
    """

    name: str
    matches: Callable[[str], bool]
    owns: Callable[[object], bool]
    recipe: str
    finetune_recipe: str | None
    strong_augment: bool
    channels_last: bool
    regroups_by_default: bool
    vit_flags: bool
    unit_groups: Callable
    unit_kinds: Callable
    compact_units: Callable | None
    resize: Callable | None
    describe: Callable
    fit_weights: Callable | None = None
    model_kwargs: Callable = depth_kwargs

    def regroups(self, args) -> bool:
        """Does this run regroup into units (else R = M, unstructured)?"""
        if getattr(args, "unstructured", False):
            return False
        return self.regroups_by_default or bool(getattr(args, "vit_structured", False))

    def compact(self, model, masks):
        """The physically smaller model of `model` under `masks` (compact.py)."""
        from compact import compact_model

        return compact_model(model, masks)

    def recipe_name(self, args) -> str:
        pretrained = getattr(args, "pretrained_file", None) or getattr(args, "vit_pretrained", False)
        return self.finetune_recipe if pretrained and self.finetune_recipe else self.recipe


# --------------------------------------------------------------------------- ViT
def _vit_groups(model, args):
    from vit_pruning_utils import vit_unit_groups

    return vit_unit_groups(model, getattr(args, "vit_prune_target", None) or "head")


def _vit_kinds(model):
    from vit_pruning_utils import head_groups, neuron_groups

    return {"heads": head_groups(model), "neurons": neuron_groups(model)}


def _vit_compact(*a, **k):
    from compact import compact_vit

    return compact_vit(*a, **k)


def _vit_resize(*a):
    from compact import resize_vit

    return resize_vit(*a)


def _vit_fit(model, sd):
    from models.weights import fit_state_dict

    return fit_state_dict(model, sd)


def _vit_describe(desc: dict, model) -> str:
    total_h, hidden = model.blocks[0].attn.num_heads, model.blocks[0].mlp.fc1.out_features
    return (
        "heads kept per block: "
        + " ".join(f"{h}/{total_h}" for h in desc["num_heads"])
        + "\nMLP neurons kept per block: "
        + " ".join(f"{n}/{hidden}" for n in desc["mlp_hidden"])
    )


VIT = Family(
    name="vit",
    matches=lambda arch: arch.startswith(TIMM_PREFIX) or MODELS.get(arch) == "vit",
    owns=lambda model: hasattr(model, "blocks_layout"),
    recipe="vit",
    finetune_recipe="vit_finetune",
    strong_augment=True,
    channels_last=False,
    regroups_by_default=False,
    vit_flags=True,
    unit_groups=_vit_groups,
    unit_kinds=_vit_kinds,
    compact_units=_vit_compact,
    resize=_vit_resize,
    describe=_vit_describe,
    fit_weights=_vit_fit,
)


# --------------------------------------------------------------------------- CNN
def _cnn_groups(model, args):
    from pruning_utils import channel_groups

    return channel_groups(model)


def _cnn_kinds(model):
    from pruning_utils import channel_groups

    return {"channels": channel_groups(model)}


def _cnn_compact(*a, **k):
    from compact import compact_cnn

    return compact_cnn(*a, **k)


def _cnn_resize(*a):
    from compact import resize_cnn

    return resize_cnn(*a)


def _cnn_describe(desc: dict, model) -> str:
    mods = dict(model.named_modules())
    kept = " ".join(f"{n}:{c}/{mods[n].out_channels}" for n, c in desc["channels"].items()) or "none removed"
    return (
        f"block-internal channels kept: {kept}\nconsumers with folded constants: "
        f"{', '.join(desc['folded']) or 'none'} (residual-stream channels stay)"
    )


CNN = Family(
    name="cnn",
    matches=lambda arch: MODELS.get(arch) in ("resnet", "vgg"),
    owns=lambda model: hasattr(model, "channel_chains"),
    recipe="cnn",
    finetune_recipe=None,
    strong_augment=False,
    channels_last=True,
    regroups_by_default=True,
    vit_flags=False,
    unit_groups=_cnn_groups,
    unit_kinds=_cnn_kinds,
    compact_units=_cnn_compact,
    resize=_cnn_resize,
    describe=_cnn_describe,
)

FAMILIES: tuple[Family, ...] = (VIT, CNN)
_loaded = False


def register(family: Family) -> Family:
    """Add `family` to FAMILIES (its module calls this once); returns it."""
    global FAMILIES
    if all(f.name != family.name for f in FAMILIES):
        FAMILIES = FAMILIES + (family,)
    return family


def families() -> tuple[Family, ...]:
    """Every registered family (the modules of FAMILY_MODULES loaded first)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in FAMILY_MODULES:
            importlib.import_module(module)
    return FAMILIES


def family_of(arch: str) -> Family:
    """The family of an arch name; ValueError when none (or several) claim it."""
    found = [f for f in families() if f.matches(arch)]
    if len(found) != 1:
        raise ValueError(f"arch {arch!r}: {'no' if not found else 'several'} model families match")
    return found[0]


def family_of_model(model) -> Family:
    """The family of a built model (by the surface it exposes)."""
    for f in families():
        if f.owns(model):
            return f
    raise ValueError(f"{type(model).__name__}: no model family exposes its surface")


def family_named(name: str) -> Family:
    for f in families():
        if f.name == name:
            return f
    raise ValueError(f"no model family named {name!r}")
