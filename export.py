"""Export a ticket as a physically smaller model, check it against the masked model, time both.

    python export.py --checkpoint DIR/{state}checkpoint.pth.tar --out compact.pt [--device auto|cpu|cuda]

What is removed (README "Export a ticket"):
- ViT: heads whose proj input columns are all masked (they add nothing) or whose v rows are
  all masked (they output their v bias, a constant folded into proj.bias); MLP neurons whose
  fc2 column is all masked, or whose fc1 row is all masked (constant act(b1), folded into
  fc2.bias). `attn.num_heads` and `attn.attn_dim` follow, so timm's own forward runs.
- CNN: along each chain a model declares (`channel_chains()`: producer conv -> BN -> ReLU ->
  consumer), the producer channels whose filter or consumer input slice is all masked. A zeroed
  filter still emits relu(bn(0)); its exact, input-independent contribution is kept: folded
  into a Linear consumer's bias, or added by `FoldedConv2d` (zero padding makes it differ at
  the borders, so it is a map, not a bias). Residual-stream channels stay.
A layer keeps at least one unit. `load_compact(path)` rebuilds the model from the file alone.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import flop_counter

from models import create_model

FORMAT = "rsst-compact-1"
TOLERANCE = 1e-4


class ExportError(Exception):
    """Bad command line or input: one line on stderr, exit code 2."""


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
        return super().forward(x) + F.conv2d(ones, self.fold_kernel, None, self.stride, self.padding,
                                             self.dilation)


# ---------------------------------------------------------------------------- units
def _droppable(silent: torch.Tensor, constant: torch.Tensor) -> torch.Tensor:
    """Units that add nothing or a constant; all but unit 0 when every unit qualifies."""
    drop = silent | constant
    if bool(drop.all()):
        drop[0] = False  # a kept unit computes its own (zero or constant) output exactly
    return drop


def _index(keep: torch.Tensor) -> torch.Tensor:
    return keep.nonzero().flatten()


@torch.no_grad()
def _compact_attention(sd: dict, attn: nn.Module, qkv: str, proj: str, masks: dict) -> int:
    """Slice one block's heads in `sd`; returns the heads kept."""
    h, hd = attn.num_heads, attn.head_dim
    if not isinstance(attn.norm, nn.Identity) or getattr(attn, "gate", None) is not None:
        return h  # a norm or gate over attn_dim mixes heads: nothing is removable exactly
    silent = ~masks[proj].reshape(-1, h, hd).any(2).any(0)  # proj input columns all masked
    constant = ~masks[qkv].reshape(3, h, -1)[2].any(1)  # v rows all masked: output = v bias
    if attn.qkv.bias is not None and attn.proj.bias is None:
        constant = torch.zeros_like(constant)  # no proj bias to fold a v bias into
    drop = _droppable(silent, constant)
    if attn.qkv.bias is not None and attn.proj.bias is not None:
        b_v = attn.qkv.bias.reshape(3, h, hd)[2] * constant[:, None]
        w_proj = attn.proj.weight.reshape(-1, h, hd)
        sd[f"{proj}.bias"] = attn.proj.bias + torch.einsum("ohd,hd->o", w_proj[:, drop], b_v[drop])
    heads = _index(~drop)
    rows = (torch.arange(3)[:, None, None] * h * hd + heads[None, :, None] * hd + torch.arange(hd)).flatten()
    cols = (heads[:, None] * hd + torch.arange(hd)).flatten()
    sd[f"{qkv}.weight"] = attn.qkv.weight[rows]
    if attn.qkv.bias is not None:
        sd[f"{qkv}.bias"] = attn.qkv.bias[rows]
    sd[f"{proj}.weight"] = attn.proj.weight[:, cols]
    return int(heads.numel())


@torch.no_grad()
def _compact_mlp(sd: dict, mlp: nn.Module, fc1: str, fc2: str, masks: dict) -> int:
    """Slice one block's MLP neurons in `sd`; returns the neurons kept."""
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        return mlp.fc1.out_features  # a norm over the hidden units mixes them
    silent = ~masks[fc2].any(0)  # fc2 column all masked
    constant = ~masks[fc1].any(1)  # fc1 row all masked: output = act(b1)
    if mlp.fc2.bias is None:
        constant = torch.zeros_like(constant)  # no fc2 bias to fold act(b1) into
    drop = _droppable(silent, constant)
    if mlp.fc2.bias is not None:
        b1 = mlp.fc1.bias if mlp.fc1.bias is not None else torch.zeros(mlp.fc1.out_features)
        act = torch.where(constant, mlp.act(b1), torch.zeros_like(b1))
        sd[f"{fc2}.bias"] = mlp.fc2.bias + mlp.fc2.weight[:, drop] @ act[drop]
    keep = _index(~drop)
    sd[f"{fc1}.weight"] = mlp.fc1.weight[keep]
    if mlp.fc1.bias is not None:
        sd[f"{fc1}.bias"] = mlp.fc1.bias[keep]
    sd[f"{fc2}.weight"] = mlp.fc2.weight[:, keep]
    return int(keep.numel())


