"""Vision Mamba regroup: SSM inner channels and MLP neurons as whole units.

Inner channel `c` of a block's mixer (d_inner channels) owns rows c (the x half) and d_inner + c
(the z half) of `in_proj.weight`, column c of `out_proj.weight`, and in each scan direction column
c of `x_proj.weight` and row c of `dt_proj.weight`; its `extras` (not magnitude pruned, zeroed with
the channel) are conv1d channel c (weight and bias), dt_proj.bias[c], A_log row c and D[c] of each
direction. It is scored by its slice of the mixer output entering `out_proj` (the gated, averaged
scan output), as a ViT head is by its slice entering `proj`. MLP neuron `j` owns row j of
`mlp.fc1.weight` and column j of `mlp.fc2.weight` (and fc1.bias[j] as an extra), scored by the
input of fc2. A dropped channel is entirely zero, so its export needs no constant folding.
"""

from __future__ import annotations

import torch.nn as nn

from pruning_utils import Member, UnitGroup, prunable_weights

MAMBA_TARGETS = ("ssm", "mlp", "both")


def _extra(params: dict[str, nn.Parameter], name: str) -> Member:
    """A per-channel parameter whose first dimension enumerates the channels."""
    p = params[name]
    return Member(name, (p.shape[0], p[0].numel()), 0)


def channel_groups(model: nn.Module) -> list[UnitGroup]:
    """One group per block: its mixer's inner channels across both scan directions."""
    weights, params = prunable_weights(model), dict(model.named_parameters())
    groups = []
    for b in model.mamba_layout():
        d = b.d_inner
        members = [Member(b.in_proj, (2, d, weights[b.in_proj].shape[1]), 1)]
        extras = []
        for conv, x_proj, dt_proj, a_log, d_skip in b.scans:
            x, dt = f"{b.mixer}.{x_proj}", f"{b.mixer}.{dt_proj}"
            members += [Member(x, tuple(weights[x].shape), 1), Member(dt, tuple(weights[dt].shape), 0)]
            names = (f"{conv}.weight", f"{conv}.bias", f"{dt_proj}.bias", a_log, d_skip)
            extras += [_extra(params, f"{b.mixer}.{n}") for n in names]
        members.append(Member(b.out_proj, tuple(weights[b.out_proj].shape), 1))
        unit = UnitGroup(b.in_proj, "inner channel", d, tuple(members), b.out_proj, True, -1, None, tuple(extras))
        groups.append(unit)
    return groups


def neuron_groups(model: nn.Module) -> list[UnitGroup]:
    """One group per block: MLP hidden neurons across fc1 rows (and bias) and fc2 columns."""
    weights, params = prunable_weights(model), dict(model.named_parameters())
    groups = []
    for b in model.mamba_layout():
        fc1, fc2 = weights[b.fc1], weights[b.fc2]
        members = (Member(b.fc1, tuple(fc1.shape), 0), Member(b.fc2, tuple(fc2.shape), 1))
        extras = (_extra(params, f"{b.fc1}.bias"),) if f"{b.fc1}.bias" in params else ()
        groups.append(UnitGroup(b.fc1, "neuron", fc1.shape[0], members, b.fc2, True, -1, None, extras))
    return groups


def mamba_unit_groups(model: nn.Module, target: str = "both") -> list[UnitGroup]:
    """The unit groups `--mamba_prune_target` regroups: inner channels, MLP neurons, or both."""
    if target not in MAMBA_TARGETS:
        raise ValueError(f"mamba_prune_target {target!r}; choose from {', '.join(MAMBA_TARGETS)}")
    groups = channel_groups(model) if target in ("ssm", "both") else []
    return groups + (neuron_groups(model) if target in ("mlp", "both") else [])
