"""Export a ticket as a physically smaller model, check it against the masked model, time both.

    python export.py --checkpoint DIR/{state}checkpoint.pth.tar --out compact.pt [--device auto|cpu|cuda] [--eval]

With --eval, both models are also evaluated on the test split of the run's dataset (the compact
one must predict what the masked one does).

The compaction itself (which heads, neurons and channels go, and the constants folded in) is
in compact.py. `load_compact(path)` rebuilds the model from the file alone.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

import torch
import torch.nn as nn
from torch.utils import flop_counter

from checkpoints import UnsafeCheckpoint, load_safely
from compact import CompactError, build_compact, compact_state
from errors import DataError
from families import family_named
from models import create_model, input_norm

FORMAT = "rsst-compact-1"
TOLERANCE = 1e-4


class ExportError(Exception):
    """Bad command line or input: one line on stderr, exit code 2."""


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
        raise ExportError(f"--checkpoint {path}: " + ("is a directory" if os.path.isdir(path) else "file not found"))
    try:
        ck = load_safely(path)
    except UnsafeCheckpoint as e:
        raise ExportError(f"--checkpoint {e}") from None
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
    try:
        desc, sd = compact_state(model, ck["mask"])
    except CompactError as e:
        raise ExportError(str(e)) from None
    return {
        "format": FORMAT,
        "arch": ck["arch"],
        "num_classes": ck["num_classes"],
        "img_size": ck["img_size"],
        "model_kwargs": dict(ck.get("model_kwargs", {})),
        "compact": desc,
        "state_dict": sd,
    }


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


def latency_ms(models: dict[str, nn.Module], x: torch.Tensor, warmup: int = 2, repeats: int = 10) -> dict[str, float]:
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


def compare(
    models: dict[str, nn.Module], img_size: int, devices: list[str], batches=(1, 64), warmup: int = 2, repeats: int = 10
) -> list[dict]:
    """Per model: params, MACs per image, and latency (ms) at each device and batch size."""
    rows = [
        {"model": name, "params": count_params(m), "macs": count_macs(m, random_input(1, img_size))}
        for name, m in models.items()
    ]
    for dev in devices:
        on_dev = {name: m.to(dev) for name, m in models.items()}
        for b in batches:
            ms = latency_ms(on_dev, random_input(b, img_size, dev), warmup, repeats)
            for row in rows:
                row[f"{dev} b{b} ms"] = ms[row["model"]]
        for m in models.values():
            m.to("cpu")
    return rows


def load_test_split(config: dict, data_root: str | None, batch: int) -> tuple:
    """The test split of the run's dataset (its config as saved in the checkpoint), evaluation transforms."""
    from dataset import load_splits
    from loaders import EpochSampler, build_loaders

    if not config.get("dataset"):
        raise ExportError("--eval: the checkpoint has no run config (an older version's file); nothing to evaluate on")
    try:
        norm = input_norm(config["arch"])
        data = load_splits(
            config["dataset"],
            data_root or config.get("data", "data"),
            False,
            config.get("synthetic_size", 512),
            config.get("img_size"),
            norm,
        )
    except (DataError, ValueError, OSError) as e:
        raise ExportError(f"--eval: {str(e).splitlines()[0]} (give the dataset root with --data)") from None
    cpu = torch.device("cpu")
    loaders = build_loaders(data, config["dataset"], False, cpu, EpochSampler(len(data.train)), batch, batch, 0)
    return loaders[2], config["dataset"], len(data.test)


