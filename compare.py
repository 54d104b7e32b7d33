"""Compare finished runs: accuracy against remaining weights and compression, and a state table.

Reads each RUN_DIR's summary.json and args.yaml and writes NAME.png (test accuracy of every
state's ticket against remaining prunable weights, log x, and against compression; the dense
state-0 accuracy dashed) and NAME.md (one row per run, one column per state, the best state).
With --masks it also redraws RUN_DIR/masks.png from the run's checkpoints (old runs).

    python compare.py runs/vit_rsst runs/vit_refill runs/vit_unstructured --out runs/compare
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

import yaml

from families import family_of
from reporting import pyplot

METHODS = {"rsst": "RSST", "refill": "Refill"}
ROW_KEYS = {"state", "remaining_weights", "compression", "final_test_acc"}


class InputError(Exception):
    """Bad command line or input: one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise InputError(message)


RSST_DEFAULTS = {
    "reg_mode": "calibrated",
    "reg_end": 0.5,
    "reg_target": 1e-3,
    "reg_granularity_prune": 1.0,
    "RST_schedule": "exp_custom_exponents",
    "exponents": 4,
    "reg_scale_updates": "auto",
}


@dataclass
class Run:
    """One finished run: its folder, resolved config (args.yaml) and summary rows."""

    path: str
    config: dict
    rows: list[dict]

    @property
    def method(self) -> str:
        """IMP-unstructured (no regroup), else RSST or Refill."""
        c = self.config
        try:
            regroups = family_of(str(c.get("arch", ""))).regroups(argparse.Namespace(**c))
        except ValueError:  # an arch this version does not know: only the flag says
            regroups = not c.get("unstructured")
        if not regroups:
            return "IMP-unstructured"
        return METHODS.get(c.get("struct"), str(c.get("struct")))

    @property
    def label(self) -> str:
        """Method, criterion (structured runs only: it ranks units), rate, and ViT target or fill rate."""
        c, parts = self.config, [self.method]
        if self.method != "IMP-unstructured":
            parts.append(str(c.get("criteria")))
        parts.append(f"rate {c.get('rate')}")
        if c.get("vit_structured"):
            parts.append(f"target {c.get('vit_prune_target')}")
        elif c.get("mamba_prune_target") and self.method != "IMP-unstructured":
            parts.append(f"target {c.get('mamba_prune_target')}")
        if self.method == "Refill" and c.get("fillback_rate"):
            parts.append(f"fill {c.get('fillback_rate')}")
        if self.method == "RSST":  # the penalty settings that differ from the defaults
            parts += [f"{k} {c[k]}" for k, v in RSST_DEFAULTS.items() if k in c and c[k] != v]
        return " ".join(parts)


def _read(path: str, loader) -> object:
    try:
        with open(path) as f:
            return loader(f)
    except FileNotFoundError:
        raise InputError(
            f"{os.path.dirname(path) or '.'}: no {os.path.basename(path)} (not a run folder, or no state finished yet)"
        ) from None
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise InputError(f"{path}: cannot read ({type(e).__name__})") from None


def load_run(path: str) -> Run:
    """The run in folder `path`; InputError when it is missing or has no finished state."""
    if not os.path.isdir(path):
        raise InputError(f"RUN_DIR {path}: not a directory")
    rows = _read(os.path.join(path, "summary.json"), json.load)
    config = _read(os.path.join(path, "args.yaml"), yaml.safe_load)
    if not isinstance(config, dict):
        raise InputError(f"RUN_DIR {path}: args.yaml is not a mapping of flags")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and ROW_KEYS <= r.keys() for r in rows):
        raise InputError(f"RUN_DIR {path}: summary.json needs state rows with {', '.join(sorted(ROW_KEYS))}")
    return Run(path, config, sorted((_clean_row(path, r) for r in rows), key=lambda r: r["state"]))


