"""The state loop: train a state, prune, regroup, rewind (ALGORITHM.md "The loop").

`IMPRun` owns one run: the data, the model and its prunable weights, the `Ticket` (the masks
H, M, R, P of the current state), the RSST penalty, and the run files in the save dir. Every
optimizer step is followed by the penalty (RSST) and the hard mask, which also zeroes the
BatchNorm scale and shift of dropped CNN channels, so a dropped unit is dead.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch

import pruning_utils as pu
from checkpoints import (
    Interrupted,
    StopFlag,
    check_resume_processes,
    copy_state,
    epoch_seed,
    init_weights,
    own_rng_states,
    rank_seed,
    read_checkpoint,
    rng_states,
    save_atomic,
    seed_all,
    set_rng_states,
)
from compact_train import CompactTraining, Live, mask_pairs
from dataset import load_splits
from distributed import (
    all_max,
    all_sum,
    barrier,
    broadcast_buffers,
    broadcast_masks,
    gather_to_main,
    init_distributed,
    max_over_ranks,
    rank_zero_first,
    select_device,
    shutdown,
    wrap_for_training,
)
from errors import DataError, UsageError
from families import family_of
from loaders import EpochSampler, build_loaders, calibration_batches
from mask_plots import load_state_masks, plot_masks
from models import create_model, input_norm
from reporting import Logger, plot_state_progress, plot_summary, state_row, write_summary
from rsst import RSSTPenalty, describe_plan, norm_penalty, plan_penalty
from trainer import (
    amp_dtype,
    build_optimizer,
    build_scheduler,
    evaluate,
    grad_scaler,
    mixup_fn,
    parse_milestones,
    train_one_epoch,
)
from vit_pruning_utils import head_report


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
    def from_saved(cls, saved: dict, device) -> Ticket:
        return cls(**{k: pu.masks_from_bool(saved[k], device) for k in ("hard", "imp", "target", "penalty")})


STOP_CHECK_EVERY = 20  # optimizer steps between the ranks' checks for a signal


# ------------------------------------------------------------------------------- run
class IMPRun(CompactTraining):
    """One IMP run: states of training, pruning, regrouping and rewinding."""

    def __init__(self, args: argparse.Namespace, resume_ck: dict | None, stop: StopFlag | None = None):
        self.args, self.stop = args, stop or StopFlag()
        if args.threads:
            torch.set_num_threads(args.threads)
        self.dist = init_distributed(args.device)
        if resume_ck is not None:
            check_resume_processes(resume_ck, self.dist.world, args.save_dir)
        self.device = select_device(args.device, self.dist, args.deterministic)
        if args.sync_bn and self.device.type != "cuda":
            raise UsageError(
                f"--sync_bn: SyncBatchNorm needs CUDA GPUs, and this run is on {self.device.type}; leave out --sync_bn",
                every_rank=True,
            )
        self.family = family = family_of(args.arch)
        seed_all(args.seed)
        strong = family.strong_augment and args.augment == "recipe"  # TrivialAugment: the ViT recipe
        try:  # a timm:NAME unknown to timm stops here, before the data loads
            norm = input_norm(args.arch)  # (mean, std) of its timm weights, for image folders
        except ValueError as e:
            raise UsageError(str(e)) from None
        with rank_zero_first(self.dist):  # one download, then every rank reads it
            self.data = load_splits(args.dataset, args.data, strong, args.synthetic_size, args.img_size, norm)
        try:
            kw = self.model_kwargs = family.model_kwargs(args)  # --depth, --mamba_direction
            self.model = create_model(args.arch, self.data.num_classes, self.data.img_size, **kw).to(self.device)
        except ValueError as e:  # an arch the ViT regroup cannot handle
            raise UsageError(str(e)) from None
        forced = os.environ.get("RSST_FORCE_GPU_PATHS") == "1"  # tests: a CUDA run's branches on the CPU
        if (self.device.type == "cuda" or forced) and family.channels_last:  # faster convs under autocast
            self.model = self.model.to(memory_format=torch.channels_last)
        self.amp = amp_dtype(args.amp, self.device, force_cpu=forced)
        self.weights, self.phase = pu.prunable_weights(self.model), None  # phase: compact training
        self.modules = dict(self.model.named_modules())
        self.groups = family.unit_groups(self.model, args) if family.regroups(args) else []
        self.report = family.unit_kinds(self.model)
        self.state_masks: list[dict] = []  # each finished state's hard mask, for masks.png
        self.sampler = EpochSampler(len(self.data.train), self.dist.rank, self.dist.world)
        self.train_batch = max(1, args.batch_size // self.dist.world)
        self.train_loader, self.val_loader, self.test_loader = build_loaders(
            self.data,
            args.dataset,
            strong,
            self.device,
            self.sampler,
            self.train_batch,
            args.eval_batch_size or 2 * args.batch_size,
            args.workers,
            batched=not args.no_gpu_data,
            rank=self.dist.rank,
            world=self.dist.world,
        )
        self.steps_per_epoch = len(self.train_loader)
        self.mixup = mixup_fn(args.mixup, args.cutmix, args.label_smoothing, self.data.num_classes)
        self.rows: list[dict] = []
        self.unreadable: dict[str, int] = {}  # split: unreadable images found so far (image folders)
        self.global_step = 0
        self.stop_signal = 0  # the signal every rank agreed to stop on (0: none)
        self.theta_r = init_weights(self.model, args, resume_ck is not None, self.save)
        ones = {n: m.to(self.device) for n, m in pu.ones_masks(self.model).items()}
        self.set_ticket(Ticket(ones, ones, ones, {n: torch.zeros_like(m) for n, m in ones.items()}))
        if args.sync_bn and self.dist.enabled:  # in place: the same parameters and buffers, the same names
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.net = self.dense_net = wrap_for_training(self.model, self.dist, self.device, args.compile)
        mode = args.wandb if self.dist.is_main else "disabled"
        self.logger = Logger(
            mode, args.wandb_project, args.exp_name, vars(args), args.save_dir, (resume_ck or {}).get("wandb_id")
        )

    # ---- setup
    def save(self, obj: dict, name: str) -> None:
        """Write a file of the run (rank 0 only), atomically."""
        if self.dist.is_main:
            save_atomic(obj, os.path.join(self.args.save_dir, name))

    def say(self, text: str) -> None:
        if self.dist.is_main:
            print(text, flush=True)

    # ---- masks
    def set_ticket(self, ticket: Ticket) -> None:
        """Adopt `ticket`; its hard mask, plus the BN entries and extras of the units it drops, is what
        `apply_hard` zeroes after every step."""
        self.ticket = ticket
        self.set_hard(ticket.hard)

    def set_hard(self, hard: pu.Masks) -> None:
        self.ticket.hard = hard
        self.mask_tensors, self.mask_values = mask_pairs(self.model, self.family, hard)

    @torch.no_grad()
    def apply_hard(self) -> None:
        torch._foreach_mul_(self.mask_tensors, self.mask_values)

    def rewind(self) -> None:
        self.model.load_state_dict(self.theta_r)
        self.apply_hard()

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
                stats = pu.collect_activation_stats(
                    self.model, self.groups, batches, self.device, with_saliency=a.criteria == "saliency"
                )
            target, reports = pu.regroup(
                self.groups, self.weights, imp, a.criteria, stats, a.fillback_rate, a.sorting_mode
            )
            self._print_regroup(reports)
        else:
            target = {n: m.clone() for n, m in imp.items()}
        if a.struct == "rsst":
            hard = {n: target[n] | imp[n] for n in imp}
            penalty = {n: imp[n] & ~target[n] for n in imp}
        else:
            hard, penalty = target, {n: torch.zeros_like(m) for n, m in imp.items()}
        ticket = Ticket(hard, imp, target, penalty)
        for masks in (ticket.hard, ticket.imp, ticket.target, ticket.penalty):
            broadcast_masks(masks, self.dist)  # every rank trains under rank 0's decision
        return ticket

    def _print_regroup(self, reports: list[dict]) -> None:
        a = self.args
        self.say(
            f"regroup: criteria {a.criteria}, prune ratio {a.rate}, mode {a.sorting_mode}, fillback {a.fillback_rate}"
        )
        if any(r["kind"] == "head" for r in reports):
            self.say(head_report(self.model, reports))
        for kind in dict.fromkeys(r["kind"] for r in reports if r["kind"] != "head"):  # (inner) channel, neuron
            kept = " ".join(f"{r['kept']}/{r['num_units']}" for r in reports if r["kind"] == kind)
            self.say(f"  {kind}s kept per layer: {kept}")

    # ---- one state
    def new_penalty(self, step: int = 0, last_lambda: float = 0.0) -> RSSTPenalty:
        """This state's penalty (inactive for Refill, state 0 and an empty P), planned per --reg_mode."""
        a = self.args
        self.plan = plan_penalty(
            a.reg_mode,
            self.steps_per_epoch * a.epochs,
            a.lr,
            a.reg_granularity_prune,
            a.RST_schedule,
            a.exponents,
            a.reg_target,
            a.reg_end,
        )
        extra = norm_penalty(self.groups, self.modules, self.ticket.penalty)
        return RSSTPenalty(
            self.weights,
            self.ticket.penalty,
            a.lr,
            self.plan.strength,
            a.RST_schedule,
            a.exponents,
            self.plan.end_step,
            step,
            extra,
            last_lambda,
            self.scale_updates,
        )

    @property
    def scale_updates(self) -> bool:
        """--reg_scale_updates: auto means on for AdamW in calibrated mode (rsst.py says why)."""
        a = self.args
        if a.reg_scale_updates == "auto":
            return a.reg_mode == "calibrated" and a.optimizer == "adamw"
        return a.reg_scale_updates == "on"

    def train_state(self, state: int, start_epoch: int, ck: dict | None) -> dict:
        """Train `state` from `start_epoch`; `ck` restores a state interrupted mid-way."""
        a = self.args
        opt = build_optimizer(self.model, a.optimizer, a.lr, a.momentum, a.weight_decay)
        sched = build_scheduler(
            opt, self.steps_per_epoch, a.epochs, a.warmup, a.lr_schedule, parse_milestones(a.decreasing_lr)
        )
        pen = self.new_penalty()
        st = {
            "history": [],
            "best": {"val_acc": -1.0},
            "trace": {"step": [], "lambda": [], "norm": [], "planned": []},
            "start_norm": pen.penalized_norm(),
            "elapsed": 0.0,
            "removal": None,
        }
        partial = None
        if ck is not None:
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            pen = self.new_penalty(ck["rsst_step"], ck["rsst_lambda"])
            st.update(ck["state_progress"])
            partial = ck.get("partial")
        elif pen.active:
            for line in describe_plan(
                self.plan,
                a.reg_mode,
                a.reg_target,
                a.reg_granularity_prune,
                self.steps_per_epoch * a.epochs,
                self.scale_updates,
            ):
                self.say(f"state {state:2d} {line}")
        log_every = max(1, pen.end_step // 200)
        scaler = grad_scaler(self.amp)
        if ck is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        out = {"opt": opt, "sched": sched, "pen": pen, "st": st, "scaler": scaler}
        if not pen.active or st["removal"] is not None:  # Refill; RSST after its removal step
            st["elapsed"] += self.go_compact(state, opt)  # the switch counts as training time

        def after_step() -> bool:
            if pen.active and not pen.done:
                pen.step()
            self.apply_hard()
            self.global_step += 1
            if pen.active and st["removal"] is None:
                if pen.step_count % log_every == 0 or pen.done:
                    self._trace(state, pen, st)
                if pen.done:
                    self._remove_penalized(state, pen, st, opt)
            return self._should_stop()

        for epoch in range(start_epoch, a.epochs):
            t0 = time.time()
            s = epoch_seed(a.seed, state, epoch)
            seed_all(rank_seed(s, self.dist.rank))  # dropout / drop path / mixup differ per rank
            self.data.train.epoch_seed = s
            self.sampler.set_epoch(s, partial["steps"] * self.train_batch if partial else 0)
            if partial:
                set_rng_states(own_rng_states(partial["rng"], self.dist.rank), self.device)
            tr = train_one_epoch(
                Live(lambda: self.net),
                self.train_loader,
                opt,
                sched,
                self.device,
                after_step,
                a.label_smoothing,
                self.mixup,
                f"state {state} epoch {epoch + 1}",
                partial["totals"] if partial else None,
                lambda t: all_sum(t, self.dist),
                self.amp,
                out["scaler"],
            )
            partial = None
            st["elapsed"] += time.time() - t0
            if tr["stopped"]:
                rng = gather_to_main(rng_states(self.device), self.dist)  # each rank's own streams
                self.save(
                    self._payload(
                        state, epoch, "train", out, {"steps": tr["totals"]["steps"], "totals": tr["totals"], "rng": rng}
                    ),
                    "latest.pth.tar",
                )
                barrier(self.dist)  # no rank exits before the checkpoint is written
                raise Interrupted(self.stop_signal)
            self._end_epoch(state, epoch, tr, out)
            if self.dist.enabled and epoch + 1 < a.epochs and self._agree_on_stop():
                raise Interrupted(self.stop_signal)  # latest.pth.tar holds this epoch's end
        return out

    def _should_stop(self) -> bool:
        """A signal on any rank stops all of them at the same step: checked every step on one
        process, every STOP_CHECK_EVERY steps across ranks (an all-reduce syncs the host)."""
        if self.dist.enabled and self.global_step % STOP_CHECK_EVERY:
            return False
        return self._agree_on_stop()

    def _agree_on_stop(self) -> bool:
        """Set `stop_signal` to the largest signal number received on any rank (a rank that got
        none exits with the others' code); True when there is one."""
        self.stop_signal = max_over_ranks(self.stop.signum or 0, self.dist, self.device)
        return self.stop_signal > 0

    def _evaluate(self, loader) -> dict:
        """Loss and accuracy of the masked model (or the compact one training now) on `loader`, each rank
        on its shard, summed; every rank evaluates with rank 0's BatchNorm statistics (the model rank 0 saves)."""
        broadcast_buffers(self.live, self.dist)
        return evaluate(self.live, loader, self.device, self.amp, lambda t: all_sum(t, self.dist))

    def _count_unreadable(self) -> None:
        """Unreadable images found so far in each split of an image folder (over all ranks, which
        then all skip them), logged when the count grows; DataError on every rank where more than
        max(1, 1 %) of a split is unreadable."""
        splits = {k: getattr(self.data, k) for k in ("train", "val", "test")}
        files = {k: ds.files for k, ds in splits.items() if hasattr(ds, "files")}
        if not files:
            return
        union = all_max(torch.cat([f.unreadable for f in files.values()]), self.dist, self.device)
        counts = {}
        for (split, f), flags in zip(files.items(), union.split([len(f) for f in files.values()])):
            f.unreadable.copy_(flags)
            counts[split] = int(flags.sum())
            if counts[split] > max(1, len(f) // 100):
                first = f.path(int(flags.nonzero()[0]))
                raise DataError(
                    f"--data {self.args.data}: {counts[split]} of the {len(f)} {split} images are unreadable "
                    f"(more than max(1, 1 %); first: {first}); repair or remove them",
                    every_rank=True,
                )
        if sum(counts.values()) > sum(self.unreadable.values()):
            self.say(
                "unreadable images skipped so far: "
                + ", ".join(f"{k} {v}" for k, v in counts.items() if v)
                + " (each replaced by the next readable image of its split)"
            )
        self.unreadable = counts

    def _trace(self, state: int, pen: RSSTPenalty, st: dict) -> None:
        ratio = pen.penalized_norm() / max(st["start_norm"], 1e-12)
        for key, v in (
            ("step", pen.step_count),
            ("lambda", pen.last_lambda),
            ("norm", ratio),
            ("planned", pen.planned_ratio()),
        ):
            st["trace"].setdefault(key, []).append(v)
        self.logger.log(
            {
                "global_step": self.global_step,
                "state": state,
                "reg_lambda": pen.last_lambda,
                "penalized_norm_ratio": ratio,
            }
        )

    def _remove_penalized(self, state: int, pen: RSSTPenalty, st: dict, opt) -> None:
        """The end of the ramp: measure, zero P (mask <- R), measure again, train on under R."""
        a = self.args
        ratio = pen.penalized_norm() / max(st["start_norm"], 1e-12)
        soft = self._evaluate(self.test_loader)["acc"]
        pen.remove()
        self.set_hard(self.ticket.target)
        self.apply_hard()
        hard = self._evaluate(self.test_loader)["acc"]
        self.model.train()
        st["removal"] = {"step": pen.step_count, "soft": soft, "hard": hard, "norm_ratio": ratio}
        left = self.steps_per_epoch * a.epochs - pen.step_count
        self.say(
            f"state {state:2d} RSST removal at step {pen.step_count}: penalized norm ratio {ratio:.3g} "
            f"(predicted {self.plan.predicted_ratio:.3g}), soft test acc {soft:.2f} -> hard {hard:.2f}"
            + (f"; recovering for {left} steps" if left else "")
        )
        if left:
            self.go_compact(state, opt)
        if a.reg_mode == "calibrated" and ratio > 10 * a.reg_target:
            self.say(
                f"warning: penalized norm ratio {ratio:.3g} is above 10x --reg_target {a.reg_target:g}: "
                "training pushed back against the penalty (try a larger --reg_granularity_prune)"
            )

    def _end_epoch(self, state: int, epoch: int, tr: dict, out: dict) -> None:
        """Evaluate, log, keep the best-val checkpoint of the state's final mask, write latest."""
        a, st, pen = self.args, out["st"], out["pen"]
        va = self._evaluate(self.val_loader)
        te = self._evaluate(self.test_loader)
        self._count_unreadable()
        row = {
            "epoch": epoch + 1,
            "train_loss": tr["loss"],
            "train_acc": tr["acc"],
            "val_loss": va["loss"],
            "val_acc": va["acc"],
            "test_loss": te["loss"],
            "test_acc": te["acc"],
            "lr": tr["lr"],
            "reg_lambda": pen.last_lambda if pen.active and not st["removal"] else 0.0,
        }
        st["history"].append(row)
        final_mask = not pen.active or st["removal"] is not None  # RSST: only epochs after removal
        if final_mask and va["acc"] > st["best"]["val_acc"]:
            st["best"] = {"val_acc": va["acc"], "test_acc": te["acc"], "epoch": epoch + 1}
            self.save(self._payload(state, epoch + 1, "best", out, slim=True), f"{state}model_SA_best.pth.tar")
        self.say(
            f"state {state:2d} epoch {epoch + 1:3d}/{a.epochs} | train loss {tr['loss']:.4f} acc {tr['acc']:6.2f}"
            f" | val {va['acc']:6.2f} | test {te['acc']:6.2f} | lr {tr['lr']:.2e}"
            + (f" | lambda {pen.last_lambda:.3g}" if pen.active and not st["removal"] else "")
        )
        self.logger.log(
            {
                "global_step": self.global_step,
                "state": state,
                "epoch": epoch + 1,
                **{k: v for k, v in row.items() if k != "epoch"},
            }
        )
        if a.prune_type == "rewind_lt" and state == 0 and epoch + 1 == a.rewind_epoch:
            self.theta_r = copy_state(self.model)
            self.save({"state_dict": self.theta_r}, "rewind.pth.tar")
        self.save(self._payload(state, epoch + 1, "train", out), "latest.pth.tar")

    def finish_state(self, state: int, out: dict) -> None:
        """State checkpoint, summary row and plots; the last epoch's evaluation is the final one."""
        pen, st = out["pen"], out["st"]
        row = state_row(state, self.ticket, self.report, self.groups, st, pen if pen.active else None, self.plan)
        row["unreadable_images"] = sum(self.unreadable.values()) if self.unreadable else None
        row["train_mac_ratio"] = round(self.mac_ratio(), 4)
        self.rows.append(row)
        self.save(self._payload(state, self.args.epochs, "done", out), f"{state}checkpoint.pth.tar")
        self.end_compact()
        self.save({"phase": "done", "state": state, "file": f"{state}checkpoint.pth.tar"}, "latest.pth.tar")
        self.state_masks.append(pu.masks_to_bool(self.ticket.hard))
        if self.dist.is_main:
            self._write_reports(state, st)
        self.logger.log(
            {
                "global_step": self.global_step,
                "state": state,
                "remaining_weights": row["remaining_weights"],
                "imp_density": row["imp_density"],
                "state_test_acc": row["final_test_acc"],
                "state_best_val_acc": row["best_val_acc"],
            }
        )
        self.say(
            f"== state {state} done: remaining {row['remaining_weights']:.2f}% (imp {row['imp_density']:.2f}%), "
            f"units {row['heads_kept'] or row['channels_kept']}, test acc {row['final_test_acc']:.2f} =="
        )
        if self.dist.enabled:
            digest = sum(float(m.sum()) * (i + 1) for i, m in enumerate(self.ticket.hard.values()))
            print(f"rank {self.dist.rank} state {state} mask digest {digest:.1f}", flush=True)

    def _write_reports(self, state: int, st: dict) -> None:
        """summary.csv/json and summary.png, the state's curves (and lambda) plots, masks.png."""
        a = self.args
        write_summary(a.save_dir, self.rows)
        plot_state_progress(a.save_dir, state, st, a.exp_name, self._penalty_title())
        plot_summary(os.path.join(a.save_dir, "summary.png"), self.rows, a.exp_name)
        if len(self.state_masks) == len(self.rows):  # else a state checkpoint was unreadable (warned on load)
            plot_masks(os.path.join(a.save_dir, "masks.png"), a.exp_name, self.state_masks, self.report)

    def _penalty_title(self) -> str:
        a = self.args
        return f"{a.RST_schedule} ({a.reg_mode}{', scaled steps on P' if self.scale_updates else ''})"

    def _rebuild_reports(self) -> None:
        """After a resume: rewrite what a kill may have cut short (summary rows, plots) from the
        state checkpoints, so a finished run always has every state's row and plots."""
        a = self.args
        for s in range(len(self.rows) if self.dist.is_main else 0):
            last = s == len(self.rows) - 1
            if last or not os.path.isfile(os.path.join(a.save_dir, f"{s}_curves.png")):
                ck = read_checkpoint(os.path.join(a.save_dir, f"{s}checkpoint.pth.tar"))
                if ck is not None:
                    self._write_reports(s, ck["state_progress"]) if last else plot_state_progress(
                        a.save_dir, s, ck["state_progress"], a.exp_name, self._penalty_title()
                    )

    def _payload(
        self, state: int, epoch: int, phase: str, out: dict, partial: dict | None = None, slim: bool = False
    ) -> dict:
        """A checkpoint: weights and masks always; the optimizer and progress unless `slim`."""
        self.sync_dense()  # checkpoints hold the dense model
        ck = {
            "phase": phase,
            "state": state,
            "epoch": epoch,
            "arch": self.args.arch,
            "dataset": self.args.dataset,
            "num_classes": self.data.num_classes,
            "img_size": self.data.img_size,
            "model_kwargs": self.model_kwargs,
            "config": dict(vars(self.args)),
            "state_dict": self.model.state_dict(),
            "world": self.dist.world,
            "threads": torch.get_num_threads(),
        }
        masks = self.ticket.to_saved()
        if slim:
            return {**ck, "mask": masks["hard"]}
        ck.update(masks=masks, mask=masks["hard"])  # one tensor, stored once
        return {
            **ck,
            "partial": partial,
            "optimizer": self.phase.optimizer_state(out["opt"]) if self.phase else out["opt"].state_dict(),
            "scheduler": out["sched"].state_dict(),
            "rsst_step": out["pen"].step_count,
            "rsst_lambda": out["pen"].last_lambda,
            "scaler": out["scaler"].state_dict() if out["scaler"].is_enabled() else None,
            "state_progress": out["st"],
            "rows": list(self.rows),
            "global_step": self.global_step,
            "wandb_id": self.logger.run_id,
        }

    def close(self) -> None:
        shutdown(self.dist)

    # ---- the loop
    def run(self, resume_ck: dict | None) -> None:
        a = self.args
        state, start_epoch, mid = 0, 0, None
        if resume_ck is not None:
            self.model.load_state_dict(resume_ck["state_dict"])
            self.set_ticket(Ticket.from_saved(resume_ck["masks"], self.device))
            self.rows, self.global_step = list(resume_ck["rows"]), resume_ck["global_step"]
            self.state_masks = load_state_masks(a.save_dir)[: len(self.rows)]
            state = resume_ck["state"]
            if resume_ck["phase"] == "done":
                state += 1
            else:
                start_epoch, mid = resume_ck["epoch"], resume_ck
            self._rebuild_reports()
            if state >= a.pruning_times:
                self.say(
                    f"{a.save_dir}: the run has finished all {a.pruning_times} states; summary and plots "
                    "are complete, nothing to resume"
                )
                return
            self.say(f"resuming {a.save_dir} at state {state} epoch {start_epoch}")
        while state < a.pruning_times:
            if mid is None:
                if state > 0:
                    self.set_ticket(self.next_ticket(state - 1))
                self.rewind()
                t = self.ticket
                self.say(
                    f"== state {state}/{a.pruning_times - 1}: imp density {100 * pu.density(t.imp):.2f}%, "
                    f"trained density {100 * pu.density(t.hard):.2f}%, target {100 * pu.density(t.target):.2f}%, "
                    f"penalized {pu.count_ones(t.penalty)} weights; trains {self.train_form(state)} =="
                )
            out = self.train_state(state, start_epoch, mid)
            self.finish_state(state, out)
            state, start_epoch, mid = state + 1, 0, None
        self.logger.finish()
