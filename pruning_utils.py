"""Masks, global magnitude pruning, and the unit regroup (score -> select -> expand).

A mask is a value: a dict `{module name: bool tensor shaped like its weight}` kept beside the
model (0/1 float tensors are accepted everywhere too). A *unit* is a group of weights kept or dropped whole
(a conv output channel, a ViT head, an MLP neuron, a Mamba inner channel); `UnitGroup` says which slices of
which weights form the units of one layer, and which activation scores them. CNN channel groups live here; ViT
head and neuron groups in `vit_pruning_utils.py`, Mamba channel and neuron groups in `mamba_pruning_utils.py`.
See ALGORITHM.md for the specification.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

Masks = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- masks
def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The prunable weights the model declares, keyed by module name."""
    modules = dict(model.named_modules())
    return {name: modules[name].weight for name in model.prunable_layers()}


def ones_masks(model: nn.Module) -> Masks:
    return {n: torch.ones_like(w, dtype=torch.bool) for n, w in prunable_weights(model).items()}


@torch.no_grad()
def apply_masks(weights: dict[str, torch.Tensor], masks: Masks) -> None:
    """Zero every masked weight in place (one fused multiply over all prunable weights)."""
    names = list(masks)
    torch._foreach_mul_([weights[n] for n in names], [masks[n].to(weights[n].dtype) for n in names])


def count_ones(masks: Masks) -> int:
    return int(sum(int(m.count_nonzero()) for m in masks.values()))


def count_total(masks: Masks) -> int:
    return sum(m.numel() for m in masks.values())


def density(masks: Masks) -> float:
    return count_ones(masks) / max(1, count_total(masks))


def mask_like(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`mask` as a contiguous tensor of the weight's dtype, device and memory format (channels_last
    weights get channels_last masks), so fused `_foreach_*` ops take their fast path."""
    return torch.empty_like(weight).copy_(mask)


def masks_to_bool(masks: Masks) -> dict[str, torch.Tensor]:
    """CPU bool copies (the saved form)."""
    return {n: m.detach().cpu().bool() for n, m in masks.items()}


def masks_from_bool(saved: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> Masks:
    """Saved masks as bool tensors on `device`."""
    return {n: m.to(device=device, dtype=torch.bool) for n, m in saved.items()}


# ------------------------------------------------------------------ magnitude pruning
def imp_keep_count(total: int, rate: float, prunings: int) -> int:
    """Weights IMP keeps after `prunings` rounds at `rate`: round(total * (1-rate)^k)."""
    return int(math.floor(total * (1.0 - rate) ** prunings + 0.5))


def _top_exact(vals: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask of the `keep` largest entries of `vals` (ties: the first index wins)."""
    thr = torch.kthvalue(vals.cpu(), vals.numel() - keep + 1).values.to(vals.device)
    chosen = vals > thr
    tied = vals == thr
    return chosen | (tied & (torch.cumsum(tied, 0) <= keep - int(chosen.count_nonzero())))


@torch.no_grad()
def global_magnitude_prune(weights: dict[str, torch.Tensor], alive: Masks, keep: int, sample: int = 65536) -> Masks:
    """Keep the `keep` largest |w| among weights alive in `alive`: one threshold for all layers.

    Weights tied at the threshold are kept in flat index order (layers in `alive`'s order), so
    the count is exact and the result deterministic. A strided sample of the alive magnitudes
    brackets the threshold in [lo, hi]; one sweep over each layer marks the weights above hi
    (all kept) and gathers the few inside the bracket, whose exact threshold a selection finds.
    Per layer that is |w|, two compares and a gather, against the one-pass floor's |w| and one
    compare; a bracket that misses falls back to one exact sort. Returns bool masks, views
    into one flat buffer.
    """
    names = list(alive)
    sizes = [alive[n].numel() for n in names]
    live = [alive[n].reshape(-1).bool() for n in names]
    n_alive = sum(int(m.count_nonzero()) for m in live)
    keep = max(0, min(keep, n_alive))
    flat = torch.empty(sum(sizes), dtype=torch.bool, device=weights[names[0]].device)
    parts = flat.split(sizes)
    out = {n: p.view_as(alive[n]) for n, p in zip(names, parts)}
    step = flat.numel() // sample
    if 0 < keep < n_alive and step >= 8 and _bracketed(weights, names, live, parts, keep, n_alive, step):
        return out
    if keep in (0, n_alive):  # nothing kept, or every alive weight
        return {n: p.copy_(m if keep else torch.zeros_like(m)).view_as(alive[n]) for n, m, p in zip(names, live, parts)}
    mag = torch.cat([torch.where(m, weights[n].detach().reshape(-1).abs().float(), -1.0) for n, m in zip(names, live)])
    flat.copy_(_top_exact(mag, keep))  # dead weights (-1) rank below every alive one
    return out