def _clean_row(path: str, row: dict) -> dict:
    """A summary row with an integer state and numbers (NaN where a value is missing or null)."""
    state = row["state"]
    if isinstance(state, bool) or not isinstance(state, int):
        raise InputError(f"RUN_DIR {path}: summary.json has a state {state!r} that is not an integer")
    out = dict(row)
    for key in ROW_KEYS - {"state"}:
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InputError(f"RUN_DIR {path}: state {state} has {key} {value!r}, not a number")
        out[key] = math.nan if value is None else float(value)
    return out


def check_comparable(runs: list[Run]) -> None:
    """Refuse runs of different datasets or archs: accuracies would not be comparable."""
    for key in ("dataset", "arch"):
        values = {}
        for r in runs:
            values.setdefault(str(r.config.get(key)), []).append(os.path.basename(os.path.normpath(r.path)))
        if len(values) > 1:
            mix = "; ".join(f"{v}: {', '.join(names)}" for v, names in values.items())
            raise InputError(f"runs mix {key}s ({mix}); pass --allow_mixed to compare them anyway")


def unique_labels(runs: list[Run]) -> list[str]:
    """Run labels, with the folder name added where two runs would share one."""
    labels = [r.label for r in runs]
    return [
        f"{lab} ({os.path.basename(os.path.normpath(r.path))})" if labels.count(lab) > 1 else lab
        for lab, r in zip(labels, runs)
    ]


def best_state(rows: list[dict]) -> dict:
    """The pruned state (>= 1) with the highest final test accuracy, else state 0."""
    pruned = [r for r in rows if r["state"] >= 1 and not math.isnan(r["final_test_acc"])]
    return max(pruned, key=lambda r: r["final_test_acc"]) if pruned else rows[0]


