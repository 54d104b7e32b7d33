"""Model registry: `create_model(name, num_classes, img_size)` and the list of names.

Every model exposes `prunable_layers()` (module names whose `.weight` is pruned); ViTs also
expose `blocks_layout()` (per-block qkv/proj/fc1/fc2 names, `num_heads`, `head_dim`), Vision
Mambas `mamba_layout()` (per-block mixer/MLP names, inner width, d_state). The
registry names the module of each model and imports it on first use, so reading the names
(the command line's `--arch` choices) costs no torch import. `timm:NAME` builds timm's
VisionTransformer NAME (checked against timm when the model is built, see models/vit.py).
"""

from __future__ import annotations

import importlib

MODELS: dict[str, str] = {  # name -> module in this package that defines a function `name`
    "res20s": "resnet",
    "res56s": "resnet",
    "res18": "resnet",
    "vgg16_bn": "vgg",
    "vit_tiny": "vit",
    "vit_small": "vit",
    "vit_base": "vit",
    "vit_small_imagenet": "vit",
    "vit_base_imagenet": "vit",
    "vit_large_imagenet": "vit",
    "mamba_tiny": "mamba",
    "mamba_small": "mamba",
    "mamba_base": "mamba",
    "mamba_small_imagenet": "mamba",
    "mamba_base_imagenet": "mamba",
}
MODEL_NAMES = sorted(MODELS)
TIMM_PREFIX = "timm:"


class _ArchChoices(tuple):
    """The `--arch` choices: the registry names and any timm:NAME."""

    def __contains__(self, name) -> bool:
        return tuple.__contains__(self, name) or (
            isinstance(name, str) and name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX)
        )


ARCH_CHOICES = _ArchChoices(MODEL_NAMES + [TIMM_PREFIX + "NAME"])


def is_vit(name: str) -> bool:
    return name.startswith(("vit_", TIMM_PREFIX))


def is_mamba(name: str) -> bool:
    return name.startswith("mamba_")


def create_model(name: str, num_classes: int, img_size: int | None = None, **kw):
    """Build a registry model or `timm:NAME` (an nn.Module) at `img_size` (default: the model's,
    32 for the small-image models, 224 for the patch-16 ViTs). `kw` passes size overrides (e.g.
    `width`, `depth`). ValueError for an unknown name or a timm model without the ViT surface."""
    kw = {**kw, **({} if img_size is None else {"img_size": img_size})}
    if name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        from .vit import timm_vit

        return timm_vit(name[len(TIMM_PREFIX) :], num_classes=num_classes, **kw)
    if name not in MODELS:
        raise ValueError(f"unknown arch {name!r}; choose from {', '.join(MODEL_NAMES)} or timm:NAME")
    module = importlib.import_module(f".{MODELS[name]}", __name__)
    return getattr(module, name)(num_classes=num_classes, **kw)


def input_norm(name: str) -> tuple | None:
    """(mean, std) of the inputs `name`'s timm weights expect (image folders use it), or None;
    ValueError when `name` is timm:NAME and timm has no such model (checked before data loads)."""
    if not is_vit(name):
        return None
    from .vit import input_norm as vit_input_norm

    return vit_input_norm(name)
