"""Pretrained weights from a local file (`--pretrained_file`), no hub needed.

Reads a timm / Hugging Face weight file (.safetensors through the `safetensors` package; .pth,
.pt, .bin through torch.load with weights_only) and fits it to a model:
- the absolute position embedding is resampled to the model's patch grid when the image size
  differs (timm.layers.resample_abs_pos_embed, bicubic, as timm's own loader does);
- a classifier of another class count is re-initialized (one info line says so);
- any other difference (a missing, extra or differently shaped tensor) is a ValueError that
  names the first bad key, in the model's order.
That is the ViT fit (`fit_state_dict`); a family may fit otherwise (its `fit_weights`, e.g.
models/mamba.py `fit_mamba_state_dict`, which maps published Mamba names and loads partially).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn as nn

WRAPPERS = ("state_dict", "model", "module")  # checkpoint dicts that hold the state dict (DeiT: "model")


def read_weight_file(path: str) -> dict[str, torch.Tensor]:
    """The state dict in `path`; ValueError when it cannot be read or holds no tensors."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or pickled-code file
        raise ValueError(f"cannot read it as weights ({type(e).__name__})") from None
    for key in WRAPPERS:
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("not a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _classifier(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("classifier", "head") if isinstance(cfg, dict) else "head"


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def fit_head(model: nn.Module, own: dict, sd: dict, notes: list[str]) -> dict:
    """`sd` with the classifier of another class count (or none) replaced by the model's own
    (one line in `notes`); `sd` itself when it fits."""
    head = _classifier(model)
    head_keys = [k for k in own if k.startswith(head + ".")]
    if any(k not in sd or sd[k].shape != own[k].shape for k in head_keys):
        file_w = sd.get(f"{head}.weight")
        n_file = file_w.shape[0] if file_w is not None and file_w.ndim == 2 else "no"
        n_model = own[f"{head}.weight"].shape[0] if f"{head}.weight" in own else "no"
        notes.append(f"classifier '{head}' re-initialized: the file has {n_file} classes, the model {n_model}")
        sd = {k: v for k, v in sd.items() if not k.startswith(head + ".")}
        sd.update({k: own[k] for k in head_keys})
    return sd


def fit_pos_embed(model: nn.Module, own: dict, sd: dict, notes: list[str], prefix: int) -> None:
    """Resample sd["pos_embed"] in place to the model's patch grid (`prefix` leading tokens kept
    as they are) when its length differs; ValueError when it cannot."""
    pos, mine = sd.get("pos_embed"), own.get("pos_embed")
    if pos is not None and mine is not None and pos.shape != mine.shape and pos.shape[-1] == mine.shape[-1]:
        from timm.layers import resample_abs_pos_embed

        try:
            sd["pos_embed"] = resample_abs_pos_embed(
                pos.float(), list(model.patch_embed.grid_size), num_prefix_tokens=prefix
            ).to(pos.dtype)
        except Exception as e:
            raise ValueError(
                f"first bad key 'pos_embed': cannot resample {_shape(pos)} to {_shape(mine)} ({type(e).__name__})"
            ) from None
        notes.append(f"pos_embed resampled from {pos.shape[1] - prefix} to {mine.shape[1] - prefix} patches")


def fit_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> list[str]:
    """Load `sd` into `model` (see the module docstring); returns the info lines."""
    own, sd, notes = model.state_dict(), dict(sd), []
    sd = fit_head(model, own, sd, notes)
    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    fit_pos_embed(model, own, sd, notes, prefix)
    for k, v in own.items():
        if k not in sd:
            raise ValueError(f"first bad key {k!r}: missing from the file")
        if sd[k].shape != v.shape:
            raise ValueError(f"first bad key {k!r}: shape {_shape(sd[k])} in the file, {_shape(v)} in the model")
    extra = [k for k in sd if k not in own]
    if extra:
        raise ValueError(f"first bad key {extra[0]!r}: in the file, not in the model")
    model.load_state_dict(sd)
    return notes


def load_weight_file(model: nn.Module, path: str, fit: Callable = fit_state_dict) -> list[str]:
    """Read `path` and fit it into `model` with `fit(model, sd)` (a family's `fit_weights`);
    returns the info lines, ValueError otherwise."""
    if not os.path.isfile(path):
        raise ValueError("file not found")
    return fit(model, read_weight_file(path))


def load_pretrained(model: nn.Module, arch: str, path: str | None = None) -> list[str]:
    """The weights of `path`, or timm's ImageNet weights of `arch` from the hub (`path` None;
    needs network). Returns the info lines; ValueError when the weights do not fit."""
    if path:
        from families import family_of

        family = family_of(arch)
        if family.fit_weights is None:
            raise ValueError(f"the {family.name} family takes no weight file")
        return load_weight_file(model, path, family.fit_weights)
    from .vit import load_imagenet_weights

    return load_imagenet_weights(model, arch)