def _compact_vit(model: nn.Module, masks: dict, sd: dict) -> dict:
    heads, hidden = [], []
    for blk, lay in zip(model.blocks, model.blocks_layout()):
        heads.append(_compact_attention(sd, blk.attn, lay.qkv, lay.proj, masks))
        hidden.append(_compact_mlp(sd, blk.mlp, lay.fc1, lay.fc2, masks))
    return {"family": "vit", "num_heads": heads, "mlp_hidden": hidden}


def _bn_constant(bn: nn.BatchNorm2d, bias: torch.Tensor | None) -> torch.Tensor:
    """relu(bn(z)) in eval mode for the constant conv output z (its bias, or 0)."""
    z = bias if bias is not None else torch.zeros(bn.num_features)
    y = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    if bn.affine:
        y = y * bn.weight + bn.bias
    return F.relu(y)


@torch.no_grad()
def _compact_chain(sd: dict, mods: dict, chain: tuple[str, str, str], masks: dict) -> tuple[int, bool]:
    """Slice the producer channels of one chain; returns (channels kept, consumer folded)."""
    prod, norm, cons = chain
    p, bn, c = mods[prod], mods[norm], mods[cons]
    zero_filter = ~masks[prod].reshape(p.out_channels, -1).any(1)
    unused = ~masks[cons].transpose(0, 1).reshape(p.out_channels, -1).any(1) if cons in masks \
        else torch.zeros_like(zero_filter)
    drop = _droppable(unused, zero_filter)
    if not bool(drop.any()):
        return p.out_channels, False
    const = torch.where(zero_filter, _bn_constant(bn, p.bias), torch.zeros(p.out_channels))
    keep = _index(~drop)
    for key in ("weight", "bias", "fold_kernel"):  # a fold kernel from the previous chain (VGG)
        if f"{prod}.{key}" in sd:
            sd[f"{prod}.{key}"] = sd[f"{prod}.{key}"][keep]
    for key in ("weight", "bias", "running_mean", "running_var"):
        if f"{norm}.{key}" in sd:
            sd[f"{norm}.{key}"] = sd[f"{norm}.{key}"][keep]
    sd[f"{cons}.weight"] = sd[f"{cons}.weight"][:, keep]
    folded = torch.einsum("oc...,c->o...", c.weight[:, drop], const[drop])
    if isinstance(c, nn.Linear):
        sd[f"{cons}.bias"] = c.bias + folded
        return int(keep.numel()), False
    if not bool(folded.any()):
        return int(keep.numel()), False
    sd[f"{cons}.fold_kernel"] = folded.unsqueeze(1)
    return int(keep.numel()), True


def _compact_cnn(model: nn.Module, masks: dict, sd: dict) -> dict:
    mods = dict(model.named_modules())
    channels, folded = {}, []
    for chain in model.channel_chains():
        if chain[0] not in masks:
            continue  # the stem is never pruned
        kept, fold = _compact_chain(sd, mods, chain, masks)
        if kept < mods[chain[0]].out_channels:
            channels[chain[0]] = kept
        if fold:
            folded.append(chain[2])
    return {"family": "cnn", "channels": channels, "folded": folded}


