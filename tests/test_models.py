"""Model registry: every model builds, trains a step, and declares its pruning surface."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import models
from models import MODEL_NAMES, create_model, is_mamba, is_vit

# small variants for speed; full sizes are only built for parameter counts
SMALL = {
    "res20s": {"width": 4},
    "res56s": {"width": 4},
    "res18": {"width": 8},
    "vgg16_bn": {"width_div": 16},
    "vit_tiny": {"depth": 1},
    "vit_small": {"depth": 1},
    "vit_base": {"depth": 1},
    "vit_small_imagenet": {"depth": 1},
    "vit_base_imagenet": {"depth": 1},
    "vit_large_imagenet": {"depth": 1},
    "mamba_tiny": {"depth": 1},
    "mamba_small": {"depth": 1},
    "mamba_base": {"depth": 1},
    "mamba_small_imagenet": {"depth": 1},
    "mamba_base_imagenet": {"depth": 1},
}
CNNS = [n for n in MODEL_NAMES if not (is_vit(n) or is_mamba(n))]
VITS = [n for n in MODEL_NAMES if is_vit(n)]
NUM_CLASSES = 7


def small_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, NUM_CLASSES, 32, **SMALL[name])


def batch(size: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (size,), generator=g)


def test_small_variants_cover_the_registry():
    assert set(SMALL) == set(MODEL_NAMES) == set(models.MODELS)
    assert MODEL_NAMES == sorted(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward_is_finite(name):
    model = small_model(name)
    model.train()
    x, y = batch()
    out = model(x)
    assert out.shape == (2, NUM_CLASSES)
    assert bool(torch.isfinite(out).all())
    nn.functional.cross_entropy(out, y).backward()
    modules = dict(model.named_modules())
    for layer in model.prunable_layers():
        grad = modules[layer].weight.grad
        assert grad is not None and bool(torch.isfinite(grad).all()), layer
        assert float(grad.abs().sum()) > 0, layer
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # eval is deterministic (no dropout / drop path)


@pytest.mark.parametrize("name", CNNS)
def test_cnn_prunable_layers_are_all_convs_but_the_stem(name):
    model = small_model(name)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    prunable = model.prunable_layers()
    stem = "conv1" if name.startswith("res") else "features.0"
    assert convs[0] == stem
    assert stem not in prunable
    assert prunable == convs[1:]
    assert linears and not set(linears) & set(prunable)
    if name.startswith("res"):
        assert any("shortcut" in n for n in prunable)  # 1x1 downsampling convs are prunable too


@pytest.mark.parametrize("name", VITS)
def test_vit_prunable_layers_are_the_block_linears(name):
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES, 32, depth=2)
    expected = [f"blocks.{i}.{part}" for i in range(2) for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert model.prunable_layers() == expected
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], nn.Linear) for n in expected)


@pytest.mark.parametrize(
    "name, heads, embed, ratio", [("vit_tiny", 3, 192, 2), ("vit_small", 6, 384, 4), ("vit_base", 12, 768, 4)]
)
def test_vit_blocks_layout_matches_the_weights(name, heads, embed, ratio):
    model = small_model(name)
    modules = dict(model.named_modules())
    (layout,) = model.blocks_layout()
    assert (layout.qkv, layout.proj, layout.fc1, layout.fc2) == (
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
    )
    assert layout.num_heads == heads and layout.head_dim == 64
    assert layout.num_heads * layout.head_dim == embed
    assert modules[layout.qkv].weight.shape == (3 * embed, embed)
    assert modules[layout.proj].weight.shape == (embed, embed)
    assert modules[layout.fc1].weight.shape == (ratio * embed, embed)
    assert modules[layout.fc2].weight.shape == (embed, ratio * embed)


@pytest.mark.parametrize(
    "name, low, high",
    [
        ("res20s", 0.26e6, 0.28e6),
        ("res56s", 0.84e6, 0.87e6),
        ("res18", 11.0e6, 11.3e6),
        ("vgg16_bn", 14.6e6, 14.9e6),
        ("vit_tiny", 2.6e6, 2.8e6),
    ],
)
def test_full_size_parameter_counts(name, low, high):
    torch.manual_seed(0)
    model = create_model(name, 10, 32)
    n = sum(p.numel() for p in model.parameters())
    assert low <= n <= high, n
    if name == "vit_tiny":
        modules = dict(model.named_modules())
        assert len(model.blocks_layout()) == 9  # the seed's ViT-Tiny: 192 / depth 9 / 3 heads / MLP x2
        assert all(b.num_heads == 3 for b in model.blocks_layout())
        assert modules["blocks.0.attn.qkv"].weight.shape == (576, 192)
        assert modules["blocks.8.mlp.fc1"].weight.shape == (384, 192)
        assert modules["patch_embed.proj"].weight.shape == (192, 3, 4, 4)  # patch 4: 64 tokens


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_hooks_fire_for_every_prunable_layer(name):
    model = small_model(name)
    modules = dict(model.named_modules())
    fired = []
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: fired.append(n)) for n in model.prunable_layers()]
    model.eval()
    with torch.no_grad():
        model(batch()[0])
    for h in handles:
        h.remove()
    assert set(fired) == set(model.prunable_layers())
    assert len(fired) == len(model.prunable_layers())  # each module called exactly once


def test_create_model_unknown_name_raises():
    with pytest.raises(ValueError):
        create_model("resnet_does_not_exist", 10, 32)