def _bracketed(weights, names, live, parts, keep: int, n_alive: int, step: int) -> bool:
    """The sampled-bracket selection behind `global_magnitude_prune`; writes `parts`, returns
    False (parts undefined) when the bracket misses the threshold."""
    s = torch.cat([weights[n].detach().reshape(-1)[::step].abs()[m[::step]] for n, m in zip(names, live)])
    s = torch.sort(s.float().cpu(), descending=True).values
    q = keep / n_alive
    r, margin = (keep - 1) * s.numel() // n_alive, int(5 * math.sqrt(q * (1 - q) * s.numel())) + 16
    hi = float(s[r - margin]) if r - margin >= 0 else math.inf
    lo = float(s[r + margin]) if r + margin < s.numel() else -math.inf
    above, band, where = 0, [], []
    longest = max(p.numel() for p in parts)  # one scratch buffer each, reused layer after layer
    a_buf = torch.empty(longest, device=parts[0].device, dtype=weights[names[0]].dtype)
    in_buf = torch.empty(longest, device=parts[0].device, dtype=torch.bool)
    for n, m, part in zip(names, live, parts):
        a = torch.abs(weights[n].detach().reshape(-1), out=a_buf[: part.numel()])
        torch.gt(a, hi, out=part)
        inner = torch.ge(a, lo, out=in_buf[: part.numel()]).logical_and_(m)
        inner.logical_xor_(part.logical_and_(m))  # lo <= |w| <= hi: inside minus above (above is inside ge)
        above += int(part.count_nonzero())
        idx = inner.nonzero().flatten()
        band.append(a[idx].float())
        where.append(idx)
    vals = torch.cat(band)
    need = keep - above
    if not 0 < need <= vals.numel():
        return need == 0
    chosen = _top_exact(vals, need)
    for part, idx, pick in zip(parts, where, chosen.split([b.numel() for b in band])):
        part.index_fill_(0, idx[pick], True)
    return True


# ------------------------------------------------------------------------------ units
@dataclass(frozen=True)
class Member:
    """One weight of a unit group, viewed as `shape` so that `axis` enumerates the units."""

    name: str
    shape: tuple[int, ...]
    axis: int


@dataclass(frozen=True)
class UnitGroup:
    """The units of one layer: which weight slices they own and which activation scores them.

    `members[0]` is the unit-bearing weight whose density sets the layer budget. The
    activation is the output (or, with `act_input`, the input) of module `act_module`; its
    dimension `act_dim` holds `num_units` contiguous slices, one per unit. `norm` names the
    BatchNorm that normalizes each unit's output (CNN channels), if any. `extras` are other
    per-unit parameters (full parameter names, e.g. a Mamba channel's conv1d bias, A_log row
    and D entry): not magnitude pruned, but zeroed with the unit when it is dropped.
    """

    layer: str
    kind: str  # "channel" | "head" | "neuron"
    num_units: int
    members: tuple[Member, ...]
    act_module: str
    act_input: bool
    act_dim: int
    norm: str | None = None
    extras: tuple[Member, ...] = ()


def unit_view(t: torch.Tensor, member: Member) -> torch.Tensor:
    """`t` (shaped like the member's weight) as [num_units, elements per unit]."""
    v = t.reshape(member.shape).movedim(member.axis, 0)
    return v.reshape(v.shape[0], -1)


def expand_units(keep: torch.Tensor, member: Member, like: torch.Tensor) -> torch.Tensor:
    """A bool tensor shaped like `like` (contiguous) that is True exactly on the kept units' slices."""
    view = [1] * len(member.shape)
    view[member.axis] = keep.numel()
    return keep.bool().view(view).expand(member.shape).reshape(like.shape).to(like.device).contiguous()


def channel_groups(model: nn.Module) -> list[UnitGroup]:
    """One group per prunable conv: its output channels (filters), scored by its output."""
    norms = model.conv_norms() if hasattr(model, "conv_norms") else {}
    groups = []
    for name, w in prunable_weights(model).items():
        if w.dim() != 4:
            continue
        c = w.shape[0]
        groups.append(
            UnitGroup(name, "channel", c, (Member(name, (c, w[0].numel()), 0),), name, False, 1, norms.get(name))
        )
    return groups


