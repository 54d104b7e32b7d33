"""Compaction: the physically smaller form of a masked model (export.py, compact_train.py).

What is removed (docs/export.md "What is removed"):
- ViT: heads whose proj input columns are all masked (they add nothing) or whose v rows are
  all masked (they output their v bias, a constant folded into proj.bias); MLP neurons whose
  fc2 column is all masked, or whose fc1 row is all masked (constant act(b1), folded into
  fc2.bias). `attn.num_heads` and `attn.attn_dim` follow, so timm's own forward runs.
- CNN: along each chain a model declares (`channel_chains()`: producer conv -> BN -> ReLU ->
  consumer), the producer channels whose filter or consumer input slice is all masked. A zeroed
  filter still emits relu(bn(0)); its exact, input-independent contribution is kept: folded
  into a Linear consumer's bias, or added by `FoldedConv2d` (zero padding makes it differ at
  the borders, so it is a map, not a bias). Residual-stream channels stay.
A layer keeps at least one unit. `compact_state` slices a state dict and describes the new
sizes; `build_compact` rebuilds the model from that description alone.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from families import family_named, family_of_model
from models import create_model

Index = dict[str, dict[int, torch.Tensor]]  # state-dict key -> {dim: kept indices along it}


class CompactError(ValueError):
    """A model this module cannot compact."""


class FoldedConv2d(nn.Conv2d):
    """Conv2d plus the fixed contribution of removed input channels that carried a constant.

    Such channels add conv(ones) with `fold_kernel` = sum_c a_c * W[:, c]; with zero padding
    this differs near the borders, so it is computed at the input's size.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("fold_kernel", torch.zeros(self.out_channels, 1, *self.kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = x.new_ones(1, 1, *x.shape[-2:])
        return super().forward(x) + F.conv2d(ones, self.fold_kernel, None, self.stride, self.padding, self.dilation)


# ---------------------------------------------------------------------------- units
def _droppable(silent: torch.Tensor, constant: torch.Tensor) -> torch.Tensor:
    """Units that add nothing or a constant; all but unit 0 when every unit qualifies."""
    drop = silent | constant
    if bool(drop.all()):
        drop[0] = False  # a kept unit computes its own (zero or constant) output exactly
    return drop


def _index(keep: torch.Tensor) -> torch.Tensor:
    return keep.nonzero().flatten()


def _take(sd: dict, index: Index, key: str, src: torch.Tensor, dim: int, idx: torch.Tensor) -> None:
    """sd[key] = src's entries `idx` along `dim`, recorded in `index`."""
    sd[key] = src.index_select(dim, idx.to(src.device))
    index.setdefault(key, {})[dim] = idx


@torch.no_grad()
def _compact_attention(sd: dict, attn: nn.Module, qkv: str, proj: str, masks: dict, index: Index, silent: bool) -> int:
    """Slice one block's heads in `sd`; returns the heads kept (`silent`: drop silent heads only)."""
    h, hd = attn.num_heads, attn.head_dim
    if not isinstance(attn.norm, nn.Identity) or getattr(attn, "gate", None) is not None:
        return h  # a norm or gate over attn_dim mixes heads: nothing is removable exactly
    silent_only, silent = silent, ~masks[proj].reshape(-1, h, hd).any(2).any(0)  # proj input columns all masked
    constant = ~masks[qkv].reshape(3, h, -1)[2].any(1)  # v rows all masked: output = v bias
    if silent_only or (attn.qkv.bias is not None and attn.proj.bias is None):
        constant = torch.zeros_like(constant)  # no proj bias to fold a v bias into
    drop = _droppable(silent, constant)
    if attn.qkv.bias is not None and attn.proj.bias is not None:
        b_v = attn.qkv.bias.reshape(3, h, hd)[2] * constant[:, None]
        w_proj = attn.proj.weight.reshape(-1, h, hd)
        sd[f"{proj}.bias"] = attn.proj.bias + torch.einsum("ohd,hd->o", w_proj[:, drop], b_v[drop])
    heads = _index(~drop)
    rows = (torch.arange(3)[:, None, None] * h * hd + heads[None, :, None] * hd + torch.arange(hd)).flatten()
    cols = (heads[:, None] * hd + torch.arange(hd)).flatten()
    _take(sd, index, f"{qkv}.weight", attn.qkv.weight.detach(), 0, rows)
    if attn.qkv.bias is not None:
        _take(sd, index, f"{qkv}.bias", attn.qkv.bias.detach(), 0, rows)
    _take(sd, index, f"{proj}.weight", attn.proj.weight.detach(), 1, cols)
    return int(heads.numel())


