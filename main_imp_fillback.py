"""Iterative magnitude pruning with rewinding, regrouped into structured tickets.

After every state the unstructured IMP mask M is regrouped into whole units (conv channels, ViT
heads, MLP neurons) R. Refill trains the next state under R; RSST trains under R or M with a
growing penalty on P = M and not R, then removes P. See ALGORITHM.md and CLI.md.

    python main_imp_fillback.py --arch vit_tiny --dataset cifar100 --struct rsst --vit_structured
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import yaml

import pruning_utils as pu
from checkpoints import (Interrupted, StopFlag, UsageError, find_existing_run, install_stop_handlers,
                         last_good_checkpoint, load_resume_checkpoint, restore_handlers)
from dataset import DATASETS, DataError
from distributed import shutdown
from imp_loop import IMPRun
from models import MODEL_NAMES, is_vit
from rsst import SCHEDULES
from trainer import RECIPES, NonFiniteLoss, parse_milestones
from vit_pruning_utils import VIT_TARGETS

RUNTIME_KEYS = ("config", "resume", "checkpoint", "overwrite", "wandb", "device", "workers", "threads")
RUN_KEYS = ("save_dir", "exp_name")  # name a run: not taken from --config, kept on --resume


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


# ------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("Data")
    g.add_argument("--dataset", default="cifar10", choices=DATASETS, help="dataset")
    g.add_argument("--data", default="data", help="dataset root (CIFAR is downloaded here when reachable)")
    g.add_argument("--batch_size", type=int, default=128, help="batch size")
    g.add_argument("--workers", type=int, default=None, help="loader workers (default: 0 for digits/synthetic, else min(4, cpus))")
    g.add_argument("--synthetic_size", type=int, default=512, help="training images of --dataset synthetic")
    g.add_argument("--no_gpu_data", action="store_true",
                   help="on CUDA, use the CPU DataLoader instead of GPU-resident data augmented on the GPU")
    g = p.add_argument_group("Model")
    g.add_argument("--arch", default="res20s", choices=MODEL_NAMES, help="model")
    g.add_argument("--init", default=None, help="init weights file (default: create init.pth.tar in the save dir)")
    g.add_argument("--vit_pretrained", action="store_true", help="start ViTs from timm ImageNet weights (needs network)")
    g = p.add_argument_group("Training (defaults: per-family recipe, see README)")
    g.add_argument("--epochs", type=int, default=80, help="epochs per state")
    g.add_argument("--optimizer", default=None, choices=["sgd", "adamw"], help="CNN: sgd, ViT: adamw")
    g.add_argument("--lr", type=float, default=None, help="base lr (CNN 0.1, ViT 1e-3)")
    g.add_argument("--momentum", type=float, default=None, help="SGD momentum (0.9)")
    g.add_argument("--weight_decay", type=float, default=None, help="CNN 1e-4, ViT 0.05")
    g.add_argument("--warmup", type=float, default=None, help="warmup epochs (CNN 0, ViT min(5, epochs/8))")
    g.add_argument("--lr_schedule", default=None, choices=["step", "cosine"], help="CNN step, ViT cosine")
    g.add_argument("--decreasing_lr", default=None, help="epochs of x0.1 steps, e.g. 40,60 (default: at 50%%,75%% of the state)")
    g.add_argument("--label_smoothing", type=float, default=None, help="CNN 0, ViT 0.1")
    g.add_argument("--mixup", type=float, default=None, help="mixup alpha (CNN 0, ViT 0.8)")
    g.add_argument("--cutmix", type=float, default=None, help="cutmix alpha (CNN 0, ViT 1.0)")
    g.add_argument("--seed", type=int, default=1, help="seeds python, numpy and torch")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    g.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    g = p.add_argument_group("Pruning")
    g.add_argument("--struct", default="rsst", choices=["rsst", "refill"], help="how to reach the structured mask")
    g.add_argument("--unstructured", action="store_true", help="skip the regroup (R = M): plain unstructured IMP")
    g.add_argument("--criteria", default="magnitude", choices=sorted(pu.CRITERIA), help="unit importance")
    g.add_argument("--sorting_mode", default="layerwise", choices=["layerwise", "global"], help="unit ranking scope")
    g.add_argument("--rate", type=float, default=0.2, help="fraction of remaining prunable weights removed per state")
    g.add_argument("--pruning_times", type=int, default=20, help="number of states")
    g.add_argument("--fillback_rate", type=float, default=0.0, help="fraction of missing units added back, in [0, 1]")
    g.add_argument("--calib_batches", type=int, default=1, help="batches for l1/l2/saliency")
    g.add_argument("--prune_type", default="lt", choices=["lt", "rewind_lt", "pt"], help="rewind point")
    g.add_argument("--rewind_epoch", type=int, default=2, help="rewind_lt: epoch of state 0 to rewind to")
    g.add_argument("--pretrained", default=None, help="pt: weights file to start from and rewind to")
    g = p.add_argument_group("RSST")
    g.add_argument("--reg_granularity_prune", type=float, default=1.0, help="penalty strength reached at state end")
    g.add_argument("--RST_schedule", default="exp_custom_exponents", choices=sorted(SCHEDULES), help="lambda curve")
    g.add_argument("--exponents", type=float, default=4, help="n of exp_custom_exponents")
    g = p.add_argument_group("ViT")
    g.add_argument("--vit_structured", action="store_true", help="head/neuron-level quasi-structured regroup")
    g.add_argument("--vit_prune_target", default="head", choices=VIT_TARGETS, help="unit kinds regrouped")
    g = p.add_argument_group("Output")
    g.add_argument("--save_dir", default=None, help="output folder (default {dataset}_{struct}_output_{run name})")
    g.add_argument("--exp_name", default=None, help="run name (default: auto)")
    g.add_argument("--resume", action="store_true", help="continue the run in --save_dir (or --checkpoint)")
    g.add_argument("--checkpoint", default=None, help="resume from this file")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --save_dir")
    g.add_argument("--config", default=None, help="YAML file of flags; command-line flags override it")
    g = p.add_argument_group("Logging")
    g.add_argument("--wandb", default="auto", choices=["auto", "online", "offline", "disabled"], help="wandb mode")
    g.add_argument("--wandb_project", default="RSST", help="wandb project")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        try:
            with open(args.config) as f:
                cfg = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UsageError(f"--config {args.config}: cannot read ({type(e).__name__})") from None
        unknown = sorted(set(cfg) - set(vars(args)))
        if unknown:
            raise UsageError(f"--config {args.config}: unknown keys {', '.join(unknown)}")
        parser.set_defaults(**{k: v for k, v in cfg.items() if k not in RUNTIME_KEYS + RUN_KEYS})
        args = parser.parse_args(argv)
    return args


def validate(args: argparse.Namespace) -> None:
    """One clear line for each bad value (CLI.md)."""
    checks = [
        (0 < args.rate < 1, f"--rate {args.rate}: must be in (0, 1)"),
        (args.epochs >= 1, f"--epochs {args.epochs}: must be >= 1"),
        (args.pruning_times >= 1, f"--pruning_times {args.pruning_times}: must be >= 1"),
        (args.batch_size >= 1, f"--batch_size {args.batch_size}: must be >= 1"),
        (0 <= args.fillback_rate <= 1, f"--fillback_rate {args.fillback_rate}: must be in [0, 1]"),
        (args.calib_batches >= 1, f"--calib_batches {args.calib_batches}: must be >= 1"),
        (args.reg_granularity_prune >= 0, f"--reg_granularity_prune {args.reg_granularity_prune}: must be >= 0"),
        (args.exponents > 0, f"--exponents {args.exponents}: must be > 0"),
        (args.synthetic_size >= 16, f"--synthetic_size {args.synthetic_size}: must be >= 16"),
        (args.lr is None or args.lr > 0, f"--lr {args.lr}: must be > 0"),
        (args.workers is None or args.workers >= 0, f"--workers {args.workers}: must be >= 0"),
        (args.threads >= 0, f"--threads {args.threads}: must be >= 0"),
        (not args.vit_structured or is_vit(args.arch),
         f"--vit_structured needs a ViT arch (got --arch {args.arch}); CNNs regroup channels by default"),
        (args.prune_type != "pt" or args.pretrained, "--prune_type pt needs --pretrained FILE"),
        (args.prune_type != "rewind_lt" or 0 <= args.rewind_epoch <= args.epochs,
         f"--rewind_epoch {args.rewind_epoch}: must be in [0, --epochs]"),
        (not args.vit_pretrained or is_vit(args.arch), "--vit_pretrained needs a ViT arch"),
        (not (args.resume and args.overwrite), "--resume and --overwrite exclude each other"),
        (not args.resume or args.save_dir or args.checkpoint, "--resume needs --save_dir DIR or --checkpoint FILE"),
        (args.device in ("auto", "cpu") or args.device.startswith("cuda"), f"--device {args.device}: use auto, cpu or cuda[:N]"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)
    for flag in ("init", "pretrained", "checkpoint"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise UsageError(f"--{flag} {path}: file not found")
    if args.decreasing_lr:
        try:
            parse_milestones(args.decreasing_lr)
        except ValueError:
            raise UsageError(f"--decreasing_lr {args.decreasing_lr}: use comma-separated epochs, e.g. 40,60") from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine")


def resolve_recipe(args: argparse.Namespace) -> None:
    """Fill the per-family training defaults (README "Training recipes")."""
    family = "vit" if is_vit(args.arch) else "cnn"
    for key, value in RECIPES[family].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if family == "vit" and args.warmup == RECIPES["vit"]["warmup"]:
        args.warmup = float(min(args.warmup, args.epochs // 8))
    if args.workers is None:
        args.workers = 0 if args.dataset in ("digits", "synthetic") else min(4, os.cpu_count() or 1)
    if args.exp_name is None:
        args.exp_name = auto_run_name(args)
    if args.save_dir is None:
        args.save_dir = f"{args.dataset}_{args.struct}_output_{args.exp_name}"


def auto_run_name(args: argparse.Namespace) -> str:
    """struct, arch, dataset, schedule/reg/exponents (rsst) or fill rate (refill), criteria,
    rate, struct_{target} with --vit_structured, timestamp."""
    parts = [args.struct, args.arch, args.dataset]
    if args.struct == "rsst":
        parts += [args.RST_schedule.replace("^", ""), f"reg{args.reg_granularity_prune:g}"]
        if args.RST_schedule == "exp_custom_exponents":
            parts.append(f"exp{args.exponents:g}")
    else:
        parts.append(f"fill{args.fillback_rate:g}")
    parts += [args.criteria, f"rate{args.rate:g}"]
    if args.vit_structured:
        parts.append(f"struct_{args.vit_prune_target}")
    elif args.unstructured or is_vit(args.arch):
        parts.append("unstructured")
    return "_".join(parts + [time.strftime("%Y%m%d-%H%M%S")])


# ---------------------------------------------------------------------------- set-up
def setup_run(argv: list[str] | None) -> tuple[argparse.Namespace, dict | None]:
    """Parse, validate, resolve, and prepare the save dir; returns args and a resume checkpoint."""
    args = parse_args(argv)
    validate(args)
    resume_ck = None
    if args.resume:
        resume_ck = load_resume_checkpoint(args)
        defaults = vars(build_parser().parse_args([]))
        for k, v in resume_ck["config"].items():
            if k in RUNTIME_KEYS + ("save_dir",):
                continue
            given = getattr(args, k, None)
            if k in defaults and given != defaults[k] and given != v:
                where = args.checkpoint or args.save_dir
                raise UsageError(f"--{k} {given}: {where} holds a run with --{k} {v} "
                                 f"({resume_ck['config']['arch']}, {resume_ck['config']['dataset']}, "
                                 f"{resume_ck['config']['struct']}); resume it without --{k} or start a new run")
            setattr(args, k, v)
        if not args.save_dir:
            args.save_dir = os.path.dirname(os.path.abspath(args.checkpoint))
    resolve_recipe(args)
    existing = find_existing_run(args.save_dir) if os.path.isdir(args.save_dir) else []
    if existing and not (args.resume or args.overwrite):
        raise UsageError(f"--save_dir {args.save_dir} holds another run ({os.path.basename(existing[0])}); "
                         "pass --resume to continue it or --overwrite to replace it")
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            os.makedirs(args.save_dir, exist_ok=True)
            if args.overwrite:
                for f in existing:
                    os.remove(f)
            probe = os.path.join(args.save_dir, ".write_test")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise UsageError(f"--save_dir {args.save_dir}: cannot write ({e.strerror})") from None
    return args, resume_ck


def write_args(args: argparse.Namespace) -> None:
    """args.yaml: the resolved config; `--config args.yaml` replays the run."""
    with open(os.path.join(args.save_dir, "args.yaml"), "w") as f:
        yaml.safe_dump({k: v for k, v in vars(args).items() if k not in RUNTIME_KEYS}, f, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    stop = StopFlag()
    previous = install_stop_handlers(stop)
    try:
        return _main(argv, stop)
    finally:
        restore_handlers(previous)


def _main(argv: list[str] | None, stop: StopFlag) -> int:
    try:
        args, resume_ck = setup_run(argv)
        run = IMPRun(args, resume_ck, stop)
        if resume_ck is None and run.dist.is_main:
            write_args(args)
    except (UsageError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    resume_cmd = f"python main_imp_fillback.py --resume --save_dir {args.save_dir}"
    try:
        run.run(resume_ck)
    except NonFiniteLoss as e:
        print(f"error: {e}; run stopped. Last good checkpoint: {last_good_checkpoint(args.save_dir)}",
              file=sys.stderr)
        return 1
    except Interrupted as e:
        if run.dist.is_main:
            print(f"stopped by signal {e.signum}; checkpoint written. Continue with: {resume_cmd}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"interrupted. Continue with: {resume_cmd}", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"error: {e}; last good checkpoint: {last_good_checkpoint(args.save_dir)}", file=sys.stderr)
        return 1
    finally:
        shutdown(run.dist)
    run.say(f"done: outputs in {args.save_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
