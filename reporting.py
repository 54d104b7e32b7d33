"""Run outputs: checkpoints, summary table, plots, and the wandb logger."""
from __future__ import annotations

import csv
import json
import os
import sys
from checkpoints import write_atomic

SUMMARY_FIELDS = [
    "state", "imp_density", "remaining_weights", "compression", "heads_kept", "neurons_kept",
    "channels_kept", "structured_sparsity", "best_epoch", "best_val_acc", "test_acc_at_best_val",
    "final_val_acc", "final_test_acc", "soft_test_acc", "hard_test_acc", "final_lambda",
    "penalized_norm_ratio", "seconds",
]


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
    """Accuracy and loss per epoch (train / val / test) of one state."""
    plt = pyplot()
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in ("train", "val", "test"):
        a.plot(ep, [h[f"{key}_acc"] for h in history], marker="o", label=key)
        b.plot(ep, [h[f"{key}_loss"] for h in history], marker="o", label=key)
    a.set(xlabel="epoch", ylabel="accuracy (%)", title=title)
    b.set(xlabel="epoch", ylabel="loss")
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_lambda(path: str, steps: list[int], lambdas: list[float], norms: list[float], title: str) -> None:
    """RSST: lambda and the penalized weights' norm ratio over the state's optimizer steps."""
    plt = pyplot()
    fig, a = plt.subplots(figsize=(6, 3.6))
    a.plot(steps, lambdas, color="tab:red", label="reg_lambda")
    a.set(xlabel="optimizer step in state", ylabel="lambda", title=title)
    b = a.twinx()
    b.plot(steps, norms, color="tab:blue", label="||w_P|| / start")
    b.set_ylabel("penalized norm ratio")
    fig.legend(loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_summary(path: str, rows: list[dict], title: str) -> None:
    """Test accuracy against remaining prunable weights over the states (log x)."""
    plt = pyplot()
    fig, a = plt.subplots(figsize=(6, 4))
    x = [r["remaining_weights"] for r in rows]
    a.plot(x, [r["final_test_acc"] for r in rows], marker="o", label="test acc (state ticket)")
    a.plot(x, [r["best_val_acc"] for r in rows], marker="s", ls="--", label="best val acc")
    a.set_xscale("log")
    a.invert_xaxis()
    a.set(xlabel="remaining prunable weights (%)", ylabel="accuracy (%)", title=title)
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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

    def __init__(self, mode: str, project: str, name: str, config: dict, save_dir: str,
                 run_id: str | None = None):
        self.run = None
        if mode == "disabled":
            return
        if mode == "auto":
            mode = "online" if _has_wandb_credentials() else "offline"
        import wandb
        self.run = wandb.init(project=project, name=name, config=config, dir=save_dir, mode=mode,
                              id=run_id, resume="allow" if run_id else None)
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")
        if mode == "offline":
            print(f"wandb: offline run in {save_dir}/wandb; upload later with "
                  f"`wandb sync {save_dir}/wandb/offline-run-*`", file=sys.stderr)

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run else None

    def log(self, data: dict) -> None:
        if self.run:
            self.run.log(data)

    def finish(self) -> None:
        if self.run:
            self.run.finish()
