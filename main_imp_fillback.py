"""Iterative magnitude pruning with rewinding, regrouped into structured tickets.

After every state the unstructured IMP mask M is regrouped into whole units (conv channels, ViT
heads, MLP neurons) R. Refill trains the next state under R; RSST trains under R or M with a
growing penalty on P = M and not R, then removes P. See ALGORITHM.md and CLI.md.

    python main_imp_fillback.py --arch vit_tiny --dataset cifar100 --struct rsst --vit_structured
"""
from __future__ import annotations

import argparse
import glob
import os
import random
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import yaml

import pruning_utils as pu
from dataset import (DATASETS, DataError, DeviceLoader, EpochSampler, ImageTensors, augment_for,
                     calibration_batches, load_splits, make_loader)
from distributed import all_sum, any_rank, broadcast_masks, init_distributed, shutdown
from mask_plots import load_state_masks, plot_masks, unit_kinds, units_kept_per_layer
from models import MODEL_NAMES, create_model, is_vit
from reporting import Logger, plot_lambda, plot_state, plot_summary, save_atomic, write_summary
from rsst import SCHEDULES, RSSTPenalty, norm_penalty
from trainer import RECIPES, NonFiniteLoss, build_optimizer, build_scheduler, evaluate, train_one_epoch
from vit_pruning_utils import VIT_TARGETS, head_report, vit_unit_groups

RUNTIME_KEYS = ("config", "resume", "checkpoint", "overwrite", "wandb", "device", "workers", "threads")
RUN_KEYS = ("save_dir", "exp_name")  # name a run: not taken from --config, kept on --resume
OUTPUT_GLOBS = ("*checkpoint.pth.tar", "*model_SA_best.pth.tar", "latest.pth.tar", "rewind.pth.tar",
                "summary.csv", "summary.json", "args.yaml", "*.png")


class UsageError(Exception):
    """Bad command line or input: one line on stderr, exit code 2."""


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
            _milestones(args.decreasing_lr)
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


# ----------------------------------------------------------------------------- helpers
def _milestones(decreasing_lr: str | None) -> list[int] | None:
    return None if decreasing_lr is None else [int(e) for e in str(decreasing_lr).split(",")]


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, state: int, epoch: int) -> int:
    """Every epoch's randomness (order, augmentation, dropout) from (seed, state, epoch) alone,
    so a run resumed at an epoch boundary continues exactly."""
    return (seed * 1_000_003 + state * 10_007 + epoch * 101 + 17) % (2 ** 63)


