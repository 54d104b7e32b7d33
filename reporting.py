"""Run outputs: checkpoints, summary table, plots, and the wandb logger."""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import time

import pruning_utils as pu
from checkpoints import write_atomic

SUMMARY_FIELDS = [
    "state",
    "imp_density",
    "remaining_weights",
    "compression",
    "heads_kept",
    "neurons_kept",
    "channels_kept",
    "structured_sparsity",
    "best_epoch",
    "best_val_acc",
    "test_acc_at_best_val",
    "final_val_acc",
    "final_test_acc",
    "soft_test_acc",
    "hard_test_acc",
    "final_lambda",
    "predicted_norm_ratio",
    "penalized_norm_ratio",
    "reg_end_step",
    "seconds",
    "unreadable_images",
    "train_mac_ratio",
]


def _units(groups: list, masks: dict) -> str | None:
    """ "kept/total" units with any weight alive in `masks`, over `groups`."""
    if not groups:
        return None
    return f"{sum(pu.units_kept(groups, masks))}/{sum(g.num_units for g in groups)}"


def state_row(state: int, ticket, report: dict, groups: list, st: dict, pen, plan) -> dict:
    """The summary row of a finished state (`pen` None when no RSST penalty ran).

    The final accuracies are the last epoch's evaluation, made under the state's final mask.
    """
    last, removal, hard = st["history"][-1], st.get("removal") or {}, ticket.hard
    remaining = pu.density(hard)
    all_groups = groups or [g for gs in report.values() for g in gs]
    kept, total = sum(pu.units_kept(all_groups, hard)), sum(g.num_units for g in all_groups)
    return {
        "state": state,
        "imp_density": round(100 * pu.density(ticket.imp), 4),
        "remaining_weights": round(100 * remaining, 4),
        "compression": round(1 / max(remaining, 1e-12), 4),
        "heads_kept": _units(report.get("heads"), hard),
        "neurons_kept": _units(report.get("neurons"), hard),
        "channels_kept": _units(report.get("channels") or report.get("inner channels"), hard),  # CNN or Mamba
        "structured_sparsity": round(100 * (1 - kept / total), 4) if total else None,
        "best_epoch": st["best"].get("epoch"),
        "best_val_acc": st["best"]["val_acc"],
        "test_acc_at_best_val": st["best"].get("test_acc"),
        "final_val_acc": last["val_acc"],
        "final_test_acc": last["test_acc"],
        "soft_test_acc": removal.get("soft"),
        "hard_test_acc": removal.get("hard"),
        "final_lambda": pen.last_lambda if pen else None,
        "predicted_norm_ratio": plan.predicted_ratio if pen else None,
        "penalized_norm_ratio": removal.get("norm_ratio"),
        "reg_end_step": removal.get("step"),
        "seconds": round(st["elapsed"], 1),
    }


def _write_csv(f, rows: list[dict]) -> None:
    w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SUMMARY_FIELDS})


def write_summary(save_dir: str, rows: list[dict]) -> None:
    """summary.csv and summary.json, one row per finished state."""
    write_atomic(os.path.join(save_dir, "summary.json"), lambda f: json.dump(rows, f, indent=1), "w")
    write_atomic(os.path.join(save_dir, "summary.csv"), lambda f: _write_csv(f, rows), "w")


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_state(path: str, history: list[dict], title: str) -> None:
    """Accuracy and loss (log scale) per epoch (train / val / test) of one state."""
    plt = pyplot()
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in ("train", "val", "test"):
        a.plot(ep, [h[f"{key}_acc"] for h in history], marker="o", label=key)
        b.plot(ep, [h[f"{key}_loss"] for h in history], marker="o", label=key)
    a.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    b.set(xlabel="epoch", ylabel="loss (log)", yscale="log", title="loss")
    _plain_ticks(a, b)
    a.legend()
    fig.suptitle(_fit(title))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plain_ticks(*axes) -> None:
    """Integer steps/epochs on x; y tick labels as plain numbers, also on log scales."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(
            plain if ax.get_yscale() == "log" and _narrow(ax) else FuncFormatter(lambda v, _: "")
        )


def _narrow(ax) -> bool:
    """A log axis spanning less than one decade (its minor ticks then need labels)."""
    lo, hi = ax.get_ylim()
    return lo > 0 and hi / lo < 10


def _fit(title: str, width: int = 70) -> str:
    """A long run name wrapped onto lines of at most `width` characters (at underscores)."""
    lines = [""]
    for part in re.findall(r"[^_]*_|[^_]+", title):  # each part keeps its trailing underscore
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(chunk for line in lines for chunk in _chunks(line, width))


def _chunks(line: str, width: int) -> list[str]:
    """A line cut every `width` characters (only a part with no underscore longer than `width` needs it)."""
    return [line[i : i + width] for i in range(0, len(line), width)] or [""]


def plot_lambda(
    path: str,
    steps: list[int],
    lambdas: list[float],
    norms: list[float],
    title: str,
    removal_step: int | None = None,
    planned: list[float] | None = None,
) -> None:
    """RSST: lambda (left) and the penalized weights' norm ratio (right, log scale) over the
    state's optimizer steps, beside the planned pure decay, with the removal step marked."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(steps, lambdas, color="tab:red")
    a.set(xlabel="optimizer step in state", ylabel="reg_lambda", title="penalty strength")
    b.plot(steps, [max(n, 1e-12) for n in norms], color="tab:blue", label="measured")
    if planned and len(planned) == len(steps):
        b.plot(steps, [max(n, 1e-12) for n in planned], color="tab:orange", ls=":", lw=2, label="pure decay (planned)")
    b.set(
        xlabel="optimizer step in state",
        ylabel="||w_P|| / ||w_P at start||",
        yscale="log",
        title="penalized norm ratio",
        ylim=(min(min(norms, default=1.0), 1e-3) / 2, 2.0),
    )
    _plain_ticks(a, b)
    if removal_step is not None:
        for ax in (a, b):
            ax.axvline(removal_step, color="gray", ls="--", label=f"removal (step {removal_step})")
        a.legend(loc="upper left", fontsize=8)
    b.legend(loc="lower left", fontsize=8)
    fig.suptitle(_fit(title))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_state_progress(save_dir: str, state: int, progress: dict, run_name: str, schedule: str) -> None:
    """`{state}_curves.png` and, when the state had an RSST penalty, `{state}_lambda.png`."""
    plot_state(os.path.join(save_dir, f"{state}_curves.png"), progress["history"], f"{run_name}: state {state}")
    trace = progress["trace"]
    if trace["step"]:
        plot_lambda(
            os.path.join(save_dir, f"{state}_lambda.png"),
            trace["step"],
            trace["lambda"],
            trace["norm"],
            f"RSST state {state}: {schedule}",
            (progress.get("removal") or {}).get("step"),
            trace.get("planned"),
        )


