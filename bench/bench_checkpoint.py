"""Checkpoint sizes against the model's weights: the best-epoch file (weights + hard mask, bool),
the state checkpoint and latest.pth.tar (weights, the four masks stored once, optimizer state,
progress). Written by the run's own code (IMPRun._payload) after one real training step of
state 1 (vit_tiny, vit_small; AdamW state filled), on synthetic data. Target: best <= 1.3x.

    python bench/bench_checkpoint.py [--record]
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile

from common import bench_parser, record

import torch

import main_imp_fillback as mif  # noqa: E402  (common puts the repository root on sys.path)
from imp_loop import IMPRun  # noqa: E402
from trainer import build_optimizer, build_scheduler, grad_scaler  # noqa: E402

TARGET = 1.3


def sizes(arch: str, tmp: str) -> tuple[int, dict[str, int]]:
    """(bytes of the model's parameters and buffers, {file: bytes})."""
    args = mif.parse_args(
        [
            "--arch",
            arch,
            "--dataset",
            "synthetic",
            "--synthetic_size",
            "64",
            "--batch_size",
            "16",
            "--device",
            "cpu",
            "--wandb",
            "disabled",
            "--save_dir",
            os.path.join(tmp, arch),
            "--vit_structured",
            "--vit_prune_target",
            "both",
        ]
    )
    mif.resolve(args)
    os.makedirs(args.save_dir, exist_ok=True)
    run = IMPRun(args, None)
    run.set_ticket(run.next_ticket(0))  # a state-1 ticket: four distinct masks
    opt = build_optimizer(run.model, args.optimizer, args.lr, args.momentum, args.weight_decay)
    x, y = next(iter(run.train_loader))
    torch.nn.functional.cross_entropy(run.model(x), y).backward()
    opt.step()
    out = {
        "opt": opt,
        "sched": build_scheduler(opt, 4, 1, 0, "cosine", None),
        "pen": run.new_penalty(),
        "st": {"history": [], "best": {}, "trace": {"step": [], "lambda": [], "norm": []}},
        "scaler": grad_scaler(None),
    }
    files = {}
    for name, slim in (("model_SA_best", True), ("checkpoint / latest", False)):
        path = os.path.join(tmp, f"{arch}_{slim}.pth.tar")
        torch.save(run._payload(1, 1, "best" if slim else "done", out, slim=slim), path)
        files[name] = os.path.getsize(path)
    weights = sum(t.numel() * t.element_size() for t in run.model.state_dict().values())
    return weights, files


def main(argv: list[str] | None = None) -> int:
    a = bench_parser(__doc__).parse_args(argv)
    lines = [
        "| arch | weights MB | best MB (x weights) | state / latest MB (x weights) | best <= 1.3x |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("vit_tiny", "vit_small"):
            w, f = sizes(arch, tmp)
            best, full = f["model_SA_best"], f["checkpoint / latest"]
            lines.append(
                f"| {arch} | {w / 1e6:.1f} | {best / 1e6:.1f} ({best / w:.2f}x) | {full / 1e6:.1f} "
                f"({full / w:.2f}x) | {'met' if best / w <= TARGET else 'MISSED'} |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        "Masks are bool (1 byte per prunable weight) and the hard mask is stored once (`mask` and "
        "`masks['hard']` are one tensor); the optimizer state (AdamW: 2x the weights) is only in the state "
        "checkpoint and latest.pth.tar.",
    ]
    if a.record:
        record("Checkpoint sizes", "python bench/bench_checkpoint.py " + shlex.join(sys.argv[1:]), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