def units_all_or_nothing(groups: list[UnitGroup], masks: Masks) -> bool:
    """True when every unit of every group is entirely 0 or entirely 1 across all its members."""
    for g in groups:
        per_unit = torch.cat([unit_view(masks[m.name], m) for m in g.members], dim=1)
        if not bool(((per_unit == 0).all(1) | (per_unit == 1).all(1)).all()):
            return False
    return True


def unit_alive(group: UnitGroup, masks: Masks) -> torch.Tensor:
    """Bool per unit: does any of its weights survive in `masks`?"""
    return sum(unit_view(masks[m.name], m).float().sum(1) for m in group.members) > 0


def units_kept(groups: list[UnitGroup], masks: Masks) -> list[int]:
    """Units with any weight alive in `masks` (bool or 0/1 tensors), one count per group."""
    return [int(unit_alive(g, masks).sum()) for g in groups]


def extra_masks(
    group: UnitGroup, modules: dict[str, nn.Module], units: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, 0/1 mask) for each of the group's `extras`, 1 exactly on the slices of `units`."""
    out = []
    for m in group.extras:
        parent, _, attr = m.name.rpartition(".")
        p = getattr(modules[parent], attr)
        out.append((p, expand_units(units, m, p).to(p.dtype)))
    return out


def dead_norm_masks(
    groups: list[UnitGroup], modules: dict[str, nn.Module], masks: Masks
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(BN weight, 0/1 mask) and (BN bias, mask) for every channel group whose BatchNorm has a
    channel with no weight left in `masks`, and (extra, mask) for the `extras` of such units:
    masking them like weights makes a dropped unit output exactly 0 (not relu(bn(0))), so the
    masked network is its compact export."""
    out = []
    for g in groups:
        alive = unit_alive(g, masks)
        if bool(alive.all()):
            continue
        out += extra_masks(g, modules, alive)
        if g.norm is not None:
            bn = modules[g.norm]
            out += [(bn.weight, alive.to(bn.weight.dtype)), (bn.bias, alive.to(bn.bias.dtype))]
    return out


# ------------------------------------------------------------------------- criteria
def _score_remain(group: UnitGroup, weights, masks, stats) -> torch.Tensor:
    return sum(unit_view(masks[m.name], m).sum(1) for m in group.members).float()


def _score_magnitude(group: UnitGroup, weights, masks, stats) -> torch.Tensor:
    return sum(unit_view(weights[m.name].detach().float().abs() * masks[m.name], m).sum(1) for m in group.members)


def _from_stats(key: str) -> Callable:
    def score(group: UnitGroup, weights, masks, stats) -> torch.Tensor:
        return stats[group.layer][key]

    return score


CRITERIA: dict[str, Callable] = {
    "remain": _score_remain,
    "magnitude": _score_magnitude,
    "l1": _from_stats("l1"),
    "l2": _from_stats("l2"),
    "saliency": _from_stats("saliency"),
}
ACTIVATION_CRITERIA = ("l1", "l2", "saliency")


class _ActivationRecorder:
    """Accumulates per-unit |a|, a^2 and |a * dL/da| for one group's activation."""

    def __init__(self, group: UnitGroup):
        self.group = group
        self.abs_sum = self.sq_sum = self.sal_sum = 0.0
        self.count = 0

    def _units(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().float().movedim(self.group.act_dim, -1)
        n = self.group.num_units
        return t.reshape(-1, n, t.shape[-1] // n)

    def record(self, a: torch.Tensor) -> None:
        u = self._units(a)
        self.abs_sum = self.abs_sum + u.abs().sum((0, 2))
        self.sq_sum = self.sq_sum + u.pow(2).sum((0, 2))
        self.count += u.shape[0] * u.shape[2]
        if a.requires_grad:
            a.register_hook(lambda g: self._record_grad(a, g))

    def _record_grad(self, a: torch.Tensor, g: torch.Tensor) -> None:
        self.sal_sum = self.sal_sum + self._units(a * g).abs().sum((0, 2))

    def hook(self):
        if self.group.act_input:
            return lambda mod, args: self.record(args[0])
        return lambda mod, args, out: self.record(out)

    def stats(self) -> dict[str, torch.Tensor]:
        n = max(1, self.count)
        zero = torch.zeros(self.group.num_units)
        as_t = lambda v: v.cpu() if torch.is_tensor(v) else zero
        return {"l1": as_t(self.abs_sum) / n, "l2": (as_t(self.sq_sum) / n).sqrt(), "saliency": as_t(self.sal_sum) / n}


def collect_activation_stats(
    model: nn.Module, groups: list[UnitGroup], batches: Iterable, device: torch.device | str, with_saliency: bool
) -> dict:
    """Per-layer unit statistics of `model` (eval mode) on `batches` of (x, y).

    Hooks are keyed by module name, so each layer is scored with its own activation.
    Saliency (mean |a * dL/da|) needs a backward pass; parameter grads are cleared after.
    """
    modules = dict(model.named_modules())
    recorders, handles = [], []
    for g in groups:
        rec = _ActivationRecorder(g)
        mod = modules[g.act_module]
        reg = mod.register_forward_pre_hook if g.act_input else mod.register_forward_hook
        handles.append(reg(rec.hook()))
        recorders.append(rec)
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with torch.set_grad_enabled(with_saliency):
                out = model(x)
                if with_saliency:
                    F.cross_entropy(out.float(), y).backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {r.group.layer: r.stats() for r in recorders}


# ------------------------------------------------------------------------ selection
def unit_budget(layer_density: float, num_units: int, fillback_rate: float) -> int:
    """Units a layer keeps: round(d*N + (N - d*N) * fillback_rate), clamped to [1, N]."""
    kept = layer_density * num_units
    k = int(math.floor(kept + (num_units - kept) * fillback_rate + 0.5))
    return min(max(k, 1), num_units)


def select_layerwise(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the top-`k` units; ties go to the lower unit index."""
    order = torch.argsort(-scores.float(), stable=True)
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep


def select_global(scores: dict[str, torch.Tensor], budgets: dict[str, int]) -> dict[str, torch.Tensor]:
    """Keep the top sum(budgets) units over all layers by per-layer normalized score.

    Scores are divided by the layer's mean finite score; every layer keeps at least its best
    unit. Ties go to the earlier layer, then the lower unit index.
    """
    layers = list(scores)
    normed = []
    for name in layers:
        s = scores[name].float()
        finite = s[torch.isfinite(s)]
        mean = finite.mean() if finite.numel() else torch.tensor(0.0)
        normed.append(s / mean if mean > 0 else s)
    flat = torch.cat(normed)
    sizes = [s.numel() for s in normed]
    starts = torch.tensor([0] + sizes[:-1]).cumsum(0)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[starts + torch.stack([torch.argsort(-s, stable=True)[0] for s in normed])] = True
    rest = sum(budgets[n] for n in layers) - len(layers)
    if rest > 0:
        order = torch.argsort(-flat.masked_fill(keep, -math.inf), stable=True)
        keep[order[:rest]] = True
    return dict(zip(layers, keep.split(sizes)))


def regroup(
    groups: list[UnitGroup],
    weights: dict[str, torch.Tensor],
    masks: Masks,
    criterion: str,
    stats: dict | None = None,
    fillback_rate: float = 0.0,
    sorting_mode: str = "layerwise",
) -> tuple[Masks, list[dict]]:
    """Structured mask R from unstructured mask M (`masks`): whole units kept or dropped.

    Weights outside `groups` keep their unstructured mask. Units with no weight alive in M
    are never chosen unless a layer has nothing else (so masks only shrink across states).
    Returns R and a per-layer report (scores, budget, kept units, densities).
    """
    score_fn = CRITERIA[criterion]
    scores, budgets, reports = {}, {}, {}
    for g in groups:
        alive = unit_alive(g, masks)
        s = score_fn(g, weights, masks, stats).detach().float().cpu()
        scores[g.layer] = s.masked_fill(~alive.cpu(), -math.inf)
        d = float(masks[g.members[0].name].float().mean())
        budgets[g.layer] = min(unit_budget(d, g.num_units, fillback_rate), max(1, int(alive.sum())))
        reports[g.layer] = {
            "layer": g.layer,
            "kind": g.kind,
            "num_units": g.num_units,
            "scores": s,
            "density_before": d,
        }
    keep: dict[str, torch.Tensor] = {}
    if sorting_mode == "global":
        for kind in sorted({g.kind for g in groups}):
            names = [g.layer for g in groups if g.kind == kind]
            keep.update(select_global({n: scores[n] for n in names}, {n: budgets[n] for n in names}))
    else:
        keep = {g.layer: select_layerwise(scores[g.layer], budgets[g.layer]) for g in groups}
    regrouped = {m.name for g in groups for m in g.members}
    out = {n: m if n in regrouped else m.clone() for n, m in masks.items()}  # members replaced below
    for g in groups:
        for m in g.members:
            out[m.name] = expand_units(keep[g.layer], m, masks[m.name])
        rep = reports[g.layer]
        rep.update(
            keep=keep[g.layer],
            kept=int(keep[g.layer].sum()),
            density_after=float(out[g.members[0].name].float().mean()),
        )
    return out, [reports[g.layer] for g in groups]
