"""Model registry: `create_model(name, num_classes, img_size)` and the list of names.

Every model exposes `prunable_layers()` (module names whose `.weight` is pruned); ViTs also
expose `blocks_layout()` (per-block qkv/proj/fc1/fc2 names, `num_heads`, `head_dim`). The
registry names the module of each model and imports it on first use, so reading the names
(the command line's `--arch` choices) costs no torch import.
"""
from __future__ import annotations

import importlib

MODELS: dict[str, str] = {  # name -> module in this package that defines a function `name`
    "res20s": "resnet", "res56s": "resnet", "res18": "resnet", "vgg16_bn": "vgg",
    "vit_tiny": "vit", "vit_small": "vit", "vit_base": "vit",
}
MODEL_NAMES = sorted(MODELS)


def is_vit(name: str) -> bool:
    return name.startswith("vit_")


def create_model(name: str, num_classes: int, img_size: int = 32, **kw):
    """Build a registry model (an nn.Module). `kw` passes size overrides (e.g. `width`, `depth`)."""
    if name not in MODELS:
        raise ValueError(f"unknown arch {name!r}; choose from {', '.join(MODEL_NAMES)}")
    module = importlib.import_module(f".{MODELS[name]}", __name__)
    return getattr(module, name)(num_classes=num_classes, img_size=img_size, **kw)
