"""Compaction of a Vision Mamba: per block a physically narrower mixer and MLP.

Inner channel c of a mixer is removed when it adds nothing to the block's output and nothing to
the other channels' dt, B and C:
- output: its out_proj column is all masked, or its z row of in_proj is (silu(0) = 0 gates it off);
- the x_proj input of every scan direction: its x_proj column is all masked, or the channel's
  scan input is 0 (its x row of in_proj all masked and its conv1d bias 0, as the regroup leaves it).
A removed channel takes its in_proj rows (x and z), conv1d channel, x_proj column, dt_proj row
and bias, A_log row and D entry of each direction, and out_proj column with it. MLP neurons go
as in the ViT (compact.py: an fc1 row all masked leaves act(b1), folded into fc2.bias).
A block keeps at least one channel and one neuron. The compact model equals the masked one.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from compact import _compact_mlp, _droppable, _index, _take
from models.mamba import MambaMixer


@torch.no_grad()
def _compact_mixer(sd: dict, mixer: MambaMixer, prefix: str, masks: dict, index: dict) -> int:
    """Slice one mixer's inner channels in `sd`; returns the channels kept."""
    d = mixer.d_inner
    w_in = masks[f"{prefix}.in_proj"].reshape(2, d, -1)
    x_dead, z_dead = ~w_in[0].any(1), ~w_in[1].any(1)
    if mixer.in_proj.bias is not None:
        x_dead = z_dead = torch.zeros_like(x_dead)  # a bias keeps x and z alive
    silent = ~masks[f"{prefix}.out_proj"].any(0) | z_dead
    for conv, x_proj, *_ in mixer.scans():
        zero_input = x_dead & (getattr(mixer, conv).bias.detach().cpu() == 0)
        silent &= ~masks[f"{prefix}.{x_proj}"].any(0) | zero_input
    keep = _index(~_droppable(silent, torch.zeros_like(silent)))
    _take(sd, index, f"{prefix}.in_proj.weight", sd[f"{prefix}.in_proj.weight"], 0, torch.cat([keep, d + keep]))
    for conv, x_proj, dt_proj, a_log, d_skip in mixer.scans():
        for key in (f"{conv}.weight", f"{conv}.bias", f"{dt_proj}.weight", f"{dt_proj}.bias", a_log, d_skip):
            _take(sd, index, f"{prefix}.{key}", sd[f"{prefix}.{key}"], 0, keep)
        _take(sd, index, f"{prefix}.{x_proj}.weight", sd[f"{prefix}.{x_proj}.weight"], 1, keep)
    _take(sd, index, f"{prefix}.out_proj.weight", sd[f"{prefix}.out_proj.weight"], 1, keep)
    return int(keep.numel())


def compact_mamba(model: nn.Module, masks: dict, sd: dict, index: dict, silent: bool = False) -> dict:
    """Slice every block's inner channels and MLP neurons in `sd` (CPU tensors); returns the
    description `resize_mamba` rebuilds. `index` receives the kept indices of each sliced key;
    `silent`: fold no constants (the mixer never folds any; the MLP as compact.py)."""
    inner, hidden = [], []
    for blk, lay in zip(model.blocks, model.mamba_layout()):
        inner.append(_compact_mixer(sd, blk.mixer, lay.mixer, masks, index))
        hidden.append(_compact_mlp(sd, blk.mlp, lay.fc1, lay.fc2, masks, index, silent))
    return {"family": "mamba", "d_inner": inner, "mlp_hidden": hidden}


def resize_mamba(model: nn.Module, desc: dict) -> None:
    """Give `model` the per-block widths of `desc` (weights to be loaded after)."""
    for blk, d, h in zip(model.blocks, desc["d_inner"], desc["mlp_hidden"]):
        m = blk.mixer
        blk.mixer = MambaMixer(
            m.d_model, m.d_state, m.d_conv, dt_rank=m.dt_rank, direction=m.direction, d_inner=d, chunk=m.chunk
        )
        fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
        blk.mlp.fc1 = nn.Linear(fc1.in_features, h, bias=fc1.bias is not None)
        blk.mlp.fc2 = nn.Linear(h, fc2.out_features, bias=fc2.bias is not None)