def _plain_log_x(ax, values: list[float]) -> None:
    """Log x with plain-number tick labels; minor ticks labelled only within about one decade."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(plain)
    values = [v for v in values if math.isfinite(v) and v > 0] or [1.0]
    narrow = max(values) / max(min(values), 1e-12) < 12
    ax.xaxis.set_minor_formatter(plain if narrow else NullFormatter())


def plot_runs(path: str, runs: list[Run], labels: list[str]) -> None:
    """Two panels: test accuracy against remaining weights (%) and against compression, log x."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    panels = (("remaining_weights", "remaining prunable weights (%)"), ("compression", "compression (x)"))
    for i, (run, label) in enumerate(zip(runs, labels)):
        color, rows = f"C{i}", run.rows
        acc = [r["final_test_acc"] for r in rows]
        for ax, (key, _) in zip(axes, panels):
            ax.plot([r[key] for r in rows], acc, marker="o", color=color, label=label)
            ax.axhline(rows[0]["final_test_acc"], color=color, ls="--", lw=0.9, alpha=0.7)
    dense = Line2D([], [], color="gray", ls="--", label="dense (state 0) accuracy")
    for ax, (key, xlabel) in zip(axes, panels):
        _plain_log_x(ax, [r[key] for run in runs for r in run.rows])
        ax.set(xlabel=xlabel, ylabel="test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].invert_xaxis()
    axes[0].set_title("accuracy vs remaining weights")
    axes[1].set_title("accuracy vs compression")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(
        handles + [dense],
        names + [dense.get_label()],
        loc="outside lower center",
        ncol=min(3, len(handles) + 1),
        fontsize=8,
    )
    datasets = sorted({str(r.config.get("dataset")) for r in runs})
    archs = sorted({str(r.config.get("arch")) for r in runs})
    fig.suptitle(f"{', '.join(archs)} on {', '.join(datasets)}: test accuracy of each state's ticket")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(row: dict | None) -> str:
    if row is None or math.isnan(row["final_test_acc"]):
        return "–"
    return f"{row['final_test_acc']:.2f} ({row['remaining_weights']:.3g}%)"


def table_markdown(runs: list[Run], labels: list[str]) -> str:
    """One row per run: method, criterion, rate, acc (remaining %) at each state, best state."""
    n_states = max(r.rows[-1]["state"] for r in runs) + 1
    head = ["run", "method", "criterion", "rate"] + [f"state {s}" for s in range(n_states)] + ["best state"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, label in zip(runs, labels):
        by_state = {r["state"]: r for r in run.rows}
        best = best_state(run.rows)
        criterion = "–" if run.method == "IMP-unstructured" else str(run.config.get("criteria"))
        cells = [label, run.method, criterion, str(run.config.get("rate"))]
        cells += [_cell(by_state.get(s)) for s in range(n_states)]
        cells.append(
            f"{best['state']}: {_cell(best)}, {best['compression']:.2f}x"
            if not math.isnan(best["final_test_acc"])
            else "–"
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path: str, runs: list[Run], labels: list[str]) -> None:
    datasets = ", ".join(sorted({str(r.config.get("dataset")) for r in runs}))
    archs = ", ".join(sorted({str(r.config.get("arch")) for r in runs}))
    intro = (
        f"# {archs} on {datasets}\n\nTest accuracy (%) of each state's ticket (`final_test_acc`) and, in "
        "brackets, the remaining prunable weights. Best state: the highest accuracy among pruned states.\n"
    )
    sources = "\n".join(f"- {label}: `{r.path}`" for r, label in zip(runs, labels))
    with open(path, "w") as f:
        f.write(f"{intro}\n{table_markdown(runs, labels)}\n\nRuns:\n{sources}\n")


def masks_png_from_run(run_dir: str) -> str | None:
    """Redraw `run_dir`/masks.png from the run's state checkpoints; returns its path (None, with
    one warning, when no state checkpoint is readable). Unreadable ones are skipped with a
    warning; a checkpoint holding pickled code is refused (exit 2)."""
    from checkpoints import UnsafeCheckpoint, read_checkpoint
    from mask_plots import load_state_masks, plot_masks
    from models import create_model

    first = os.path.join(run_dir, "0checkpoint.pth.tar")
    try:
        masks = load_state_masks(run_dir)  # warns once for an unreadable state 0
        ck = read_checkpoint(first) if masks else None
    except UnsafeCheckpoint as e:
        raise InputError(f"--masks: {e}") from None
    if ck is None:
        if not os.path.exists(first):
            print(f"warning: --masks: {first} is missing; masks.png not redrawn", file=sys.stderr)
        return None
    try:
        model = create_model(ck["arch"], ck["num_classes"], ck["img_size"], **ck.get("model_kwargs", {}))
    except Exception as e:  # a foreign file with this tool's keys
        raise InputError(f"--masks: cannot rebuild the model from {first} ({type(e).__name__})") from None
    path = os.path.join(run_dir, "masks.png")
    plot_masks(path, ck.get("config", {}).get("exp_name", ck["arch"]), masks, model)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (with summary.json and args.yaml)")
    p.add_argument("--out", required=True, metavar="NAME", help="writes NAME.png and NAME.md")
    p.add_argument("--allow_mixed", action="store_true", help="compare runs of different datasets or archs")
    p.add_argument("--masks", action="store_true", help="also redraw RUN_DIR/masks.png from each run's checkpoints")
    return p


def output_stem(out: str) -> str:
    """NAME without a .png/.md suffix, its folder created and checked writable (before any work)."""
    if out.endswith(os.sep) or os.path.isdir(out):
        raise InputError(f"--out {out}: is a folder; give a file name stem, e.g. {os.path.join(out, 'compare')}")
    stem = os.path.splitext(out)[0] if out.endswith((".png", ".md")) else out
    folder = os.path.dirname(stem) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        probe = f"{stem}.{os.getpid()}.probe"
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise InputError(f"--out {out}: cannot write there ({e.strerror})") from None
    return stem


def compare(args: argparse.Namespace) -> None:
    stem = output_stem(args.out)
    runs = [load_run(d) for d in args.run_dirs]
    if not args.allow_mixed:
        check_comparable(runs)
    labels = unique_labels(runs)
    plot_runs(f"{stem}.png", runs, labels)
    write_markdown(f"{stem}.md", runs, labels)
    print(f"wrote {stem}.png and {stem}.md")
    if args.masks:
        for path in filter(None, (masks_png_from_run(run.path) for run in runs)):
            print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    try:
        compare(build_parser().parse_args(argv))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