def accuracies(models: dict[str, nn.Module], loader, device: str) -> tuple[dict[str, float], int]:
    """Top-1 test accuracy (%) of each model (fp32, eval mode) and how many images' predictions differ."""
    correct = {name: 0 for name in models}
    differ = seen = 0
    with torch.inference_mode():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            preds = {name: m.to(device)(x).argmax(1) for name, m in models.items()}
            for name, p in preds.items():
                correct[name] += int((p == y).sum())
            first = next(iter(preds.values()))
            differ += int(sum((p != first) for p in preds.values()).count_nonzero())
            seen += len(y)
    for m in models.values():
        m.to("cpu")
    return {name: 100.0 * c / max(1, seen) for name, c in correct.items()}, differ


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
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="latency on CPU, plus CUDA with auto (when present) or cuda",
    )
    p.add_argument("--batch", type=int, default=64, help="large batch for the check and the latency")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards before timing")
    p.add_argument("--repeats", type=int, default=10, help="timed forwards (the median is reported)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the timing (default: torch's)")
    p.add_argument(
        "--eval", action="store_true", help="test accuracy of both models on the run's dataset (from its config)"
    )
    p.add_argument("--data", default=None, help="dataset root for --eval (default: the run's --data)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise ExportError("--batch, --repeats and --threads must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda: CUDA is not available on this machine")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out) or args.out.endswith(os.sep):
        raise ExportError(
            f"--out {args.out}: is a folder; give a file name, e.g. {os.path.join(args.out, 'compact.pt')}"
        )
    if not os.path.isdir(out_dir):
        raise ExportError(f"--out {args.out}: folder {out_dir} does not exist")
    if not os.access(out_dir, os.W_OK) or (os.path.exists(args.out) and not os.access(args.out, os.W_OK)):
        raise ExportError(f"--out {args.out}: not writable")
    return args


def target_density_warning(ck: dict, path: str) -> str | None:
    """A warning when the checkpoint's mask is denser than its state's structured target R (a
    best-val epoch taken before an RSST removal, in checkpoints of older versions)."""
    target = (ck.get("masks") or {}).get("target")
    match = re.fullmatch(r"(\d+)model_SA_best\.pth\.tar", os.path.basename(path))
    sibling = os.path.join(os.path.dirname(path), f"{match.group(1)}checkpoint.pth.tar") if match else None
    if target is None and sibling and os.path.isfile(sibling):
        try:
            target = torch.load(sibling, map_location="cpu", weights_only=True).get("masks", {}).get("target")
        except Exception:
            target = None
    if not target:
        return None
    density = lambda masks: (
        sum(int(m.count_nonzero()) for m in masks.values()) / max(1, sum(m.numel() for m in masks.values()))
    )
    dense, goal = density(ck["mask"]), density(target)
    if dense <= goal + 1e-9:
        return None
    return (
        f"warning: this checkpoint's mask keeps {100 * dense:.2f}% of the prunable weights, more than its "
        f"state's structured target ({100 * goal:.2f}%): it is not the state's ticket"
    )


def describe(desc: dict, model: nn.Module) -> str:
    """One line of units kept per layer."""
    return family_named(desc["family"]).describe(desc, model)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        ck = read_checkpoint(args.checkpoint)
        warning = target_density_warning(ck, args.checkpoint)
        if warning:
            print(warning, file=sys.stderr)
        masked = masked_model(ck)
        artifact = export_artifact(ck, masked)
        test_split = load_test_split(ck.get("config") or {}, args.data, args.batch) if args.eval else None
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    compact = build_compact(artifact)
    print(describe(artifact["compact"], masked))
    diff = max_abs_diff(masked, compact, random_input(args.batch, ck["img_size"]))
    print(
        f"equivalence: max |compact - masked| = {diff:.2e} on a random batch of {args.batch} "
        f"(fp32, eval; tolerance {TOLERANCE:g})"
    )
    if not diff <= TOLERANCE:
        print(
            f"error: the compact model differs from the masked model by {diff:.2e}; nothing written to {args.out}",
            file=sys.stderr,
        )
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (
        ["cuda"] if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else []
    )
    if test_split is not None:
        loader, dataset, images = test_split
        acc, differ = accuracies({"masked": masked, "compact": compact}, loader, devices[-1])
        print(
            f"test accuracy on {dataset} ({images} images, fp32, {devices[-1]}): "
            f"masked {acc['masked']:.2f} %, compact {acc['compact']:.2f} %; predictions that differ: {differ}"
        )
    rows = compare(
        {"masked": masked, "compact": compact}, ck["img_size"], devices, (1, args.batch), args.warmup, args.repeats
    )
    print(f"threads {torch.get_num_threads()}; MACs per image; latency = median of {args.repeats} forwards")
    print(format_table(rows))
    torch.save(artifact, args.out)
    print(f"wrote {args.out}; reload with export.load_compact({args.out!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