def rng_states() -> dict:
    """Every RNG the training step draws from (dropout, drop path, mixup), for exact resume."""
    out = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop finishes its step, writes a checkpoint and exits."""
    signum: int | None = None


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def install_stop_handlers(stop: StopFlag) -> dict:
    """SIGINT/SIGTERM set `stop` (a second SIGINT interrupts at once); returns the old handlers."""
    def handler(signum, frame):
        if stop.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.signum = signum
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    return previous


def restore_handlers(previous: dict) -> None:
    for sig, h in previous.items():
        signal.signal(sig, h)


@dataclass
class Ticket:
    """The masks of one state: H trained under, M unstructured, R structured target, P penalized."""
    hard: pu.Masks
    imp: pu.Masks
    target: pu.Masks
    penalty: pu.Masks

    def to_saved(self) -> dict:
        return {k: pu.masks_to_bool(getattr(self, k)) for k in ("hard", "imp", "target", "penalty")}

    @classmethod
    def from_saved(cls, saved: dict, device) -> "Ticket":
        return cls(**{k: pu.masks_from_bool(saved[k], device) for k in ("hard", "imp", "target", "penalty")})


def unit_counts(groups: list[pu.UnitGroup], masks: pu.Masks) -> tuple[int, int]:
    """(units with any weight alive, all units) over `groups`."""
    return sum(units_kept_per_layer(groups, masks)), sum(g.num_units for g in groups)


def _fmt_units(groups, masks) -> str | None:
    if not groups:
        return None
    kept, total = unit_counts(groups, masks)
    return f"{kept}/{total}"


def find_existing_run(save_dir: str) -> list[str]:
    return sorted(f for pat in OUTPUT_GLOBS for f in glob.glob(os.path.join(save_dir, pat)))


# ------------------------------------------------------------------------------- run
class IMPRun:
    """One IMP run: states of training, pruning, regrouping and rewinding."""

    def __init__(self, args: argparse.Namespace, resume_ck: dict | None, stop: StopFlag | None = None):
        self.args, self.stop = args, stop or StopFlag()
        if args.threads:
            torch.set_num_threads(args.threads)
        self.dist = init_distributed(args.device)
        self.device = self._device()
        self.vit = is_vit(args.arch)
        seed_all(args.seed)
        self.data = load_splits(args.dataset, args.data, self.vit, args.synthetic_size)
        self.model = create_model(args.arch, self.data.num_classes, self.data.img_size).to(self.device)
        if self.device.type == "cuda" and not self.vit:  # faster convs under bf16 autocast
            self.model = self.model.to(memory_format=torch.channels_last)
        self.weights = pu.prunable_weights(self.model)
        self.groups = self._regroup_groups()
        self.report = unit_kinds(self.model)
        self.state_masks: list[dict] = []  # each finished state's hard mask, for masks.png
        self.sampler = EpochSampler(len(self.data.train), self.dist.rank, self.dist.world)
        self.train_batch = max(1, args.batch_size // self.dist.world)
        self._build_loaders()
        self.mixup = self._mixup()
        self.rows: list[dict] = []
        self.global_step = 0
        self._init_weights(resume_ck)
        ones = {n: m.to(self.device) for n, m in pu.ones_masks(self.model).items()}
        self.ticket = Ticket(ones, ones, ones, {n: torch.zeros_like(m) for n, m in ones.items()})
        self.net = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel
            self.net = DistributedDataParallel(self.model, device_ids=[self.dist.local_rank]
                                               if self.device.type == "cuda" else None)
        if args.compile:
            self.net = torch.compile(self.net)
        mode = args.wandb if self.dist.is_main else "disabled"
        self.logger = Logger(mode, args.wandb_project, args.exp_name, vars(args), args.save_dir,
                             (resume_ck or {}).get("wandb_id"))

    # ---- setup
    def _device(self) -> torch.device:
        a = self.args
        if a.device == "auto":
            a_dev = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            a_dev = a.device
        if a_dev.startswith("cuda") and self.dist.enabled:
            return torch.device("cuda", self.dist.local_rank)
        return torch.device(a_dev)

    def _build_loaders(self) -> None:
        """CPU DataLoaders, or on CUDA (unless --no_gpu_data) GPU-resident batches augmented there."""
        a, d, bs = self.args, self.data, self.train_batch
        drop_last = len(self.sampler) >= 2 * bs
        if self.device.type == "cuda" and not a.no_gpu_data and isinstance(d.train, ImageTensors):
            aug, plain = augment_for(a.dataset, self.vit, True), augment_for(a.dataset, self.vit, False)
            self.train_loader = DeviceLoader(d.train, aug, bs, self.device, self.sampler, drop_last)
            self.val_loader = DeviceLoader(d.val, plain, 2 * a.batch_size, self.device)
            self.test_loader = DeviceLoader(d.test, plain, 2 * a.batch_size, self.device)
        else:
            self.train_loader = make_loader(d.train, bs, a.workers, self.sampler, drop_last)
            self.val_loader = make_loader(d.val, 2 * a.batch_size, a.workers)
            self.test_loader = make_loader(d.test, 2 * a.batch_size, a.workers)
        self.steps_per_epoch = len(self.train_loader)

    def _regroup_groups(self) -> list[pu.UnitGroup]:
        if self.args.unstructured:
            return []
        if self.vit:
            return vit_unit_groups(self.model, self.args.vit_prune_target) if self.args.vit_structured else []
        return pu.channel_groups(self.model)

    def _mixup(self):
        a = self.args
        if a.mixup <= 0 and a.cutmix <= 0:
            return None
        from timm.data import Mixup
        return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=a.label_smoothing,
                     num_classes=self.data.num_classes)

    def _init_weights(self, resume_ck: dict | None) -> None:
        """theta_0 from --init / --pretrained / a new init.pth.tar; theta_r per --prune_type."""
        a, path = self.args, os.path.join(self.args.save_dir, "init.pth.tar")
        source = a.pretrained if a.prune_type == "pt" else (a.init or (path if resume_ck is not None else None))
        if source:
            try:
                sd = torch.load(source, map_location="cpu", weights_only=True)
                self.model.load_state_dict(sd.get("state_dict", sd))
            except Exception as e:
                raise UsageError(f"{source}: not a weights file for --arch {a.arch} ({type(e).__name__})") from None
        elif a.vit_pretrained:
            from models.vit import load_imagenet_weights
            try:
                load_imagenet_weights(self.model, a.arch)
            except Exception as e:
                raise UsageError(f"--vit_pretrained: cannot fetch timm ImageNet weights for {a.arch} "
                                 f"({type(e).__name__}); run without it or with network access") from None
        if source != path:
            self.save({"state_dict": self.model.state_dict(), "arch": a.arch}, "init.pth.tar")
        self.theta_r = self._copy_state()
        rewind_path = os.path.join(a.save_dir, "rewind.pth.tar")
        if a.prune_type == "rewind_lt" and os.path.isfile(rewind_path) and resume_ck is not None:
            self.theta_r = torch.load(rewind_path, map_location="cpu", weights_only=True)["state_dict"]

    def _copy_state(self) -> dict:
        """A deep copy of every parameter and buffer (never aliases the live tensors)."""
        return {k: v.detach().clone().cpu() for k, v in self.model.state_dict().items()}

    def save(self, obj: dict, name: str) -> None:
        """Write a file of the run (rank 0 only), atomically."""
        if self.dist.is_main:
            save_atomic(obj, os.path.join(self.args.save_dir, name))

    def say(self, text: str) -> None:
        if self.dist.is_main:
            print(text, flush=True)

    def rewind(self) -> None:
        self.model.load_state_dict(self.theta_r)
        pu.apply_masks(self.weights, self.ticket.hard)

    # ---- pruning
    def next_ticket(self, state: int) -> Ticket:
        """After `state`: M by global magnitude, R by regroup, then H and P for the next state."""
        a, t = self.args, self.ticket
        total = pu.count_total(t.hard)
        imp = pu.global_magnitude_prune(self.weights, t.hard, pu.imp_keep_count(total, a.rate, state + 1))
        if self.groups:
            pu.apply_masks(self.weights, imp)  # score the trained network masked by M
            stats = None
            if a.criteria in pu.ACTIVATION_CRITERIA:
                batches = calibration_batches(self.data.train_plain, a.calib_batches, a.batch_size, a.seed + state)
                stats = pu.collect_activation_stats(self.model, self.groups, batches, self.device,
                                                    with_saliency=a.criteria == "saliency")
            target, reports = pu.regroup(self.groups, self.weights, imp, a.criteria, stats,
                                         a.fillback_rate, a.sorting_mode)
            self._print_regroup(reports)
        else:
            target = {n: m.clone() for n, m in imp.items()}
        if a.struct == "rsst":
            hard = {n: torch.maximum(target[n], imp[n]) for n in imp}
            penalty = {n: imp[n] * (1 - target[n]) for n in imp}
        else:
            hard, penalty = target, {n: torch.zeros_like(m) for n, m in imp.items()}
        ticket = Ticket(hard, imp, target, penalty)
        for masks in (ticket.hard, ticket.imp, ticket.target, ticket.penalty):
            broadcast_masks(masks, self.dist)  # every rank trains under rank 0's decision
        return ticket

    def _print_regroup(self, reports: list[dict]) -> None:
        a = self.args
        self.say(f"regroup: criteria {a.criteria}, prune ratio {a.rate}, mode {a.sorting_mode}, "
                 f"fillback {a.fillback_rate}")
        if self.vit and any(r["kind"] == "head" for r in reports):
            self.say(head_report(self.model, reports))
        for kind in ("channel", "neuron"):
            rs = [r for r in reports if r["kind"] == kind]
            if rs:
                self.say(f"  {kind}s kept per layer: " + " ".join(f"{r['kept']}/{r['num_units']}" for r in rs))

    # ---- one state
    def new_penalty(self, step: int = 0) -> RSSTPenalty:
        a = self.args
        extra = norm_penalty(self.groups, dict(self.model.named_modules()), self.ticket.penalty)
        return RSSTPenalty(self.weights, self.ticket.penalty, a.lr, a.reg_granularity_prune, a.RST_schedule,
                           a.exponents, self.steps_per_epoch * a.epochs, step, extra)

    def train_state(self, state: int, start_epoch: int, ck: dict | None) -> dict:
        """Train `state` from `start_epoch`; `ck` restores a state interrupted mid-way."""
        a = self.args
        opt = build_optimizer(self.model, a.optimizer, a.lr, a.momentum, a.weight_decay)
        sched = build_scheduler(opt, self.steps_per_epoch, a.epochs, a.warmup, a.lr_schedule,
                                _milestones(a.decreasing_lr))
        pen = self.new_penalty()
        st = {"history": [], "best": {"val_acc": -1.0}, "trace": {"step": [], "lambda": [], "norm": []},
              "start_norm": pen.penalized_norm(), "elapsed": 0.0}
        partial = None
        if ck is not None:
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            pen = self.new_penalty(ck["rsst_step"])
            st.update(ck["state_progress"])
            partial = ck.get("partial")
        hard = self.ticket.hard
        log_every = max(1, self.steps_per_epoch * a.epochs // 200)
        out = {"opt": opt, "sched": sched, "pen": pen, "st": st}

        def after_step() -> bool:
            if pen.active:
                pen.step()
            pu.apply_masks(self.weights, hard)
            self.global_step += 1
            if pen.active and (pen.step_count % log_every == 0 or pen.step_count == pen.total_steps):
                ratio = pen.penalized_norm() / max(st["start_norm"], 1e-12)
                for key, v in (("step", pen.step_count), ("lambda", pen.last_lambda), ("norm", ratio)):
                    st["trace"][key].append(v)
                self.logger.log({"global_step": self.global_step, "state": state, "reg_lambda": pen.last_lambda,
                                 "penalized_norm_ratio": ratio})
            return any_rank(self.stop.signum is not None, self.dist, self.device)

        for epoch in range(start_epoch, a.epochs):
            t0 = time.time()
            s = epoch_seed(a.seed, state, epoch)
            seed_all(s)
            self.data.train.epoch_seed = s
            self.sampler.set_epoch(s, partial["steps"] * self.train_batch if partial else 0)
            if partial:
                set_rng_states(partial["rng"])
            tr = train_one_epoch(self.net, self.train_loader, opt, sched, self.device, after_step,
                                 a.label_smoothing, self.mixup, f"state {state} epoch {epoch + 1}",
                                 partial["totals"] if partial else None, lambda t: all_sum(t, self.dist))
            partial = None
            st["elapsed"] += time.time() - t0
            if tr["stopped"]:
                self.save(self._payload(state, epoch, "train", out, {"steps": tr["totals"]["steps"],
                          "totals": tr["totals"], "rng": rng_states()}), "latest.pth.tar")
                raise Interrupted(self.stop.signum)
            self._end_epoch(state, epoch, tr, out)
        return out

    def _end_epoch(self, state: int, epoch: int, tr: dict, out: dict) -> None:
        """Evaluate, log, keep the best-val checkpoint, write latest.pth.tar."""
        a, st, pen = self.args, out["st"], out["pen"]
        va = evaluate(self.model, self.val_loader, self.device)
        te = evaluate(self.model, self.test_loader, self.device)
        row = {"epoch": epoch + 1, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
               "val_acc": va["acc"], "test_loss": te["loss"], "test_acc": te["acc"], "lr": tr["lr"],
               "reg_lambda": pen.last_lambda}
        st["history"].append(row)
        if va["acc"] > st["best"]["val_acc"]:
            st["best"] = {"val_acc": va["acc"], "test_acc": te["acc"], "epoch": epoch + 1}
            self.save(self._payload(state, epoch + 1, "best", out), f"{state}model_SA_best.pth.tar")
        self.say(f"state {state:2d} epoch {epoch + 1:3d}/{a.epochs} | train loss {tr['loss']:.4f} acc {tr['acc']:6.2f}"
                 f" | val {va['acc']:6.2f} | test {te['acc']:6.2f} | lr {tr['lr']:.2e}"
                 + (f" | lambda {pen.last_lambda:.3g}" if pen.active else ""))
        self.logger.log({"global_step": self.global_step, "state": state, "epoch": epoch + 1,
                         **{k: v for k, v in row.items() if k != "epoch"}})
        if a.prune_type == "rewind_lt" and state == 0 and epoch + 1 == a.rewind_epoch:
            self.theta_r = self._copy_state()
            self.save({"state_dict": self.theta_r}, "rewind.pth.tar")
        self.save(self._payload(state, epoch + 1, "train", out), "latest.pth.tar")

    def finish_state(self, state: int, out: dict) -> None:
        """RSST hard prune, final evaluation, state checkpoint, summary row and plots."""
        a, pen, st = self.args, out["pen"], out["st"]
        soft = hard = norm_ratio = None
        if pen.active:
            norm_ratio = pen.penalized_norm() / max(st["start_norm"], 1e-12)
            soft = evaluate(self.model, self.test_loader, self.device)["acc"]
            pen.remove()
            self.ticket.hard = self.ticket.target
            pu.apply_masks(self.weights, self.ticket.hard)
            hard = evaluate(self.model, self.test_loader, self.device)["acc"]
            self.say(f"state {state:2d} RSST: penalized norm ratio {norm_ratio:.4f}, "
                     f"soft test acc {soft:.2f} -> hard test acc {hard:.2f}")
        val = evaluate(self.model, self.val_loader, self.device)
        test = evaluate(self.model, self.test_loader, self.device)
        t = self.ticket
        remaining = pu.density(t.hard)
        row = {
            "state": state, "imp_density": round(100 * pu.density(t.imp), 4),
            "remaining_weights": round(100 * remaining, 4), "compression": round(1 / max(remaining, 1e-12), 4),
            "heads_kept": _fmt_units(self.report.get("heads"), t.hard),
            "neurons_kept": _fmt_units(self.report.get("neurons"), t.hard),
            "channels_kept": _fmt_units(self.report.get("channels"), t.hard),
            "structured_sparsity": self._structured_sparsity(),
            "best_epoch": st["best"].get("epoch"), "best_val_acc": st["best"]["val_acc"],
            "test_acc_at_best_val": st["best"].get("test_acc"),
            "final_val_acc": val["acc"], "final_test_acc": test["acc"], "soft_test_acc": soft,
            "hard_test_acc": hard, "final_lambda": pen.last_lambda if pen.active else None,
            "penalized_norm_ratio": norm_ratio, "seconds": round(st["elapsed"], 1),
        }
        self.rows.append(row)
        self.save(self._payload(state, a.epochs, "done", out), f"{state}checkpoint.pth.tar")
        self.save({"phase": "done", "state": state, "file": f"{state}checkpoint.pth.tar"}, "latest.pth.tar")
        self.state_masks.append(pu.masks_to_bool(t.hard))
        if self.dist.is_main:
            self._write_reports(state, st, pen)
        self.logger.log({"global_step": self.global_step, "state": state, "remaining_weights": row["remaining_weights"],
                         "imp_density": row["imp_density"], "state_test_acc": row["final_test_acc"],
                         "state_best_val_acc": row["best_val_acc"]})
        self.say(f"== state {state} done: remaining {row['remaining_weights']:.2f}% (imp {row['imp_density']:.2f}%), "
                 f"units {row['heads_kept'] or row['channels_kept']}, test acc {test['acc']:.2f} ==")
        if self.dist.enabled:
            digest = sum(float(m.sum()) * (i + 1) for i, m in enumerate(t.hard.values()))
            print(f"rank {self.dist.rank} state {state} mask digest {digest:.1f}", flush=True)

    def _write_reports(self, state: int, st: dict, pen: RSSTPenalty) -> None:
        a = self.args
        write_summary(a.save_dir, self.rows)
        plot_state(os.path.join(a.save_dir, f"{state}_curves.png"), st["history"], f"{a.exp_name}: state {state}")
        if pen.active:
            tr = st["trace"]
            plot_lambda(os.path.join(a.save_dir, f"{state}_lambda.png"), tr["step"], tr["lambda"], tr["norm"],
                        f"RSST state {state}: {a.RST_schedule}")
        plot_summary(os.path.join(a.save_dir, "summary.png"), self.rows, a.exp_name)
        plot_masks(os.path.join(a.save_dir, "masks.png"), a.exp_name, self.state_masks, self.report)

    def _structured_sparsity(self) -> float | None:
        groups = self.groups or [g for gs in self.report.values() for g in gs]
        kept, total = unit_counts(groups, self.ticket.hard)
        return round(100 * (1 - kept / total), 4) if total else None

    def _payload(self, state: int, epoch: int, phase: str, out: dict, partial: dict | None = None) -> dict:
        return {
            "phase": phase, "state": state, "epoch": epoch, "partial": partial,
            "arch": self.args.arch, "dataset": self.args.dataset,
            "num_classes": self.data.num_classes, "img_size": self.data.img_size,
            "config": dict(vars(self.args)), "state_dict": self.model.state_dict(),
            "masks": self.ticket.to_saved(), "mask": pu.masks_to_bool(self.ticket.hard),
            "optimizer": out["opt"].state_dict(), "scheduler": out["sched"].state_dict(),
            "rsst_step": out["pen"].step_count, "rsst_lambda": out["pen"].last_lambda,
            "state_progress": out["st"], "rows": list(self.rows), "global_step": self.global_step,
            "wandb_id": self.logger.run_id,
        }

    # ---- the loop
    def run(self, resume_ck: dict | None) -> None:
        a = self.args
        state, start_epoch, mid = 0, 0, None
        if resume_ck is not None:
            self.model.load_state_dict(resume_ck["state_dict"])
            self.ticket = Ticket.from_saved(resume_ck["masks"], self.device)
            self.rows, self.global_step = list(resume_ck["rows"]), resume_ck["global_step"]
            self.state_masks = load_state_masks(a.save_dir)[: len(self.rows)]
            state = resume_ck["state"]
            if resume_ck["phase"] == "done":
                state += 1
            else:
                start_epoch, mid = resume_ck["epoch"], resume_ck
            self.say(f"resuming {a.save_dir} at state {state} epoch {start_epoch}")
        while state < a.pruning_times:
            if mid is None:
                if state > 0:
                    self.ticket = self.next_ticket(state - 1)
                self.rewind()
                t = self.ticket
                self.say(f"== state {state}/{a.pruning_times - 1}: imp density {100 * pu.density(t.imp):.2f}%, "
                         f"trained density {100 * pu.density(t.hard):.2f}%, target {100 * pu.density(t.target):.2f}%, "
                         f"penalized {pu.count_ones(t.penalty)} weights ==")
            out = self.train_state(state, start_epoch, mid)
            self.finish_state(state, out)
            state, start_epoch, mid = state + 1, 0, None
        self.logger.finish()


def load_resume_checkpoint(args: argparse.Namespace) -> dict:
    """The newest readable checkpoint: --checkpoint, else latest.pth.tar, else the highest
    {state}checkpoint.pth.tar; unreadable ones are skipped with a warning."""
    if args.checkpoint:
        candidates = [args.checkpoint]
    else:
        states = glob.glob(os.path.join(args.save_dir, "*checkpoint.pth.tar"))
        states.sort(key=lambda p: int(os.path.basename(p).split("checkpoint")[0] or -1), reverse=True)
        candidates = [os.path.join(args.save_dir, "latest.pth.tar")] + states
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            ck = torch.load(path, map_location="cpu", weights_only=False)
            if "file" in ck:  # latest.pth.tar points at the last finished state's checkpoint
                ck = torch.load(os.path.join(os.path.dirname(path), ck["file"]), map_location="cpu",
                                weights_only=False)
            if "state_dict" in ck and "masks" in ck:
                return ck
            raise ValueError("not a checkpoint of this tool")
        except Exception as e:
            print(f"warning: skipping unreadable checkpoint {path} ({type(e).__name__})", file=sys.stderr)
    where = args.checkpoint or args.save_dir
    raise UsageError(f"--resume: nothing to resume, no readable checkpoint in {where}")


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


def last_good_checkpoint(save_dir: str) -> str:
    path = os.path.join(save_dir, "latest.pth.tar")
    return path if os.path.isfile(path) else "none yet (failed in the first epoch)"


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
