"""Vision Transformers: timm's VisionTransformer with a pruning surface.

Small images (patch 4; embed / depth / heads / MLP ratio): vit_tiny 192 / 9 / 3 / 2, the seed's
ViT-Tiny (the "ViT for small datasets" model with 3 heads); vit_small 384 / 12 / 6 / 4 and
vit_base 768 / 12 / 12 / 4 (DeiT's widths at patch 4).

ImageNet scale (patch 16, 224 px by default; timm's geometries): vit_small_imagenet 384 / 12 / 6,
vit_base_imagenet 768 / 12 / 12, vit_large_imagenet 1024 / 24 / 16, all MLP ratio 4, built by
timm from vit_{small,base,large}_patch16_224; `timm_vit(NAME)` (`--arch timm:NAME`) builds any
other timm VisionTransformer whose blocks have a fused attn.qkv and a two-layer MLP. timm builds
them with pretrained=False (no network); weights come from models/weights.py.

Prunable: the weights of every block's attn.qkv, attn.proj, mlp.fc1, mlp.fc2. Each block
declares its head layout (`num_heads`, `head_dim`) through `blocks_layout()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer


@dataclass(frozen=True)
class BlockLayout:
    """Names and sizes of one transformer block's prunable pieces."""

    qkv: str
    proj: str
    fc1: str
    fc2: str
    num_heads: int
    head_dim: int


class PrunableViT(VisionTransformer):
    """timm ViT with a pruning surface (patch 4 for the small-image models, 16 for the others)."""

    def blocks_layout(self) -> list[BlockLayout]:
        out = []
        for i, blk in enumerate(self.blocks):
            p = f"blocks.{i}"
            out.append(
                BlockLayout(
                    f"{p}.attn.qkv",
                    f"{p}.attn.proj",
                    f"{p}.mlp.fc1",
                    f"{p}.mlp.fc2",
                    blk.attn.num_heads,
                    blk.attn.head_dim,
                )
            )
        return out

    def prunable_layers(self) -> list[str]:
        return [n for b in self.blocks_layout() for n in (b.qkv, b.proj, b.fc1, b.fc2)]


def _vit(
    embed_dim: int,
    heads: int,
    num_classes: int,
    img_size: int,
    depth: int = 12,
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.1,
) -> PrunableViT:
    return PrunableViT(
        img_size=img_size,
        patch_size=4,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        drop_path_rate=drop_path_rate,
    )


def vit_tiny(num_classes: int, img_size: int = 32, **kw) -> PrunableViT:
    return _vit(192, 3, num_classes, img_size, **{"depth": 9, "mlp_ratio": 2.0, **kw})


def vit_small(num_classes: int, img_size: int = 32, **kw) -> PrunableViT:
    return _vit(384, 6, num_classes, img_size, **kw)


def vit_base(num_classes: int, img_size: int = 32, **kw) -> PrunableViT:
    return _vit(768, 12, num_classes, img_size, **kw)


# ------------------------------------------------------------------- timm-built models
def _fused(block: nn.Module) -> bool:
    """A block the head/neuron regroup handles: fused attn.qkv [3, heads, head_dim] and an MLP
    of fc1 -> fc2 (no gated/SwiGLU MLP, no parallel blocks)."""
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    linear = lambda m, name: isinstance(getattr(m, name, None), nn.Linear)
    if not (linear(attn, "qkv") and linear(attn, "proj") and linear(mlp, "fc1") and linear(mlp, "fc2")):
        return False
    return attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim and mlp.fc1.out_features == mlp.fc2.in_features


def timm_vit(name: str, num_classes: int, img_size: int = 224, **kw) -> PrunableViT:
    """timm model `name` (pretrained=False) with the pruning surface; ValueError when timm has no
    such model or it is not a plain VisionTransformer with fused qkv blocks."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"--arch timm:{name}: timm {timm.__version__} has no model {name!r}")
    try:
        model = timm.create_model(
            name, pretrained=False, num_classes=num_classes, img_size=img_size, **{"drop_path_rate": 0.1, **kw}
        )
    except TypeError:  # not a ViT: no img_size argument
        raise ValueError(
            f"--arch timm:{name}: not a timm VisionTransformer; the head/neuron regroup needs one"
        ) from None
    odd = (
        [f"block {i} ({type(b).__name__})" for i, b in enumerate(model.blocks) if not _fused(b)][:1]
        if type(model) is VisionTransformer
        else [f"{type(model).__name__} is not VisionTransformer"]
    )
    if odd:
        raise ValueError(
            f"--arch timm:{name}: {odd[0]}: the head/neuron regroup needs a timm VisionTransformer "
            "whose blocks have a fused attn.qkv and an fc1 -> fc2 MLP"
        )
    model.__class__ = PrunableViT  # adds methods only: the same modules, parameters and forward
    return model


TIMM_NAMES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_small_imagenet": "vit_small_patch16_224",
    "vit_base_imagenet": "vit_base_patch16_224",
    "vit_large_imagenet": "vit_large_patch16_224",
}


def vit_small_imagenet(num_classes: int, img_size: int = 224, **kw) -> PrunableViT:
    return timm_vit(TIMM_NAMES["vit_small_imagenet"], num_classes, img_size, **kw)


def vit_base_imagenet(num_classes: int, img_size: int = 224, **kw) -> PrunableViT:
    return timm_vit(TIMM_NAMES["vit_base_imagenet"], num_classes, img_size, **kw)


def vit_large_imagenet(num_classes: int, img_size: int = 224, **kw) -> PrunableViT:
    return timm_vit(TIMM_NAMES["vit_large_imagenet"], num_classes, img_size, **kw)


def timm_name(arch: str) -> str:
    """The timm model whose ImageNet weights `arch` starts from (--vit_pretrained)."""
    return arch[len("timm:") :] if arch.startswith("timm:") else TIMM_NAMES[arch]


def input_norm(arch: str) -> tuple | None:
    """(mean, std) the timm weights of `arch` were trained with, None for the small-image ViTs
    and CNNs (their datasets' own statistics); ValueError for a timm:NAME timm does not know."""
    import timm
    from timm.models import get_pretrained_cfg

    if not (arch.startswith("timm:") or arch.endswith("_imagenet")):
        return None
    name = timm_name(arch)
    if not timm.is_model(name):
        raise ValueError(f"--arch {arch}: timm {timm.__version__} has no model {name!r}")
    cfg = get_pretrained_cfg(name)
    return (tuple(cfg.mean), tuple(cfg.std)) if cfg is not None else None


def load_imagenet_weights(model: PrunableViT, arch: str) -> list[str]:
    """Copy timm's ImageNet weights (fetched from the hub: needs network) into `model`: the patch
    embedding is resampled to the model's patch size, the position embedding to its grid, and a
    classifier of another class count is re-initialized (models/weights.py). Returns info lines."""
    import timm
    from timm.layers import resample_patch_embed

    from .weights import fit_state_dict

    sd = timm.create_model(timm_name(arch), pretrained=True).state_dict()
    sd["patch_embed.proj.weight"] = resample_patch_embed(
        sd["patch_embed.proj.weight"], list(model.patch_embed.patch_size)
    )
    return fit_state_dict(model, sd)