@torch.no_grad()
def _compact_mlp(sd: dict, mlp: nn.Module, fc1: str, fc2: str, masks: dict, index: Index, silent: bool) -> int:
    """Slice one block's MLP neurons in `sd`; returns the neurons kept (`silent`: silent ones only)."""
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        return mlp.fc1.out_features  # a norm over the hidden units mixes them
    silent_only, silent = silent, ~masks[fc2].any(0)  # fc2 column all masked
    constant = ~masks[fc1].any(1)  # fc1 row all masked: output = act(b1)
    if silent_only or mlp.fc2.bias is None:
        constant = torch.zeros_like(constant)  # no fc2 bias to fold act(b1) into
    drop = _droppable(silent, constant)
    if mlp.fc2.bias is not None:
        b1 = mlp.fc1.bias if mlp.fc1.bias is not None else torch.zeros(mlp.fc1.out_features)
        act = torch.where(constant, mlp.act(b1), torch.zeros_like(b1))
        sd[f"{fc2}.bias"] = mlp.fc2.bias + mlp.fc2.weight[:, drop] @ act[drop]
    keep = _index(~drop)
    _take(sd, index, f"{fc1}.weight", mlp.fc1.weight.detach(), 0, keep)
    if mlp.fc1.bias is not None:
        _take(sd, index, f"{fc1}.bias", mlp.fc1.bias.detach(), 0, keep)
    _take(sd, index, f"{fc2}.weight", mlp.fc2.weight.detach(), 1, keep)
    return int(keep.numel())


def compact_vit(model: nn.Module, masks: dict, sd: dict, index: Index, silent: bool = False) -> dict:
    """Slice the heads and MLP neurons of every block in `sd` (families.VIT)."""
    heads, hidden = [], []
    for blk, lay in zip(model.blocks, model.blocks_layout()):
        heads.append(_compact_attention(sd, blk.attn, lay.qkv, lay.proj, masks, index, silent))
        hidden.append(_compact_mlp(sd, blk.mlp, lay.fc1, lay.fc2, masks, index, silent))
    return {"family": "vit", "num_heads": heads, "mlp_hidden": hidden}


def _bn_constant(bn: nn.BatchNorm2d, bias: torch.Tensor | None) -> torch.Tensor:
    """relu(bn(z)) in eval mode for the constant conv output z (its bias, or 0)."""
    z = bias if bias is not None else torch.zeros(bn.num_features)
    y = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    if bn.affine:
        y = y * bn.weight + bn.bias
    return F.relu(y)


@torch.no_grad()
def _compact_chain(
    sd: dict, mods: dict, chain: tuple[str, str, str], masks: dict, index: Index, silent: bool
) -> tuple[int, bool]:
    """Slice the producer channels of one chain; returns (channels kept, consumer folded).
    `silent`: a zero filter's channel carries no constant (its BatchNorm is masked too)."""
    prod, norm, cons = chain
    p, bn, c = mods[prod], mods[norm], mods[cons]
    zero_filter = ~masks[prod].reshape(p.out_channels, -1).any(1)
    unused = (
        ~masks[cons].transpose(0, 1).reshape(p.out_channels, -1).any(1)
        if cons in masks
        else torch.zeros_like(zero_filter)
    )
    drop = _droppable(unused, zero_filter)
    if not bool(drop.any()):
        return p.out_channels, False
    const = torch.where(zero_filter & ~torch.tensor(silent), _bn_constant(bn, p.bias), torch.zeros(p.out_channels))
    keep = _index(~drop)
    for key in ("weight", "bias", "fold_kernel"):  # a fold kernel from the previous chain (VGG)
        if f"{prod}.{key}" in sd:
            _take(sd, index, f"{prod}.{key}", sd[f"{prod}.{key}"], 0, keep)
    for key in ("weight", "bias", "running_mean", "running_var"):
        if f"{norm}.{key}" in sd:
            _take(sd, index, f"{norm}.{key}", sd[f"{norm}.{key}"], 0, keep)
    _take(sd, index, f"{cons}.weight", sd[f"{cons}.weight"], 1, keep)
    folded = torch.einsum("oc...,c->o...", c.weight.detach()[:, drop], const[drop])
    if isinstance(c, nn.Linear):
        sd[f"{cons}.bias"] = c.bias + folded
        return int(keep.numel()), False
    if not bool(folded.any()):
        return int(keep.numel()), False
    sd[f"{cons}.fold_kernel"] = folded.unsqueeze(1)
    return int(keep.numel()), True