def compact_state(model: nn.Module, masks: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(architecture description, state dict) of the compact form of `model` (masked, eval).

    `masks` are bool tensors keyed by prunable module name, as in a checkpoint's 'mask'.
    """
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    masks = {n: m.bool().cpu() for n, m in masks.items()}
    if hasattr(model, "blocks_layout"):
        return _compact_vit(model, masks, sd), sd
    if hasattr(model, "channel_chains"):
        return _compact_cnn(model, masks, sd), sd
    raise ExportError(f"{type(model).__name__}: no ViT block layout or CNN channel chains to compact")


# --------------------------------------------------------------------------- rebuild
def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _linear(old: nn.Linear, n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=old.bias is not None)


def _resize_vit(model: nn.Module, desc: dict) -> None:
    for blk, heads, hidden in zip(model.blocks, desc["num_heads"], desc["mlp_hidden"]):
        attn, mlp = blk.attn, blk.mlp
        attn.num_heads, attn.attn_dim = heads, heads * attn.head_dim
        attn.qkv = _linear(attn.qkv, attn.qkv.in_features, 3 * attn.attn_dim)
        attn.proj = _linear(attn.proj, attn.attn_dim, attn.proj.out_features)
        mlp.fc1 = _linear(mlp.fc1, mlp.fc1.in_features, hidden)
        mlp.fc2 = _linear(mlp.fc2, hidden, mlp.fc2.out_features)


def _resize_cnn(model: nn.Module, desc: dict) -> None:
    mods = dict(model.named_modules())
    n_out, n_in = dict(desc["channels"]), {}
    for prod, norm, cons in model.channel_chains():
        if prod in n_out:
            n_in[cons] = n_out[prod]
            bn = mods[norm]
            _set_module(model, norm, nn.BatchNorm2d(n_out[prod], bn.eps, bn.momentum, bn.affine,
                                                    bn.track_running_stats))
    for name in sorted(set(n_out) | set(n_in) | set(desc["folded"])):
        old = mods[name]
        if isinstance(old, nn.Linear):
            _set_module(model, name, _linear(old, n_in.get(name, old.in_features), old.out_features))
            continue
        cls = FoldedConv2d if name in desc["folded"] else nn.Conv2d
        _set_module(model, name, cls(n_in.get(name, old.in_channels), n_out.get(name, old.out_channels),
                                     old.kernel_size, old.stride, old.padding, old.dilation, old.groups,
                                     old.bias is not None, old.padding_mode))


def build_compact(artifact: dict) -> nn.Module:
    """The compact model an export artifact describes (weights loaded, eval mode)."""
    model = create_model(artifact["arch"], artifact["num_classes"], artifact["img_size"],
                         **artifact.get("model_kwargs", {}))
    desc = artifact["compact"]
    (_resize_vit if desc["family"] == "vit" else _resize_cnn)(model, desc)
    model.load_state_dict(artifact["state_dict"])
    return model.eval()


def load_compact(path: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported compact model from its file alone (no command line, no pickled code)."""
    artifact = torch.load(path, map_location=map_location, weights_only=True)
    if artifact.get("format") != FORMAT:
        raise ValueError(f"{path}: not an export of this project (format {artifact.get('format')!r})")
    return build_compact(artifact).to(map_location)


# ----------------------------------------------------------------------- checkpoint
def read_checkpoint(path: str) -> dict:
    """A state checkpoint of main_imp_fillback.py (or any dict with the same keys)."""
    if not os.path.isfile(path):
        raise ExportError(f"--checkpoint {path}: file not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"--checkpoint {path}: not a torch checkpoint ({type(e).__name__})") from None
    missing = [k for k in ("arch", "num_classes", "img_size", "state_dict", "mask") if k not in ck]
    if missing:
        raise ExportError(f"--checkpoint {path}: not a state checkpoint (missing {', '.join(missing)})")
    return ck


def masked_model(ck: dict) -> nn.Module:
    """The checkpoint's network with its hard mask applied, in eval mode."""
    try:
        model = create_model(ck["arch"], ck["num_classes"], ck["img_size"], **ck.get("model_kwargs", {}))
        model.load_state_dict(ck["state_dict"])
    except (ValueError, RuntimeError, TypeError) as e:
        raise ExportError(f"checkpoint does not build arch {ck['arch']!r}: {str(e).splitlines()[0]}") from None
    mods = dict(model.named_modules())
    if set(ck["mask"]) != set(model.prunable_layers()):
        raise ExportError(f"checkpoint mask keys do not match the prunable layers of {ck['arch']}")
    with torch.no_grad():
        for name, m in ck["mask"].items():
            mods[name].weight.mul_(m.to(mods[name].weight.dtype))
    return model.eval()


def export_artifact(ck: dict, model: nn.Module) -> dict:
    """The saved form: sizes, the compact architecture description and its state dict."""
    desc, sd = compact_state(model, ck["mask"])
    return {"format": FORMAT, "arch": ck["arch"], "num_classes": ck["num_classes"],
            "img_size": ck["img_size"], "model_kwargs": dict(ck.get("model_kwargs", {})),
            "compact": desc, "state_dict": sd}


# ------------------------------------------------------------------------- measuring
def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sdpa_cpu_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(q_shape, k_shape, v_shape)


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward on `x` (FlopCounterMode flops / 2; CPU SDPA counted)."""
    extra = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    with torch.inference_mode(), flop_counter.FlopCounterMode(display=False, custom_mapping=extra) as fc:
        model(x)
    return fc.get_total_flops() // 2


def latency_ms(models: dict[str, nn.Module], x: torch.Tensor, warmup: int = 2,
               repeats: int = 10) -> dict[str, float]:
    """Median wall time (ms) of one forward of each model on `x`, after `warmup` forwards.

    The models take turns within each repeat, so a change in machine load hits all alike.
    """
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, model in models.items():
                sync()
                t0 = time.perf_counter()
                model(x)
                sync()
                if i >= warmup:
                    times[name].append(1e3 * (time.perf_counter() - t0))
    return {name: statistics.median(t) for name, t in times.items()}


def max_abs_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((a(x).float() - b(x).float()).abs().max())


def random_input(batch: int, img_size: int, device: str | torch.device = "cpu", seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, img_size, img_size, generator=g).to(device)


def compare(models: dict[str, nn.Module], img_size: int, devices: list[str], batches=(1, 64),
            warmup: int = 2, repeats: int = 10) -> list[dict]:
    """Per model: params, MACs per image, and latency (ms) at each device and batch size."""
    rows = [{"model": name, "params": count_params(m), "macs": count_macs(m, random_input(1, img_size))}
            for name, m in models.items()]
    for dev in devices:
        on_dev = {name: m.to(dev) for name, m in models.items()}
        for b in batches:
            ms = latency_ms(on_dev, random_input(b, img_size, dev), warmup, repeats)
            for row in rows:
                row[f"{dev} b{b} ms"] = ms[row["model"]]
        for m in models.values():
            m.to("cpu")
    return rows


def format_table(rows: list[dict]) -> str:
    """Rows of `compare` plus a dense/compact ratio row when there are two."""
    keys = list(rows[0])
    fmt = lambda v: f"{v / 1e6:.3f}M" if isinstance(v, int) else (f"{v:.2f}" if isinstance(v, float) else v)
    lines = [" | ".join(f"{k:>12}" for k in keys)]
    lines += [" | ".join(f"{fmt(r[k]):>12}" for k in keys) for r in rows]
    if len(rows) == 2:
        ratio = ["ratio"] + [f"{rows[0][k] / max(rows[1][k], 1e-12):.2f}x" for k in keys[1:]]
        lines.append(" | ".join(f"{v:>12}" for v in ratio))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ExportError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a state checkpoint, e.g. DIR/3checkpoint.pth.tar")
    p.add_argument("--out", required=True, help="file to write the compact model to")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="latency on CPU, plus CUDA with auto (when present) or cuda")
    p.add_argument("--batch", type=int, default=64, help="large batch for the check and the latency")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards before timing")
    p.add_argument("--repeats", type=int, default=10, help="timed forwards (the median is reported)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the timing (default: torch's)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise ExportError("--batch, --repeats and --threads must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda: CUDA is not available on this machine")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise ExportError(f"--out {args.out}: folder {out_dir} does not exist")
    return args


def describe(desc: dict, model: nn.Module) -> str:
    """One line of units kept per layer."""
    if desc["family"] == "vit":
        total_h, hidden = model.blocks[0].attn.num_heads, model.blocks[0].mlp.fc1.out_features
        return ("heads kept per block: " + " ".join(f"{h}/{total_h}" for h in desc["num_heads"])
                + "\nMLP neurons kept per block: " + " ".join(f"{n}/{hidden}" for n in desc["mlp_hidden"]))
    mods = dict(model.named_modules())
    kept = " ".join(f"{n}:{c}/{mods[n].out_channels}" for n, c in desc["channels"].items()) or "none removed"
    return (f"block-internal channels kept: {kept}\nconsumers with folded constants: "
            f"{', '.join(desc['folded']) or 'none'} (residual-stream channels stay)")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        ck = read_checkpoint(args.checkpoint)
        masked = masked_model(ck)
        artifact = export_artifact(ck, masked)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    compact = build_compact(artifact)
    print(describe(artifact["compact"], masked))
    diff = max_abs_diff(masked, compact, random_input(args.batch, ck["img_size"]))
    print(f"equivalence: max |compact - masked| = {diff:.2e} on a random batch of {args.batch} "
          f"(fp32, eval; tolerance {TOLERANCE:g})")
    if not diff <= TOLERANCE:
        print(f"error: the compact model differs from the masked model by {diff:.2e}; "
              f"nothing written to {args.out}", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                         else [])
    rows = compare({"masked": masked, "compact": compact}, ck["img_size"], devices, (1, args.batch),
                   args.warmup, args.repeats)
    print(f"threads {torch.get_num_threads()}; MACs per image; latency = median of {args.repeats} forwards")
    print(format_table(rows))
    torch.save(artifact, args.out)
    print(f"wrote {args.out}; reload with export.load_compact({args.out!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
