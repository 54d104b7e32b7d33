"""Model registry: `create_model(name, num_classes, img_size)` and the list of names.

Every model exposes `prunable_layers()` (module names whose `.weight` is pruned); ViTs also
expose `blocks_layout()` (per-block qkv/proj/fc1/fc2 names, `num_heads`, `head_dim`).
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .resnet import res18, res20s, res56s
from .vgg import vgg16_bn
from .vit import vit_base, vit_small, vit_tiny

MODELS: dict[str, Callable[..., nn.Module]] = {
    "res20s": res20s, "res56s": res56s, "res18": res18, "vgg16_bn": vgg16_bn,
    "vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base,
}
MODEL_NAMES = sorted(MODELS)


def is_vit(name: str) -> bool:
    return name.startswith("vit_")


def create_model(name: str, num_classes: int, img_size: int = 32, **kw) -> nn.Module:
    """Build a registry model. `kw` passes size overrides (e.g. `width`, `depth`) for tests."""
    if name not in MODELS:
        raise ValueError(f"unknown arch {name!r}; choose from {', '.join(MODEL_NAMES)}")
    return MODELS[name](num_classes=num_classes, img_size=img_size, **kw)
