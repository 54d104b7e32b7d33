"""Vision Transformers for small images, built on timm's VisionTransformer (patch 4).

Geometries (embed / depth / heads / MLP ratio): vit_tiny 192 / 9 / 3 / 2, the seed's ViT-Tiny
(the "ViT for small datasets" model with 3 heads); vit_small 384 / 12 / 6 / 4 and vit_base
768 / 12 / 12 / 4 (DeiT's widths at patch 4).

Prunable: the weights of every block's attn.qkv, attn.proj, mlp.fc1, mlp.fc2. Each block
declares its head layout (`num_heads`, `head_dim`) through `head_layout()`.
"""
from __future__ import annotations

from dataclasses import dataclass

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


class SmallViT(VisionTransformer):
    """timm ViT with patch 4 (32x32 -> 64 tokens + cls) and a pruning surface."""

    def blocks_layout(self) -> list[BlockLayout]:
        out = []
        for i, blk in enumerate(self.blocks):
            p = f"blocks.{i}"
            out.append(BlockLayout(f"{p}.attn.qkv", f"{p}.attn.proj", f"{p}.mlp.fc1", f"{p}.mlp.fc2",
                                   blk.attn.num_heads, blk.attn.head_dim))
        return out

    def prunable_layers(self) -> list[str]:
        return [n for b in self.blocks_layout() for n in (b.qkv, b.proj, b.fc1, b.fc2)]


def _vit(embed_dim: int, heads: int, num_classes: int, img_size: int, depth: int = 12,
         mlp_ratio: float = 4.0, drop_path_rate: float = 0.1) -> SmallViT:
    return SmallViT(img_size=img_size, patch_size=4, num_classes=num_classes,
                    embed_dim=embed_dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
                    drop_path_rate=drop_path_rate)


def vit_tiny(num_classes: int, img_size: int = 32, **kw) -> SmallViT:
    return _vit(192, 3, num_classes, img_size, **{"depth": 9, "mlp_ratio": 2.0, **kw})


def vit_small(num_classes: int, img_size: int = 32, **kw) -> SmallViT:
    return _vit(384, 6, num_classes, img_size, **kw)


def vit_base(num_classes: int, img_size: int = 32, **kw) -> SmallViT:
    return _vit(768, 12, num_classes, img_size, **kw)


TIMM_NAMES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
              "vit_base": "vit_base_patch16_224"}


def load_imagenet_weights(model: SmallViT, arch: str) -> None:
    """Copy timm's ImageNet weights into `model`: patch embedding and position embedding are
    resampled to patch 4 and this image size; the classifier head stays freshly initialized.
    Needs network access to the timm weight hub (raises when it cannot be fetched)."""
    import timm
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    sd = timm.create_model(TIMM_NAMES[arch], pretrained=True).state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    sd["patch_embed.proj.weight"] = resample_patch_embed(sd["patch_embed.proj.weight"], list(model.patch_embed.patch_size))
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], list(model.patch_embed.grid_size), num_prefix_tokens=1)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise RuntimeError(f"weights do not fit {arch}: missing {missing}, unexpected {unexpected}")