def compact_cnn(model: nn.Module, masks: dict, sd: dict, index: Index, silent: bool = False) -> dict:
    """Slice the producer channels of every chain in `sd` (families.CNN)."""
    mods = dict(model.named_modules())
    channels, folded = {}, []
    for chain in model.channel_chains():
        if chain[0] not in masks:
            continue  # the stem is never pruned
        kept, fold = _compact_chain(sd, mods, chain, masks, index, silent)
        if kept < mods[chain[0]].out_channels:
            channels[chain[0]] = kept
        if fold:
            folded.append(chain[2])
    return {"family": "cnn", "channels": channels, "folded": folded}


def compact_state(
    model: nn.Module, masks: dict[str, torch.Tensor], silent: bool = False, index: Index | None = None
) -> tuple[dict, dict]:
    """(architecture description, state dict) of the compact form of `model` (masked, eval).

    `masks` are bool tensors keyed by prunable module name, as in a checkpoint's 'mask'.
    `silent`: remove only units that add nothing (no constants folded; training keeps the same
    math, compact_train.py). `index` receives, per sliced key, the kept indices along each dim.
    """
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    masks = {n: m.bool().cpu() for n, m in masks.items()}
    try:
        family = family_of_model(model)
    except ValueError:
        raise CompactError(
            f"{type(model).__name__}: no model family (ViT blocks, CNN channel chains, Mamba layers) can compact it"
        ) from None
    return family.compact_units(model, masks, sd, {} if index is None else index, silent), sd


def compact_model(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    silent: bool = False,
    index: Index | None = None,
    desc_out: dict | None = None,
):
    """The compact form of `model` under `masks` as a module (a resized copy, weights loaded);
    `desc_out` receives its description (as `compact_state` returns it)."""
    device = next(model.parameters()).device
    src = model if device.type == "cpu" else copy.deepcopy(model).cpu()  # the slicing runs on the CPU
    desc, sd = compact_state(src, masks, silent, index)
    if desc_out is not None:
        desc_out.update(desc)
    small = copy.deepcopy(src)
    family_named(desc["family"]).resize(small, desc)
    small.load_state_dict(sd)
    return small.to(device)


# --------------------------------------------------------------------------- rebuild
def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _linear(old: nn.Linear, n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=old.bias is not None)


def resize_vit(model: nn.Module, desc: dict) -> None:
    for blk, heads, hidden in zip(model.blocks, desc["num_heads"], desc["mlp_hidden"]):
        attn, mlp = blk.attn, blk.mlp
        attn.num_heads, attn.attn_dim = heads, heads * attn.head_dim
        attn.qkv = _linear(attn.qkv, attn.qkv.in_features, 3 * attn.attn_dim)
        attn.proj = _linear(attn.proj, attn.attn_dim, attn.proj.out_features)
        mlp.fc1 = _linear(mlp.fc1, mlp.fc1.in_features, hidden)
        mlp.fc2 = _linear(mlp.fc2, hidden, mlp.fc2.out_features)


def resize_cnn(model: nn.Module, desc: dict) -> None:
    mods = dict(model.named_modules())
    n_out, n_in = dict(desc["channels"]), {}
    for prod, norm, cons in model.channel_chains():
        if prod in n_out:
            n_in[cons] = n_out[prod]
            bn = mods[norm]
            _set_module(
                model, norm, nn.BatchNorm2d(n_out[prod], bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
            )
    for name in sorted(set(n_out) | set(n_in) | set(desc["folded"])):
        old = mods[name]
        if isinstance(old, nn.Linear):
            _set_module(model, name, _linear(old, n_in.get(name, old.in_features), old.out_features))
            continue
        cls = FoldedConv2d if name in desc["folded"] else nn.Conv2d
        _set_module(
            model,
            name,
            cls(
                n_in.get(name, old.in_channels),
                n_out.get(name, old.out_channels),
                old.kernel_size,
                old.stride,
                old.padding,
                old.dilation,
                old.groups,
                old.bias is not None,
                old.padding_mode,
            ),
        )


def build_compact(artifact: dict) -> nn.Module:
    """The compact model an export artifact describes (weights loaded, eval mode)."""
    model = create_model(
        artifact["arch"], artifact["num_classes"], artifact["img_size"], **artifact.get("model_kwargs", {})
    )
    desc = artifact["compact"]
    family_named(desc["family"]).resize(model, desc)
    model.load_state_dict(artifact["state_dict"])
    return model.eval()