def plot_summary(path: str, rows: list[dict], title: str) -> None:
    """Test accuracy against remaining prunable weights over the states (log x, plain tick labels)."""
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, a = plt.subplots(figsize=(6.5, 4.2))
    x = [r["remaining_weights"] for r in rows]
    a.plot(x, [r["final_test_acc"] for r in rows], marker="o", label="test acc (state ticket)")
    a.plot(x, [r["best_val_acc"] for r in rows], marker="s", ls="--", label="best val acc")
    a.set_xscale("log")
    a.set_xticks(x)
    a.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    a.xaxis.set_minor_formatter(NullFormatter())
    a.invert_xaxis()
    a.set(xlabel="remaining prunable weights (%)", ylabel="accuracy (%)")
    a.set_title(_fit(title, 60), fontsize=9)
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def auto_run_name(args, vit: bool) -> str:
    """struct, arch, dataset, schedule/reg/exponents (rsst) or fill rate (refill), criteria,
    rate, struct_{target} with --vit_structured (or a Mamba's regroup), timestamp."""
    parts = [args.struct, args.arch.replace(":", "-"), args.dataset]  # timm:NAME -> timm-NAME (a path part)
    if args.struct == "rsst":
        parts += [args.RST_schedule.replace("^", ""), f"reg{args.reg_granularity_prune:g}"]
        if args.RST_schedule == "exp_custom_exponents":
            parts.append(f"exp{args.exponents:g}")
        if args.reg_mode == "raw":
            parts.append("raw")
    else:
        parts.append(f"fill{args.fillback_rate:g}")
    parts += [args.criteria, f"rate{args.rate:g}"]
    if args.vit_structured:
        parts.append(f"struct_{args.vit_prune_target or 'head'}")
    elif getattr(args, "mamba_prune_target", None) and not args.unstructured:
        parts.append(f"struct_{args.mamba_prune_target}")
    elif args.unstructured or vit:
        parts.append("unstructured")
    return "_".join(parts + [time.strftime("%Y%m%d-%H%M%S")])


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        with open(netrc) as f:
            return "api.wandb.ai" in f.read()
    except OSError:
        return False


class Logger:
    """wandb when enabled, otherwise nothing; `auto` goes offline without credentials."""

    def __init__(self, mode: str, project: str, name: str, config: dict, save_dir: str, run_id: str | None = None):
        self.run = None
        if mode == "disabled":
            return
        if mode == "auto":
            mode = "online" if _has_wandb_credentials() else "offline"
        import wandb

        self.run = wandb.init(
            project=project,
            name=name,
            config=config,
            dir=save_dir,
            mode=mode,
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")
        if mode == "offline":
            print(
                f"wandb: offline run in {save_dir}/wandb; upload later with "
                f"`wandb sync {save_dir}/wandb/offline-run-*`",
                file=sys.stderr,
            )

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run else None

    def log(self, data: dict) -> None:
        if self.run:
            self.run.log(data)

    def finish(self) -> None:
        if self.run:
            self.run.finish()
