"""Iterative magnitude pruning with rewinding, regrouped into structured tickets.

After every state the unstructured IMP mask M is regrouped into whole units (conv channels, ViT
heads, MLP neurons) R. Refill trains the next state under R; RSST trains under R or M with a
growing penalty on P = M and not R, then removes P. See ALGORITHM.md and CLI.md.

    python main_imp_fillback.py --arch vit_tiny --dataset cifar100 --struct rsst --vit_structured
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import yaml

import pruning_utils as pu
from dataset import DATASETS, DataError, calibration_batches, load_splits, make_loader
from models import MODEL_NAMES, create_model, is_vit
from reporting import Logger, plot_lambda, plot_state, plot_summary, save_atomic, write_summary
from rsst import SCHEDULES, RSSTPenalty
from trainer import RECIPES, NonFiniteLoss, build_optimizer, build_scheduler, evaluate, train_one_epoch
from vit_pruning_utils import VIT_TARGETS, head_groups, head_report, neuron_groups, vit_unit_groups

RUNTIME_KEYS = ("config", "resume", "checkpoint", "overwrite", "wandb", "device", "workers")
RUN_KEYS = ("save_dir", "exp_name")  # name a run: not taken from --config, kept on --resume
OUTPUT_GLOBS = ("*checkpoint.pth.tar", "*model_SA_best.pth.tar", "latest.pth.tar", "rewind.pth.tar",
                "summary.csv", "summary.json", "args.yaml", "*.png")


class UsageError(Exception):
    """Bad command line or input: one line on stderr, exit code 2."""


class RunFailure(Exception):
    """A failure during the run: exit code 1."""


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
    alive = sum(int(pu.unit_alive(g, masks).sum()) for g in groups)
    return alive, sum(g.num_units for g in groups)


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

    def __init__(self, args: argparse.Namespace, resume_ck: dict | None):
        self.args = args
        self.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if args.device == "auto" else args.device))
        self.vit = is_vit(args.arch)
        seed_all(args.seed)
        self.data = load_splits(args.dataset, args.data, self.vit, args.synthetic_size)
        self.model = create_model(args.arch, self.data.num_classes, self.data.img_size).to(self.device)
        self.weights = pu.prunable_weights(self.model)
        self.groups = self._regroup_groups()
        self.report = {"heads": head_groups(self.model), "neurons": neuron_groups(self.model)} if self.vit \
            else {"channels": pu.channel_groups(self.model)}
        self.generator = torch.Generator()
        self.train_loader = make_loader(self.data.train, args.batch_size, True, args.workers,
                                        self.generator, drop_last=len(self.data.train) >= 2 * args.batch_size)
        self.val_loader = make_loader(self.data.val, 2 * args.batch_size, False, args.workers)
        self.test_loader = make_loader(self.data.test, 2 * args.batch_size, False, args.workers)
        self.steps_per_epoch = len(self.train_loader)
        self.mixup = self._mixup()
        self.rows: list[dict] = []
        self.global_step = 0
        self._init_weights(resume_ck)
        ones = pu.ones_masks(self.model)
        zeros = {n: torch.zeros_like(m) for n, m in ones.items()}
        self.ticket = Ticket({n: m.to(self.device) for n, m in ones.items()}, ones, ones, zeros)
        self.logger = Logger(args.wandb, args.wandb_project, args.exp_name, vars(args), args.save_dir,
                             (resume_ck or {}).get("wandb_id"))

    # ---- setup
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
        if a.prune_type == "pt":
            source = a.pretrained
        elif a.init:
            source = a.init
        elif resume_ck is not None:
            source = path
        else:
            source = None
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
            save_atomic({"state_dict": self.model.state_dict(), "arch": a.arch}, path)
        self.theta_r = self._copy_state()
        rewind_path = os.path.join(a.save_dir, "rewind.pth.tar")
        if a.prune_type == "rewind_lt" and os.path.isfile(rewind_path) and resume_ck is not None:
            self.theta_r = torch.load(rewind_path, map_location="cpu", weights_only=True)["state_dict"]

    def _copy_state(self) -> dict:
        """A deep copy of every parameter and buffer (never aliases the live tensors)."""
        return {k: v.detach().clone().cpu() for k, v in self.model.state_dict().items()}

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
        return Ticket(hard, imp, target, penalty)

    def _print_regroup(self, reports: list[dict]) -> None:
        a = self.args
        print(f"regroup: criteria {a.criteria}, prune ratio {a.rate}, mode {a.sorting_mode}, "
              f"fillback {a.fillback_rate}")
        if self.vit and any(r["kind"] == "head" for r in reports):
            print(head_report(self.model, reports))
        for kind in ("channel", "neuron"):
            rs = [r for r in reports if r["kind"] == kind]
            if rs:
                print(f"  {kind}s kept per layer: " + " ".join(f"{r['kept']}/{r['num_units']}" for r in rs))

    # ---- one state
    def new_penalty(self, state: int, step: int = 0) -> RSSTPenalty:
        a = self.args
        pen = RSSTPenalty(self.weights, self.ticket.penalty, a.lr, a.reg_granularity_prune, a.RST_schedule,
                          a.exponents, self.steps_per_epoch * a.epochs, step)
        return pen

    def train_state(self, state: int, start_epoch: int, ck: dict | None) -> dict:
        """Train `state` from `start_epoch`; `ck` restores a state interrupted mid-way."""
        a = self.args
        opt = build_optimizer(self.model, a.optimizer, a.lr, a.momentum, a.weight_decay)
        sched = build_scheduler(opt, self.steps_per_epoch, a.epochs, a.warmup, a.lr_schedule,
                                _milestones(a.decreasing_lr))
        pen = self.new_penalty(state)
        st = {"history": [], "best": {"val_acc": -1.0}, "trace": {"step": [], "lambda": [], "norm": []},
              "start_norm": pen.penalized_norm(), "t0": time.time(), "elapsed": 0.0}
        if ck is not None:
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            pen = self.new_penalty(state, ck["rsst_step"])
            st.update(ck["state_progress"])
            st["t0"] = time.time()
        hard = self.ticket.hard
        log_every = max(1, self.steps_per_epoch * a.epochs // 200)

        def after_step():
            if pen.active:
                pen.step()
            pu.apply_masks(self.weights, hard)
            self.global_step += 1
            if pen.active and (pen.step_count % log_every == 0 or pen.step_count == pen.total_steps):
                ratio = pen.penalized_norm() / max(st["start_norm"], 1e-12)
                st["trace"]["step"].append(pen.step_count)
                st["trace"]["lambda"].append(pen.last_lambda)
                st["trace"]["norm"].append(ratio)
                self.logger.log({"global_step": self.global_step, "state": state, "reg_lambda": pen.last_lambda,
                                 "penalized_norm_ratio": ratio})

        for epoch in range(start_epoch, a.epochs):
            s = epoch_seed(a.seed, state, epoch)
            seed_all(s)
            self.generator.manual_seed(s)
            tr = train_one_epoch(self.model, self.train_loader, opt, sched, self.device, after_step,
                                 a.label_smoothing, self.mixup, desc=f"state {state} epoch {epoch + 1}")
            va = evaluate(self.model, self.val_loader, self.device)
            te = evaluate(self.model, self.test_loader, self.device)
            row = {"epoch": epoch + 1, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
                   "val_acc": va["acc"], "test_loss": te["loss"], "test_acc": te["acc"], "lr": tr["lr"],
                   "reg_lambda": pen.last_lambda}
            st["history"].append(row)
            if va["acc"] > st["best"]["val_acc"]:
                st["best"] = {"val_acc": va["acc"], "test_acc": te["acc"], "epoch": epoch + 1}
                save_atomic(self._payload(state, epoch + 1, "best", opt, sched, pen, st),
                            os.path.join(a.save_dir, f"{state}model_SA_best.pth.tar"))
            print(f"state {state:2d} epoch {epoch + 1:3d}/{a.epochs} | train loss {tr['loss']:.4f} acc {tr['acc']:6.2f}"
                  f" | val {va['acc']:6.2f} | test {te['acc']:6.2f} | lr {tr['lr']:.2e}"
                  + (f" | lambda {pen.last_lambda:.3g}" if pen.active else ""), flush=True)
            self.logger.log({"global_step": self.global_step, "state": state, "epoch": epoch + 1,
                             **{f"{k}": v for k, v in row.items() if k != "epoch"}})
            if a.prune_type == "rewind_lt" and state == 0 and epoch + 1 == a.rewind_epoch:
                self.theta_r = self._copy_state()
                save_atomic({"state_dict": self.theta_r}, os.path.join(a.save_dir, "rewind.pth.tar"))
            st["elapsed"] += time.time() - st["t0"]
            st["t0"] = time.time()
            save_atomic(self._payload(state, epoch + 1, "train", opt, sched, pen, st),
                        os.path.join(a.save_dir, "latest.pth.tar"))
        return {"opt": opt, "sched": sched, "pen": pen, "st": st}

    def finish_state(self, state: int, out: dict) -> None:
        """RSST hard prune, final evaluation, state checkpoint, summary row and plots."""
        a, pen, st = self.args, out["pen"], out["st"]
        soft = hard = None
        norm_ratio = None
        if pen.active:
            norm_ratio = pen.penalized_norm() / max(st["start_norm"], 1e-12)
            soft = evaluate(self.model, self.test_loader, self.device)["acc"]
            self.ticket.hard = self.ticket.target
            pu.apply_masks(self.weights, self.ticket.hard)
            hard = evaluate(self.model, self.test_loader, self.device)["acc"]
            print(f"state {state:2d} RSST: penalized norm ratio {norm_ratio:.4f}, "
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
        payload = self._payload(state, a.epochs, "done", out["opt"], out["sched"], pen, st)
        save_atomic(payload, os.path.join(a.save_dir, f"{state}checkpoint.pth.tar"))
        save_atomic({"phase": "done", "state": state, "file": f"{state}checkpoint.pth.tar"},
                    os.path.join(a.save_dir, "latest.pth.tar"))
        write_summary(a.save_dir, self.rows)
        plot_state(os.path.join(a.save_dir, f"{state}_curves.png"), st["history"], f"{a.exp_name}: state {state}")
        if pen.active:
            tr = st["trace"]
            plot_lambda(os.path.join(a.save_dir, f"{state}_lambda.png"), tr["step"], tr["lambda"], tr["norm"],
                        f"RSST state {state}: {a.RST_schedule}")
        plot_summary(os.path.join(a.save_dir, "summary.png"), self.rows, a.exp_name)
        self.logger.log({"global_step": self.global_step, "state": state, "remaining_weights": row["remaining_weights"],
                         "imp_density": row["imp_density"], "state_test_acc": row["final_test_acc"],
                         "state_best_val_acc": row["best_val_acc"]})
        print(f"== state {state} done: remaining {row['remaining_weights']:.2f}% (imp {row['imp_density']:.2f}%), "
              f"units {row['heads_kept'] or row['channels_kept']}, test acc {test['acc']:.2f} ==", flush=True)

    def _structured_sparsity(self) -> float | None:
        groups = self.groups or [g for gs in self.report.values() for g in gs]
        kept, total = unit_counts(groups, self.ticket.hard)
        return round(100 * (1 - kept / total), 4) if total else None

    def _payload(self, state: int, epoch: int, phase: str, opt, sched, pen: RSSTPenalty, st: dict) -> dict:
        return {
            "phase": phase, "state": state, "epoch": epoch, "arch": self.args.arch, "dataset": self.args.dataset,
            "num_classes": self.data.num_classes, "img_size": self.data.img_size,
            "config": {k: v for k, v in vars(self.args).items()},
            "state_dict": self.model.state_dict(), "masks": self.ticket.to_saved(),
            "mask": pu.masks_to_bool(self.ticket.hard),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rsst_step": pen.step_count, "rsst_lambda": pen.last_lambda,
            "state_progress": {k: v for k, v in st.items() if k != "t0"},
            "rows": list(self.rows), "global_step": self.global_step, "wandb_id": self.logger.run_id,
            "theta_r_kind": self.args.prune_type,
        }

    # ---- the loop
    def run(self, resume_ck: dict | None) -> None:
        a = self.args
        state, start_epoch, mid = 0, 0, None
        if resume_ck is not None:
            self.model.load_state_dict(resume_ck["state_dict"])
            self.ticket = Ticket.from_saved(resume_ck["masks"], self.device)
            self.rows, self.global_step = list(resume_ck["rows"]), resume_ck["global_step"]
            state = resume_ck["state"]
            if resume_ck["phase"] == "done":
                state += 1
            else:
                start_epoch, mid = resume_ck["epoch"], resume_ck
            print(f"resuming {a.save_dir} at state {state} epoch {start_epoch}")
        while state < a.pruning_times:
            if mid is None:
                if state > 0:
                    self.ticket = self.next_ticket(state - 1)
                self.rewind()
                t = self.ticket
                print(f"== state {state}/{a.pruning_times - 1}: imp density {100 * pu.density(t.imp):.2f}%, "
                      f"trained density {100 * pu.density(t.hard):.2f}%, target {100 * pu.density(t.target):.2f}%, "
                      f"penalized {pu.count_ones(t.penalty)} weights ==", flush=True)
            out = self.train_state(state, start_epoch, mid)
            self.finish_state(state, out)
            state, start_epoch, mid = state + 1, 0, None
        self.logger.finish()


def load_resume_checkpoint(args: argparse.Namespace) -> dict:
    path = args.checkpoint or os.path.join(args.save_dir, "latest.pth.tar")
    if not os.path.isfile(path):
        raise UsageError(f"--resume: nothing to resume, {path} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        if "file" in ck:  # latest.pth.tar points at the last finished state's checkpoint
            ck = torch.load(os.path.join(os.path.dirname(path), ck["file"]), map_location="cpu", weights_only=False)
    except Exception as e:
        raise UsageError(f"--resume: cannot read {path} ({type(e).__name__})") from None
    return ck


def setup_run(argv: list[str] | None) -> tuple[argparse.Namespace, dict | None]:
    """Parse, validate, resolve, and prepare the save dir; returns args and a resume checkpoint."""
    args = parse_args(argv)
    validate(args)
    resume_ck = None
    if args.resume:
        resume_ck = load_resume_checkpoint(args)
        saved = resume_ck["config"]
        for k, v in saved.items():
            if k not in RUNTIME_KEYS + ("save_dir",):
                setattr(args, k, v)
        if not args.save_dir:
            args.save_dir = os.path.dirname(os.path.abspath(args.checkpoint))
    resolve_recipe(args)
    existing = find_existing_run(args.save_dir) if os.path.isdir(args.save_dir) else []
    if existing and not (args.resume or args.overwrite):
        raise UsageError(f"--save_dir {args.save_dir} holds another run ({os.path.basename(existing[0])}); "
                         "pass --resume to continue it or --overwrite to replace it")
    try:
        os.makedirs(args.save_dir, exist_ok=True)
        if args.overwrite:
            for f in existing:
                os.remove(f)
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
    try:
        args, resume_ck = setup_run(argv)
        run = IMPRun(args, resume_ck)
        if resume_ck is None:
            write_args(args)
    except (UsageError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run.run(resume_ck)
    except NonFiniteLoss as e:
        print(f"error: {e}; run stopped. Last good checkpoint: {last_good_checkpoint(args.save_dir)}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted. Continue with: python main_imp_fillback.py --resume --save_dir {args.save_dir}",
              file=sys.stderr)
        return 130
    except OSError as e:
        print(f"error: {e}; last good checkpoint: {last_good_checkpoint(args.save_dir)}", file=sys.stderr)
        return 1
    print(f"done: outputs in {args.save_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
