"""Compact training (`--compact_train auto`): a structured state trains the physically smaller model.

A state whose hard mask drops whole units (Refill states >= 1, RSST from its removal step on)
trains the compact form of the dense model (compact.py, `silent=True`: only units that add
nothing are removed, so the compact forward and backward equal the masked ones up to float
reordering). `CompactPhase` builds it from the dense model and the hard mask, moves the
optimizer's per-parameter state into it by the same indices (the same optimizer object, its
params swapped), and writes the trained values back into the dense model (`sync`) before every
checkpoint and at the state end. Checkpoints, resume, the regroup, export and masks.png all see
the dense model as before; the weights compaction removes keep their values there (in masked
dense training an unmasked weight of a dropped unit would still shrink under weight decay; it has
no effect on the output either way). What compaction cannot remove (residual-stream CNN channels,
unstructured masks) stays masked in the compact model: `mask_pairs` are re-applied after every step.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.nn as nn

import pruning_utils as pu
from compact import CompactError, Index, compact_model
from distributed import wrap_for_training
from export import count_macs, count_params, random_input


def gather(t: torch.Tensor, ix: dict[int, torch.Tensor]) -> torch.Tensor:
    """The entries of `t` that compaction keeps (`ix`: dim -> kept indices)."""
    for dim, idx in sorted(ix.items()):
        t = t.index_select(dim, idx.to(t.device))
    return t


@torch.no_grad()
def scatter_(dst: torch.Tensor, src: torch.Tensor, ix: dict[int, torch.Tensor]) -> None:
    """Write the compact `src` into its place in `dst` (in place; the other entries unchanged)."""
    if not ix:
        dst.copy_(src)
        return
    (dim, idx), rest = min(ix.items()), {d: i for d, i in ix.items() if d != min(ix)}
    idx = idx.to(dst.device)
    part = dst.index_select(dim, idx)
    scatter_(part, src, rest)
    dst.index_copy_(dim, idx, part)


def mask_pairs(model: nn.Module, family, hard: pu.Masks) -> tuple[list, list]:
    """(tensors, 0/1 values) the hard mask zeroes after every step: the prunable weights, and the
    BatchNorm scale and shift and the extras (a Mamba channel's conv1d, A_log, D, biases) of units
    left without weights (`pu.dead_norm_masks`)."""
    weights, modules = pu.prunable_weights(model), dict(model.named_modules())
    groups = [g for gs in family.unit_kinds(model).values() for g in gs]
    norms = pu.dead_norm_masks(groups, modules, hard)
    tensors = [weights[n] for n in hard] + [t for t, _ in norms]
    return tensors, [pu.mask_like(hard[n], weights[n]) for n in hard] + [m for _, m in norms]


class Live:
    """What train_one_epoch trains: the current network, looked up at every call (it changes
    from the dense to the compact one at an RSST removal, mid-epoch)."""

    def __init__(self, get):
        self.get = get

    def train(self, mode: bool = True):
        return self.get().train(mode)

    def __call__(self, x):
        return self.get()(x)


class CompactPhase:
    """The compact form of `dense` under `hard`, trained in its place until the state ends."""

    def __init__(self, dense: nn.Module, hard: pu.Masks, family):
        self.dense, self.index, self.desc = dense, {}, {}
        with torch.random.fork_rng(devices=[]):  # new layers draw an init: keep the run's RNG stream
            self.model: nn.Module = compact_model(dense, hard, silent=True, index=self.index, desc_out=self.desc)
        self.model.train(dense.training)
        self.hard = {n: gather(m, self.index.get(f"{n}.weight", {})) for n, m in hard.items()}
        self.mask_tensors, self.mask_values = mask_pairs(self.model, family, self.hard)
        self.dense_params = dict(dense.named_parameters())
        self.small_params = dict(self.model.named_parameters())
        self.opt_state: dict[str, dict] = {}  # dense-shaped optimizer state, by parameter name

    @staticmethod
    def build(dense: nn.Module, hard: pu.Masks, family) -> CompactPhase | None:
        """The phase, or None when compaction removes nothing (or cannot compact this model)."""
        try:
            phase = CompactPhase(dense, hard, family)
        except CompactError:
            return None
        return phase if count_params(phase.model) < count_params(dense) else None

    def ix(self, name: str) -> Index:
        return self.index.get(name, {})

    # ---- optimizer
    def adopt(self, opt: torch.optim.Optimizer) -> None:
        """Point `opt` at the compact parameters, its per-parameter state gathered to them."""
        name_of = {id(p): n for n, p in self.dense_params.items()}
        state = defaultdict(dict)
        for group in opt.param_groups:
            names = [name_of[id(p)] for p in group["params"]]
            for n, p in zip(names, group["params"]):
                self.opt_state[n] = opt.state.get(p, {})
                state[self.small_params[n]] = {k: self._gather_state(n, v) for k, v in self.opt_state[n].items()}
            group["params"] = [self.small_params[n] for n in names]
        opt.state = state

    def _gather_state(self, name: str, v):
        if torch.is_tensor(v) and v.shape == self.dense_params[name].shape:
            return gather(v, self.ix(name)).clone()
        return v.clone() if torch.is_tensor(v) else v

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict:
        """`opt.state_dict()` in the dense form (what checkpoints hold)."""
        sd = opt.state_dict()
        name_of = {id(p): n for n, p in self.small_params.items()}
        names = [name_of[id(p)] for g in opt.param_groups for p in g["params"]]
        dense_state = {}
        for i, n in enumerate(names):
            small = opt.state.get(self.small_params[n])
            if not small:
                continue
            full = self.opt_state.setdefault(n, {})
            for k, v in small.items():
                if torch.is_tensor(v) and v.shape == self.small_params[n].shape:
                    if k not in full or full[k].shape != self.dense_params[n].shape:
                        full[k] = torch.zeros_like(self.dense_params[n], dtype=v.dtype)
                    scatter_(full[k], v, self.ix(n))
                else:
                    full[k] = v.clone() if torch.is_tensor(v) else v
            dense_state[i] = full
        return {"state": dense_state, "param_groups": sd["param_groups"]}

    # ---- weights
    @torch.no_grad()
    def sync(self) -> None:
        """Write the compact weights and buffers into the dense model."""
        dense = self.dense.state_dict()
        for key, v in self.model.state_dict().items():
            if key in dense:
                scatter_(dense[key], v, self.ix(key))

    def apply_hard(self) -> None:
        with torch.no_grad():
            torch._foreach_mul_(self.mask_tensors, self.mask_values)


class CompactTraining:
    """The state loop's side of compact training (imp_loop.IMPRun mixes it in): when a state
    trains compact, the switch, the MAC ratio, and the way back to the dense model."""

    @property
    def live(self) -> nn.Module:
        """The model in training: the compact one during a compact phase, else the dense one."""
        return self.phase.model if self.phase is not None else self.model

    def train_form(self, state: int) -> str:
        """Which form trains `state` (the state header)."""
        if not self.compacts(state):
            return "masked dense"
        return "compact" + (" from the RSST removal" if pu.count_ones(self.ticket.penalty) else "")

    def compacts(self, state: int) -> bool:
        a, family = self.args, self.family
        return a.compact_train == "auto" and state > 0 and bool(self.groups) and family.compact_units is not None

    def go_compact(self, state: int, opt) -> float:
        """Train the compact model from here to the state end, when it removes anything; returns
        the seconds the switch took."""
        t0 = time.perf_counter()
        self.phase = CompactPhase.build(self.model, self.ticket.hard, self.family) if self.compacts(state) else None
        if self.phase is not None:
            self.phase.adopt(opt)
            self.model.zero_grad(set_to_none=True)
            self.mask_tensors, self.mask_values = self.phase.mask_tensors, self.phase.mask_values
            if self.args.sync_bn and self.dist.enabled:  # compaction builds plain BatchNorm2d; same parameters
                torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.phase.model)
            self.net = wrap_for_training(self.phase.model, self.dist, self.device, self.args.compile)
            self.say(f"state {state:2d} trains the compact model: {self.mac_ratio():.3f} of the dense MACs per sample")
            self.say("  " + self.family.describe(self.phase.desc, self.model).replace("\n", "\n  "))
        return time.perf_counter() - t0

    def mac_ratio(self) -> float:
        """Per-sample MACs of the model in training over the dense model's (1 when dense)."""
        if self.phase is None:
            return 1.0
        self.dense_macs = getattr(self, "dense_macs", None) or macs_per_sample(
            self.model, self.data.img_size, self.device
        )
        return macs_per_sample(self.phase.model, self.data.img_size, self.device) / self.dense_macs

    def sync_dense(self) -> None:
        """Write the compact model's weights into the dense model (during a compact phase)."""
        if self.phase is not None:
            self.phase.sync()

    def end_compact(self) -> None:
        """Back to the dense model, the compact one's weights written into it."""
        if self.phase is not None:
            self.phase.sync()
            self.phase, self.net = None, self.dense_net
            self.set_hard(self.ticket.hard)


def macs_per_sample(model: nn.Module, img_size: int, device) -> int:
    """Forward multiply-accumulates of one sample (eval mode, no RNG drawn, the mode restored)."""
    was = model.training
    model.eval()
    try:
        return count_macs(model, random_input(1, img_size, device))
    finally:
        model.train(was)
