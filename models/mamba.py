"""Vision Mamba: patch tokens through blocks of a selective-state-space mixer and an MLP.

Small images (patch 4, 32 px: 64 tokens; width / depth / d_state / expand / MLP ratio):
mamba_tiny 96 / 12 / 8 / 2 / 4, mamba_small 192 / 24 / 16 / 2 / 4, mamba_base 384 / 24 / 16 / 2 / 4;
mamba_small_imagenet and mamba_base_imagenet: the same at patch 16, 224 px (196 tokens).

A block is x + drop_path(mixer(norm1(x))), then x + drop_path(mlp(norm2(x))) (timm `Mlp`:
fc1 -> GELU -> fc2); then a final norm, mean pooling over the tokens and a linear head. The
mixer's parameters are named as in mamba_ssm (`in_proj`, `conv1d`, `x_proj`, `dt_proj`, `A_log`,
`D`, `out_proj`) and initialised as Mamba does, so published weights map by name.

Image patches have no causal order, so the mixer scans both ways by default (Vim's bidirectional
design): the backward scan runs over the flipped sequence with its own `conv1d_b`, `x_proj_b`,
`dt_proj_b`, `A_b_log` and `D_b`; it shares `in_proj` (x and z) and `out_proj`, and the two
directions' outputs are averaged before out_proj. `direction="forward"` gives the single causal
scan of the public code (a token then sees only the tokens before it in raster order).

Published weights (`--pretrained_file`): `mamba_weight_names` maps Vim / mamba_ssm names to ours
and `fit_mamba_state_dict` loads what maps (the MLPs, which Vim and mamba_ssm lack, keep their
init); docs/mamba.md "Pretrained weights".

Prunable: the weights of every block's Linear layers (in_proj, x_proj(_b), dt_proj(_b), out_proj,
fc1, fc2); `mamba_layout()` names them per block with the inner width (mamba_pruning_utils.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_

from .selective_scan import selective_scan

DIRECTIONS = ("bidirectional", "forward")
# per-direction parameter names (Vim's for the backward scan)
SCAN_PARAMS = {
    "forward": ("conv1d", "x_proj", "dt_proj", "A_log", "D"),
    "backward": ("conv1d_b", "x_proj_b", "dt_proj_b", "A_b_log", "D_b"),
}


@dataclass(frozen=True)
class MixerLayout:
    """Names and sizes of one block's prunable pieces: `mixer` is the module prefix, `scans` the
    per-direction (conv1d, x_proj, dt_proj, A_log, D) names, relative to `mixer`."""

    mixer: str
    in_proj: str
    out_proj: str
    scans: tuple[tuple[str, ...], ...]
    fc1: str
    fc2: str
    d_inner: int
    d_state: int


class MambaMixer(nn.Module):
    """The Mamba selective-SSM mixer over (batch, tokens, d_model), one or two scan directions."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | None = None,
        direction: str = "bidirectional",
        d_inner: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        chunk: int = 16,
    ):
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r}; choose from {', '.join(DIRECTIONS)}")
        self.d_model, self.d_state, self.d_conv, self.direction, self.chunk = d_model, d_state, d_conv, direction, chunk
        self.d_inner = d_inner if d_inner is not None else int(expand * d_model)
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        for conv, x_proj, dt_proj, a_log, d in self.scans():
            self._add_scan(conv, x_proj, dt_proj, a_log, d, dt_min, dt_max, dt_init_floor)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def scans(self) -> list[tuple[str, ...]]:
        """(conv1d, x_proj, dt_proj, A_log, D) names of each scan direction."""
        return [SCAN_PARAMS["forward"]] + ([SCAN_PARAMS["backward"]] if self.direction == "bidirectional" else [])

    def _add_scan(self, conv, x_proj, dt_proj, a_log, d, dt_min, dt_max, dt_init_floor) -> None:
        n, r = self.d_state, self.dt_rank
        setattr(
            self, conv, nn.Conv1d(self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner, padding=self.d_conv - 1)
        )
        setattr(self, x_proj, nn.Linear(self.d_inner, r + 2 * n, bias=False))
        proj = nn.Linear(r, self.d_inner, bias=True)
        nn.init.uniform_(proj.weight, -(r**-0.5), r**-0.5)
        # dt log-uniform in [dt_min, dt_max]; the bias is its inverse softplus
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        setattr(self, dt_proj, proj)
        a = torch.arange(1, n + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        setattr(self, a_log, nn.Parameter(torch.log(a)))
        setattr(self, d, nn.Parameter(torch.ones(self.d_inner)))

    def _scan(self, x: torch.Tensor, z: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """One direction over x, z (batch, d_inner, L): conv, silu, projections, gated scan."""
        conv, x_proj, dt_proj, a_log, d = (getattr(self, n) for n in names)
        u = F.silu(conv(x)[..., : x.shape[-1]])  # causal: drop the right padding
        dbc = x_proj(u.transpose(1, 2))  # (b, L, dt_rank + 2n)
        dt, B, C = dbc.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = dt_proj(dt).transpose(1, 2)  # softplus inside the scan
        A = -torch.exp(a_log.float())
        return selective_scan(u, delta, A, B.transpose(1, 2), C.transpose(1, 2), d, z, None, True, chunk=self.chunk)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (b, d_inner, L) each
        scans = self.scans()
        y = self._scan(x, z, scans[0])
        if len(scans) > 1:  # the backward scan over the flipped sequence, flipped back
            y = (y + self._scan(x.flip(-1), z.flip(-1), scans[1]).flip(-1)) / 2
        return self.out_proj(y.transpose(1, 2))


class MambaBlock(nn.Module):
    def __init__(self, dim: int, mixer: MambaMixer, mlp_hidden: int, drop_path: float):
        super().__init__()
        self.norm1, self.mixer = nn.LayerNorm(dim), mixer
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, mlp_hidden)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionMamba(nn.Module):
    """Patch embedding + learned position embedding, Mamba blocks, final norm, mean pool, head."""

    def __init__(
        self,
        num_classes: int,
        img_size: int = 32,
        patch_size: int = 4,
        embed_dim: int = 96,
        depth: int = 12,
        d_state: int = 16,
        expand: float = 2,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        direction: str = "bidirectional",
        in_chans: int = 3,
    ):
        super().__init__()
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            MambaBlock(
                embed_dim,
                MambaMixer(embed_dim, d_state, expand=expand, direction=direction),
                int(embed_dim * mlp_ratio),
                rates[i],
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(1))

    def no_weight_decay(self) -> set[str]:
        """As Mamba: no decay on A_log, D (and the position embedding)."""
        return {"pos_embed"} | {
            n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in ("A_log", "A_b_log", "D", "D_b")
        }

    def mamba_layout(self) -> list[MixerLayout]:
        out = []
        for i, blk in enumerate(self.blocks):
            p, m = f"blocks.{i}", blk.mixer
            out.append(
                MixerLayout(
                    f"{p}.mixer",
                    f"{p}.mixer.in_proj",
                    f"{p}.mixer.out_proj",
                    tuple(m.scans()),
                    f"{p}.mlp.fc1",
                    f"{p}.mlp.fc2",
                    m.d_inner,
                    m.d_state,
                )
            )
        return out

    def prunable_layers(self) -> list[str]:
        names = []
        for b in self.mamba_layout():
            names.append(b.in_proj)
            for scan in b.scans:
                names += [f"{b.mixer}.{scan[1]}", f"{b.mixer}.{scan[2]}"]
            names += [b.out_proj, b.fc1, b.fc2]
        return names


def _mamba(geometry: tuple[int, int, int], num_classes: int, img_size: int, patch_size: int, **kw) -> VisionMamba:
    """(width, depth, d_state) at expand 2 and MLP ratio 4; `kw` overrides (e.g. depth)."""
    width, depth, d_state = geometry
    return VisionMamba(num_classes, img_size, patch_size, width, **{"depth": depth, "d_state": d_state, **kw})


def mamba_tiny(num_classes: int, img_size: int = 32, **kw) -> VisionMamba:
    return _mamba((96, 12, 8), num_classes, img_size, 4, **kw)


def mamba_small(num_classes: int, img_size: int = 32, **kw) -> VisionMamba:
    return _mamba((192, 24, 16), num_classes, img_size, 4, **kw)


def mamba_base(num_classes: int, img_size: int = 32, **kw) -> VisionMamba:
    return _mamba((384, 24, 16), num_classes, img_size, 4, **kw)


def mamba_small_imagenet(num_classes: int, img_size: int = 224, **kw) -> VisionMamba:
    return _mamba((192, 24, 16), num_classes, img_size, 16, **kw)


def mamba_base_imagenet(num_classes: int, img_size: int = 224, **kw) -> VisionMamba:
    return _mamba((384, 24, 16), num_classes, img_size, 16, **kw)


# ------------------------------------------------------------------ published weights
# Vim / mamba_ssm name -> ours (after a leading "backbone." is stripped); our own names pass through
PUBLISHED_NAMES = (
    (re.compile(r"^layers\.(\d+)\.mixer\."), r"blocks.\1.mixer."),
    (re.compile(r"^layers\.(\d+)\.norm\."), r"blocks.\1.norm1."),
    (re.compile(r"^norm_f\."), "norm."),
)
_MIXER = re.compile(r"^blocks\.(\d+)\.mixer\.")


def mamba_weight_names(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`sd` under our names: "backbone." stripped, layers.N.mixer. -> blocks.N.mixer.,
    layers.N.norm. -> blocks.N.norm1., norm_f. -> norm.; returns it and the info lines."""
    out, renamed = {}, []
    for k, v in sd.items():
        new = k[len("backbone.") :] if k.startswith("backbone.") else k
        for pattern, repl in PUBLISHED_NAMES:
            new = pattern.sub(repl, new)
        if new != k:
            renamed.append((k, new))
        out[new] = v
    notes = [f"renamed {len(renamed)} tensors (e.g. {renamed[0][0]} -> {renamed[0][1]})"] if renamed else []
    return out, notes


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def _class_positions(sd: dict, n: int) -> tuple[list[int], str]:
    """The class-token positions of a pos_embed of `n` positions over a square patch grid, and
    where they sit: Vim's one `cls_token` in the middle (use_middle_cls_token, its published
    models), its `cls_token_head` / `cls_token_tail` first and last, else leading (timm)."""
    patches = math.isqrt(n) ** 2
    extra = n - patches
    if extra == 1 and "cls_token" in sd:
        return [patches // 2], "Vim's middle cls_token"
    if extra == 2 and "cls_token_head" in sd and "cls_token_tail" in sd:
        return [0, n - 1], "Vim's head and tail cls tokens"
    return list(range(extra)), "leading"


def fit_mamba_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> list[str]:
    """Load Vim / mamba_ssm / our own weights into a VisionMamba, partially; returns the info lines.

    Tensors that map (mamba_weight_names) and match in shape load. Every mixer tensor of a block
    the file covers must be there; a shape mismatch is a ValueError naming the first bad key.
    Model tensors the file lacks keep their initialization, file tensors with no place
    (cls_token, embedding, lm_head, blocks beyond --depth) are ignored: one info line each.
    A classifier of another class count is re-initialized; a pos_embed with class-token
    positions loses them (`_class_positions`) and is resampled to the model's grid
    (models/weights.py)."""
    from .weights import _shape, fit_head, fit_pos_embed

    own = model.state_dict()
    sd, notes = mamba_weight_names(sd)
    if not any(k in sd for k in own if _MIXER.match(k)):
        raise ValueError("not Mamba weights: no tensor maps to a block's mixer (layers.N.mixer.* or blocks.N.mixer.*)")
    if any(k.startswith("head.") for k in sd):
        sd = fit_head(model, own, sd, notes)
    pos, mine = sd.get("pos_embed"), own["pos_embed"]
    if pos is not None and pos.ndim == 3 and pos.shape[1] != mine.shape[1] and pos.shape[-1] == mine.shape[-1]:
        drop, where = _class_positions(sd, pos.shape[1])
        if drop:
            keep = [i for i in range(pos.shape[1]) if i not in drop]
            sd["pos_embed"] = pos[:, keep]
            notes.append(f"pos_embed: dropped class-token position(s) {drop} ({where}), the model has none")
        fit_pos_embed(model, own, sd, notes, 0)
    covered = {m.group(1) for k in sd if (m := _MIXER.match(k))}
    for k, v in own.items():
        m = _MIXER.match(k)
        if k not in sd:
            if m and m.group(1) in covered:
                raise ValueError(f"first bad key {k!r}: missing from the file")
        elif sd[k].shape != v.shape:
            raise ValueError(f"first bad key {k!r}: shape {_shape(sd[k])} in the file, {_shape(v)} in the model")
    kept, ignored = [k for k in own if k not in sd], [k for k in sd if k not in own]
    if kept:
        notes.append(f"kept their initialization: {len(kept)} tensors (e.g. {_examples(kept)})")
    if ignored:
        notes.append(f"ignored, no place in the model: {len(ignored)} tensors (e.g. {_examples(ignored)})")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return notes
