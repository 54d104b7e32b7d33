"""Iterative magnitude pruning with rewinding, regrouped into structured tickets.

After every state the unstructured IMP mask M is regrouped into whole units (conv channels, ViT
heads, MLP neurons) R. Refill trains the next state under R; RSST trains under R or M with a
growing penalty on P = M and not R, then removes P. See ALGORITHM.md and CLI.md.

    python main_imp_fillback.py --arch vit_tiny --dataset cifar100 --struct rsst --vit_structured

This module is the command line: parse, validate, set up, run. Bad input is reported before
torch is imported (instant); the state loop lives in imp_loop.py, run files in checkpoints.py.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from errors import UsageError
from families import family_of
from models import ARCH_CHOICES
from run_config import HelpFormatter, config_tokens, finite, given_flags

# The choices of the command line, kept here so a typo is reported before torch loads;
# tests/test_cli.py checks them against the implementations (dataset, pruning_utils, rsst).
DATASETS = ("cifar10", "cifar100", "digits", "synthetic", "tiny_imagenet", "imagenet", "folder")
CRITERIA = ("l1", "l2", "magnitude", "remain", "saliency")
SCHEDULES = ("exp", "exp_custom", "exp_custom_exponents", "x", "x^2", "x^3")
VIT_TARGETS = ("head", "mlp", "both")
RUNTIME_KEYS = ("config", "resume", "checkpoint", "overwrite", "wandb", "device", "workers", "threads")
RUN_KEYS = ("save_dir", "exp_name")  # name a run: not taken from --config, kept on --resume
MAX_SEED = 2**32 - 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


# ------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("Data")
    g.add_argument("--dataset", default="cifar10", choices=DATASETS, help="dataset")
    g.add_argument("--data", default="data", help="dataset root (CIFAR is downloaded here when reachable)")
    g.add_argument("--batch_size", type=int, default=128, help="batch size (global, split over ranks)")
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="loader workers per process (default: 0 for in-memory data; image folders: this process's CPUs "
        "/ processes per node - 1, in [1, 8])",
    )
    g.add_argument("--synthetic_size", type=int, default=512, help="training images of --dataset synthetic")
    g.add_argument("--img_size", type=int, default=None, help="input size of imagenet/folder data (default: 224)")
    g.add_argument(
        "--eval_batch_size", type=int, default=None, help="evaluation batch size (default: 2 x --batch_size)"
    )
    g.add_argument(
        "--augment",
        default="recipe",
        choices=["recipe", "light"],
        help="recipe: the family's augmentation (ViT: TrivialAugment, mixup, cutmix); light: crop and flip only",
    )
    g.add_argument(
        "--no_gpu_data",
        action="store_true",
        help="per-sample DataLoader instead of batched augmentation of in-memory data (GPU or CPU)",
    )
    g = p.add_argument_group("Model")
    g.add_argument("--arch", default="res20s", choices=ARCH_CHOICES, help="model (timm:NAME: a timm ViT)")
    g.add_argument("--depth", type=int, default=None, help="blocks of a ViT or Mamba arch (default: the arch's)")
    g.add_argument("--init", default=None, help="init weights file (default: create init.pth.tar in the save dir)")
    g.add_argument(
        "--vit_pretrained", action="store_true", help="start ViTs from timm ImageNet weights (needs network)"
    )
    g.add_argument(
        "--pretrained_file",
        default=None,
        help="start a ViT or Mamba arch from a local weight file (.safetensors, .pth, .bin; timm/HF, Vim, mamba_ssm)",
    )
    g = p.add_argument_group("Training (None: the per-family recipe, see docs/training.md)")
    g.add_argument("--epochs", type=int, default=80, help="epochs per state")
    g.add_argument("--optimizer", default=None, choices=["sgd", "adamw"], help="CNN sgd, ViT adamw")
    g.add_argument("--lr", type=finite, default=None, help="base lr (CNN 0.1, ViT 1e-3)")
    g.add_argument("--momentum", type=finite, default=None, help="SGD momentum in [0, 1) (0.9)")
    g.add_argument("--weight_decay", type=finite, default=None, help="CNN 1e-4, ViT 0.05")
    g.add_argument("--warmup", type=finite, default=None, help="warmup epochs (CNN 0, ViT min(5, epochs/8))")
    g.add_argument("--lr_schedule", default=None, choices=["step", "cosine"], help="CNN step, ViT cosine")
    g.add_argument(
        "--decreasing_lr", default=None, help="epochs of x0.1 steps, e.g. 40,60 (CNN: 50%%, 75%% of the state)"
    )
    g.add_argument("--label_smoothing", type=finite, default=None, help="in [0, 1) (CNN 0, ViT 0.1)")
    g.add_argument("--mixup", type=finite, default=None, help="mixup alpha (CNN 0, ViT 0.8)")
    g.add_argument("--cutmix", type=finite, default=None, help="cutmix alpha (CNN 0, ViT 1.0)")
    g.add_argument("--seed", type=int, default=1, help=f"seeds python, numpy and torch, in [0, {MAX_SEED}]")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: auto, see docs/training.md)")
    g.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "bf16", "fp16", "off"],
        help="CUDA mixed precision: auto = bf16 on GPUs that compute it natively (compute capability >= 8), "
        "else fp16 with loss scaling",
    )
    g.add_argument(
        "--deterministic", action="store_true", help="deterministic GPU kernels (bit-exact GPU resume, slower)"
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    g.add_argument(
        "--sync_bn",
        action="store_true",
        help="torchrun on GPUs: BatchNorm statistics over all ranks' batches (SyncBatchNorm; for per-GPU batches "
        "below ~32)",
    )
    g.add_argument(
        "--compact_train",
        default="auto",
        choices=["auto", "off"],
        help="auto: structured states (Refill >= 1, RSST after removal) train the physically smaller model; "
        "off: masked dense training",
    )
    g = p.add_argument_group("Pruning")
    g.add_argument("--struct", default="rsst", choices=["rsst", "refill"], help="how to reach the structured mask")
    g.add_argument("--unstructured", action="store_true", help="skip the regroup (R = M): plain unstructured IMP")
    g.add_argument("--criteria", default="magnitude", choices=CRITERIA, help="unit importance")
    g.add_argument("--sorting_mode", default="layerwise", choices=["layerwise", "global"], help="unit ranking scope")
    g.add_argument("--rate", type=finite, default=0.2, help="fraction of remaining prunable weights removed per state")
    g.add_argument("--pruning_times", type=int, default=20, help="number of states")
    g.add_argument("--fillback_rate", type=finite, default=0.0, help="fraction of missing units added back, in [0, 1]")
    g.add_argument("--calib_batches", type=int, default=1, help="batches for l1/l2/saliency")
    g.add_argument("--prune_type", default="lt", choices=["lt", "rewind_lt", "pt"], help="rewind point")
    g.add_argument("--rewind_epoch", type=int, default=2, help="rewind_lt: epoch of state 0 to rewind to")
    g.add_argument("--pretrained", default=None, help="pt: weights file to start from and rewind to")
    g = p.add_argument_group("RSST")
    g.add_argument(
        "--reg_mode",
        default="calibrated",
        choices=["calibrated", "raw"],
        help="calibrated: strength set so the pure decay reaches --reg_target at --reg_end, then "
        "recovery under R; raw: lambda = g f((t+1)/T), removal at the state end",
    )
    g.add_argument(
        "--reg_granularity_prune",
        type=finite,
        default=1.0,
        help="calibrated: multiplier of the calibrated strength; raw: the peak strength g",
    )
    g.add_argument("--reg_target", type=finite, default=1e-3, help="calibrated: pure-decay norm ratio at removal")
    g.add_argument("--reg_end", type=finite, default=0.5, help="calibrated: fraction of the state where P is removed")
    g.add_argument("--RST_schedule", default="exp_custom_exponents", choices=SCHEDULES, help="lambda curve")
    g.add_argument("--exponents", type=finite, default=4, help="n of exp_custom_exponents")
    g.add_argument(
        "--reg_scale_updates",
        default="auto",
        choices=["auto", "on", "off"],
        help="scale the optimizer's steps on P by the planned norm fraction rho(t); auto: on for "
        "AdamW in calibrated mode (Adam's normalized steps otherwise hold P at ~lr / (lr0 lambda))",
    )
    g = p.add_argument_group("ViT")
    g.add_argument("--vit_structured", action="store_true", help="head/neuron-level quasi-structured regroup")
    g.add_argument(
        "--vit_prune_target",
        default=None,
        choices=VIT_TARGETS,
        help="unit kinds regrouped with --vit_structured (default: head)",
    )
    g = p.add_argument_group("Mamba")
    g.add_argument(
        "--mamba_prune_target",
        default=None,
        choices=("ssm", "mlp", "both"),
        help="Mamba units regrouped: SSM inner channels (ssm), MLP neurons (mlp) or both (default: both)",
    )
    g.add_argument(
        "--mamba_direction",
        default=None,
        choices=("bidirectional", "forward"),
        help="scan both ways (Vim, the default: patches have no causal order) or forward only (causal)",
    )
    g = p.add_argument_group("Output")
    g.add_argument("--save_dir", default=None, help="output folder (default: {dataset}_{struct}_output_{run name})")
    g.add_argument("--exp_name", default=None, help="run name (default: auto)")
    g.add_argument("--resume", action="store_true", help="continue the run in --save_dir (or --checkpoint)")
    g.add_argument("--checkpoint", default=None, help="resume from this file")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --save_dir")
    g.add_argument(
        "--config", default=None, help="YAML file of flags (a run's args.yaml); command-line flags override it"
    )
    g = p.add_argument_group("Logging")
    g.add_argument(
        "--wandb",
        default="auto",
        choices=["auto", "online", "offline", "disabled"],
        help="wandb mode; auto = online with credentials, else offline",
    )
    g.add_argument("--wandb_project", default="RSST", help="wandb project")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        skip = RUNTIME_KEYS + RUN_KEYS
        args = parser.parse_args(
            config_tokens(args.config, parser, skip) + list(sys.argv[1:] if argv is None else argv)
        )
    return args


def explicit_flags(argv: list[str]) -> set[str]:
    """The flags given on the command line itself (not defaults, not --config)."""
    return given_flags(build_parser(), argv)


def validate(args: argparse.Namespace) -> None:
    """One clear line for each bad value (CLI.md)."""
    a, family = args, family_of(args.arch)
    checks = [
        (0 < a.rate < 1, f"--rate {a.rate}: must be in (0, 1)"),
        (a.epochs >= 1, f"--epochs {a.epochs}: must be >= 1"),
        (a.pruning_times >= 1, f"--pruning_times {a.pruning_times}: must be >= 1"),
        (a.batch_size >= 1, f"--batch_size {a.batch_size}: must be >= 1"),
        (0 <= a.fillback_rate <= 1, f"--fillback_rate {a.fillback_rate}: must be in [0, 1]"),
        (a.calib_batches >= 1, f"--calib_batches {a.calib_batches}: must be >= 1"),
        (a.reg_granularity_prune >= 0, f"--reg_granularity_prune {a.reg_granularity_prune}: must be >= 0"),
        (a.exponents > 0, f"--exponents {a.exponents}: must be > 0"),
        (0 < a.reg_target < 1, f"--reg_target {a.reg_target}: must be in (0, 1)"),
        (0 < a.reg_end <= 1, f"--reg_end {a.reg_end}: must be in (0, 1]"),
        (16 <= a.synthetic_size <= 1_000_000, f"--synthetic_size {a.synthetic_size}: must be in [16, 1000000]"),
        (0 <= a.seed <= MAX_SEED, f"--seed {a.seed}: must be in [0, {MAX_SEED}]"),
        (a.lr is None or a.lr > 0, f"--lr {a.lr}: must be > 0"),
        (a.momentum is None or 0 <= a.momentum < 1, f"--momentum {a.momentum}: must be in [0, 1)"),
        (a.weight_decay is None or a.weight_decay >= 0, f"--weight_decay {a.weight_decay}: must be >= 0"),
        (a.warmup is None or a.warmup >= 0, f"--warmup {a.warmup}: must be >= 0"),
        (
            a.label_smoothing is None or 0 <= a.label_smoothing < 1,
            f"--label_smoothing {a.label_smoothing}: must be in [0, 1)",
        ),
        (a.mixup is None or a.mixup >= 0, f"--mixup {a.mixup}: must be >= 0"),
        (a.cutmix is None or a.cutmix >= 0, f"--cutmix {a.cutmix}: must be >= 0"),
        (a.workers is None or a.workers >= 0, f"--workers {a.workers}: must be >= 0"),
        (a.threads >= 0, f"--threads {a.threads}: must be >= 0"),
        (
            not a.vit_structured or family.vit_flags,
            f"--vit_structured needs a ViT arch (got --arch {a.arch}); CNNs regroup channels by default",
        ),
        (
            a.vit_prune_target is None or a.vit_structured,
            f"--vit_prune_target {a.vit_prune_target}: needs --vit_structured (and a ViT arch)",
        ),
        (
            a.depth is None or (a.depth >= 1 and family.name in ("vit", "mamba")),
            f"--depth {a.depth}: needs a ViT or Mamba arch and must be >= 1",
        ),
        (
            a.mamba_prune_target is None or family.name == "mamba",
            f"--mamba_prune_target {a.mamba_prune_target}: needs a Mamba arch (got --arch {a.arch})",
        ),
        (
            a.mamba_direction is None or family.name == "mamba",
            f"--mamba_direction {a.mamba_direction}: needs a Mamba arch (got --arch {a.arch})",
        ),
        (
            a.prune_type != "pt" or a.pretrained or a.pretrained_file,
            "--prune_type pt needs --pretrained FILE or --pretrained_file FILE",
        ),
        (
            a.img_size is None or (a.dataset in ("imagenet", "folder") and 16 <= a.img_size <= 1024),
            f"--img_size {a.img_size}: only for --dataset imagenet/folder, in [16, 1024] "
            "(other datasets keep their size)",
        ),
        (a.eval_batch_size is None or a.eval_batch_size >= 1, f"--eval_batch_size {a.eval_batch_size}: must be >= 1"),
        (
            not a.pretrained_file
            or (
                family.fit_weights is not None
                and not (a.init or a.pretrained or a.vit_pretrained)
                and a.pretrained_file.endswith((".safetensors", ".pth", ".pt", ".bin", ".tar"))
            ),
            f"--pretrained_file {a.pretrained_file}: needs a ViT or Mamba "
            "arch and a .safetensors, .pth, .pt or .bin file; excludes --init, --pretrained and --vit_pretrained",
        ),
        (
            a.prune_type != "rewind_lt" or 0 <= a.rewind_epoch <= a.epochs,
            f"--rewind_epoch {a.rewind_epoch}: must be in [0, --epochs]",
        ),
        (not a.vit_pretrained or family.vit_flags, "--vit_pretrained needs a ViT arch"),
        (not (a.resume and a.overwrite), "--resume and --overwrite exclude each other"),
        (not a.resume or a.save_dir or a.checkpoint, "--resume needs --save_dir DIR or --checkpoint FILE"),
        (a.device in ("auto", "cpu") or a.device.startswith("cuda"), f"--device {a.device}: use auto, cpu or cuda[:N]"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)
    for flag in ("init", "pretrained", "checkpoint", "pretrained_file"):
        path = getattr(a, flag)
        if path and not os.path.isfile(path):
            raise UsageError(f"--{flag} {path}: " + ("is a directory" if os.path.isdir(path) else "file not found"))
    if a.decreasing_lr is not None:
        try:
            ok = all(e > 0 for e in (int(v) for v in str(a.decreasing_lr).split(",")))
        except ValueError:
            ok = False
        if not ok:
            raise UsageError(f"--decreasing_lr {a.decreasing_lr}: use comma-separated epochs > 0, e.g. 40,60")


def check_batch(args: argparse.Namespace, world: int) -> None:
    """The global batch splits evenly over the ranks, and mixup/cutmix (which pair images within
    a rank's batch) get an even per-rank batch; one line naming the fix otherwise."""
    if args.batch_size % world:
        lower, upper = args.batch_size // world * world, -(-args.batch_size // world) * world
        raise UsageError(
            f"--batch_size {args.batch_size}: the global batch must split evenly over the {world} processes "
            f"(use {max(lower, world)} or {upper})",
            every_rank=True,
        )
    per_rank = args.batch_size // world
    if per_rank % 2 and (args.mixup or args.cutmix):
        on = " x ".join(f"--{k} {getattr(args, k):g}" for k in ("mixup", "cutmix") if getattr(args, k))
        step = 2 * world
        raise UsageError(
            f"--batch_size {args.batch_size}: {per_rank} images per process is odd, and {on} pairs images "
            f"within a process's batch: use a multiple of {step} (e.g. {args.batch_size // step * step or step} or "
            f"{-(-args.batch_size // step) * step}), or --mixup 0 --cutmix 0",
            every_rank=True,
        )


def default_workers() -> int:
    """Loader workers of an image-folder run: the CPUs this process may use, shared by the node's
    torchrun processes (LOCAL_WORLD_SIZE), one left for each main process; in [1, 8]."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1))


def resolve(args: argparse.Namespace) -> None:
    """Fill the per-family training recipe (docs/training.md "Training recipes"), the run's name and dir."""
    from reporting import auto_run_name
    from trainer import fill_recipe

    family = family_of(args.arch)
    fill_recipe(args, family)
    if args.vit_structured and args.vit_prune_target is None:
        args.vit_prune_target = "head"
    if family.name == "mamba" and args.mamba_prune_target is None:
        args.mamba_prune_target = "both"
    if family.name == "mamba" and args.mamba_direction is None:
        args.mamba_direction = "bidirectional"
    if args.workers is None:
        args.workers = 0 if args.dataset in ("digits", "synthetic", "cifar10", "cifar100") else default_workers()
    if args.exp_name is None:
        args.exp_name = auto_run_name(args, not family.regroups_by_default)
    if args.save_dir is None:
        args.save_dir = f"{args.dataset}_{args.struct}_output_{args.exp_name}"


def resume_command(args: argparse.Namespace) -> str:
    """A copy-paste exact command that continues this run (interpreter, quoting, runtime flags).
    Under torchrun it repeats the launcher with the same process count (from torchrun's
    LOCAL_WORLD_SIZE / WORLD_SIZE), which a resume must keep."""
    cmd = [
        os.path.abspath(__file__),
        "--resume",
        "--save_dir",
        os.path.abspath(args.save_dir),
        "--threads",
        str(args.threads),
        "--wandb",
        args.wandb,
        "--device",
        args.device,
    ]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return shlex.join([sys.executable, *cmd])
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = world // per_node
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launcher = [torchrun] if os.access(torchrun, os.X_OK) else [sys.executable, "-m", "torch.distributed.run"]
    if nodes == 1:
        return shlex.join([*launcher, "--standalone", f"--nproc_per_node={per_node}", *cmd])
    return (
        shlex.join([*launcher, f"--nnodes={nodes}", f"--nproc_per_node={per_node}", *cmd])
        + "  # on every node, with the rendezvous flags of the first launch"
    )


# ---------------------------------------------------------------------------- set-up
def report_usage_error(e: UsageError, every_rank: bool = False) -> None:
    """`error: ...` on stderr; under torchrun an error every rank finds is printed by rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0 or not (every_rank or e.every_rank):
        print(f"error: {e}", file=sys.stderr)


def run_setup_and_train(args: argparse.Namespace, given: set[str]) -> int:
    """Everything after a valid command line; exit codes per CLI.md."""
    from checkpoints import (
        Interrupted,
        RunDir,
        SaveError,
        StopFlag,
        install_stop_handlers,
        last_good_checkpoint,
        open_run,
        restore_handlers,
        write_yaml,
    )
    from distributed import from_main, shutdown
    from imp_loop import IMPRun
    from trainer import NonFiniteLoss

    stop, run_dir, run = StopFlag(), None, None
    previous = install_stop_handlers(stop)
    try:
        if args.resume:
            args.save_dir = args.save_dir or os.path.dirname(os.path.abspath(args.checkpoint))
        else:
            resolve(args)
            args.exp_name, args.save_dir = from_main((args.exp_name, args.save_dir), args.device)  # rank 0's time
        rank = int(os.environ.get("RANK", "0"))
        run_dir = RunDir(args.save_dir, create=not args.resume or bool(args.checkpoint)) if rank == 0 else None
        resume_ck = open_run(args, given, RUNTIME_KEYS, rank)
        resolve(args)  # a resumed run: its saved config is already resolved
        check_batch(args, int(os.environ.get("WORLD_SIZE", "1")))
        if resume_ck is None and rank == 0:  # first: from here on a killed run can be resumed
            write_yaml(
                os.path.join(args.save_dir, "args.yaml"), {k: v for k, v in vars(args).items() if k not in RUNTIME_KEYS}
            )
        run = IMPRun(args, resume_ck, stop)
        run.run(resume_ck)
    except UsageError as e:
        report_usage_error(e)
        return 2
    except (NonFiniteLoss, SaveError) as e:
        print(f"error: {e}; run stopped. Last good checkpoint: {last_good_checkpoint(args.save_dir)}", file=sys.stderr)
        return 1
    except Interrupted as e:
        if run.dist.is_main:
            print(
                f"stopped by signal {e.signum}; checkpoint written. Continue with: {resume_command(args)}",
                file=sys.stderr,
            )
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"interrupted. Continue with: {resume_command(args)}", file=sys.stderr)
        return 130
    finally:
        restore_handlers(previous, ignore_term=int(os.environ.get("WORLD_SIZE", "1")) > 1)
        shutdown()  # the process group, also when the run failed before it started
        if run_dir is not None:  # a new run that failed before training leaves no files behind
            run_dir.release(failed=run is None and not args.resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        validate(args)
        given = explicit_flags(argv)
    except UsageError as e:
        report_usage_error(e, every_rank=True)  # the same command line on every rank
        return 2
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (docs/training.md "CPU threads")
    return run_setup_and_train(args, given)


if __name__ == "__main__":
    sys.exit(main())
