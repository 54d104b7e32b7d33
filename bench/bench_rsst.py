"""RSST (calibrated and raw) against Refill and unstructured IMP on `digits`, several seeds.

Real data, CPU. Every run goes through the real CLI with `--threads 1`, `--jobs` at a time; a
finished run is skipped and an unfinished one resumed, so the script can be stopped and rerun.
State 0 (dense training) does not depend on the method, so per group and seed it is trained
once, by the first method; the other methods start from a copy of that run's state 0 (its
checkpoint with their own flags written into the saved config) and `--resume` from state 1.
At the end it appends mean +- std of each state's ticket accuracy (and RSST's norm ratio and
soft - hard gap at removal) to bench/RESULTS.md and draws compare.py pictures of seed 1.

    python bench/bench_rsst.py [--groups res20s vit ablation] [--seeds 1 2 3] [--methods NAME ...] [--jobs 2]

`--deadline S` stops it after S seconds (running runs get SIGTERM and checkpoint; tables printed, not
recorded; exit 3; a rerun continues);
`--tag T` marks the recorded tables and compare.py pictures (bench/gpu_science.sh: the GPU runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

from common import ROOT, apply_threads, record

import torch
import yaml

import main_imp_fillback as mif  # noqa: E402  (common puts the repository root on sys.path)

COMMON = ["--dataset", "digits", "--threads", "1", "--wandb", "disabled"]
CNN = ["--arch", "res20s", "--rate", "0.2", "--pruning_times", "5", "--epochs", "15", "--batch_size", "64"]
VIT = [
    "--arch",
    "vit_tiny",
    "--vit_structured",
    "--vit_prune_target",
    "both",
    "--rate",
    "0.3",
    "--pruning_times",
    "3",
    "--epochs",
    "30",
    "--augment",
    "light",
    "--batch_size",
    "32",
]
MAMBA = ["--depth", "2", "--rate", "0.3", "--pruning_times", "3", "--epochs", "3", "--augment", "light"]
MAMBA += ["--batch_size", "32"]  # mamba_tiny's width, d_state and MLP at depth 2: ~0.3 M parameters, CPU minutes
GROUPS = {
    "res20s": {
        "flags": CNN,
        "methods": {
            "IMP unstructured": ["--struct", "rsst", "--unstructured"],
            "Refill": ["--struct", "refill"],
            "RSST calibrated": ["--struct", "rsst"],
            "RSST raw": ["--struct", "rsst", "--reg_mode", "raw"],
        },
    },
    "vit": {
        "flags": VIT,
        "methods": {
            "Refill": ["--struct", "refill"],
            "RSST calibrated": ["--struct", "rsst"],
            "RSST raw": ["--struct", "rsst", "--reg_mode", "raw"],
        },
    },
    "mamba": {
        "flags": ["--arch", "mamba_tiny", *MAMBA],
        "methods": {
            "Refill": ["--struct", "refill"],
            "RSST calibrated": ["--struct", "rsst"],
            "IMP unstructured": ["--struct", "rsst", "--unstructured"],
        },
        "seeds": [1, 2],
    },
    "mamba_dense": {  # dense only, 10 epochs: mamba_tiny depth 2 against vit_tiny depth 1 (both ~0.3 M parameters)
        "flags": ["--arch", "mamba_tiny", "--depth", "2", "--pruning_times", "1", "--epochs", "10", *MAMBA[8:]],
        "methods": {"mamba_tiny dense": ["--struct", "refill"]},
        "seeds": [1, 2],
    },
    "vit_dense": {
        "flags": ["--arch", "vit_tiny", "--depth", "1", "--pruning_times", "1", "--epochs", "10", *MAMBA[8:]],
        "methods": {"vit_tiny dense": ["--struct", "refill"]},
        "seeds": [1, 2],
    },
    "ablation": {  # --reg_end on res20s RSST calibrated, seed 1 (0.5 is the res20s group's run)
        "flags": CNN,
        "methods": {
            "reg_end 0.3": ["--struct", "rsst", "--reg_end", "0.3"],
            "reg_end 0.7": ["--struct", "rsst", "--reg_end", "0.7"],
        },
        "seeds": [1],
        "base": "res20s",
        "shared": {"reg_end 0.5": "RSST calibrated"},  # rows that are runs of the base group
    },
    "vit_ablation": {  # unscaled steps on P, a linear lambda, --reg_end 0.3: against the vit group's RSST, seed 1
        "flags": VIT,
        "methods": {
            "unscaled updates": ["--struct", "rsst", "--reg_scale_updates", "off"],
            "schedule x": ["--struct", "rsst", "--RST_schedule", "x"],
            "reg_end 0.3": ["--struct", "rsst", "--reg_end", "0.3"],
        },
        "seeds": [1],
        "base": "vit",
        "shared": {"RSST calibrated (default)": "RSST calibrated"},
    },
}


def slug(name: str) -> str:
    return name.lower().replace(" ", "_").replace(".", "")


def run_dir(out: str, group: str, method: str, seed: int) -> str:
    return os.path.join(out, group, f"{slug(method)}_seed{seed}")


def seeds_of(group: str, seeds: list[int] | None) -> list[int]:
    """The seeds asked for on the command line, else the group's own, else 1 2 3."""
    return seeds or GROUPS[group].get("seeds", [1, 2, 3])


def runs_of(group: str, seeds: list[int] | None, out: str) -> list[dict]:
    """Every run of a group: method, seed, save dir, command, and the run whose state 0 it reuses."""
    spec = GROUPS[group]
    base_group = spec.get("base", group)
    first = next(iter(GROUPS[base_group]["methods"]))
    items = []
    for seed in seeds_of(group, seeds):  # seed by seed: the first seeds complete first
        for name, flags in spec["methods"].items():
            save = run_dir(out, group, name, seed)
            cmd = ["main_imp_fillback.py", *spec["flags"], *flags, *COMMON, "--seed", str(seed), "--save_dir", save]
            base = None if (group == base_group and name == first) else run_dir(out, base_group, first, seed)
            items.append({"method": name, "seed": seed, "save": save, "cmd": cmd, "base": base})
        for name, same in spec.get("shared", {}).items():
            item = next(it for it in runs_of(base_group, [seed], out) if it["method"] == same)
            items.insert(len(items) - len(spec["methods"]) + 1, {**item, "method": name})
    return items


def states_in(group: str) -> int:
    flags = GROUPS[group]["flags"]
    return int(flags[flags.index("--pruning_times") + 1])


def with_bases(items: list[tuple[str, dict]], out: str) -> list[tuple[str, dict]]:
    """The selected (group, run) pairs, after the state-0 base runs they need but did not select."""
    runs = {}
    for group, item in items:
        if item["base"]:
            base_group = GROUPS[group].get("base", group)
            base = next(it for it in runs_of(base_group, [item["seed"]], out) if it["save"] == item["base"])
            runs.setdefault(base["save"], (base_group, base))
    runs.update({item["save"]: (group, item) for group, item in items})
    return list(runs.values())


def finished(save: str, states: int) -> bool:
    try:
        with open(os.path.join(save, "summary.json")) as f:
            return len(json.load(f)) == states
    except (OSError, ValueError):
        return False


def clone_state0(base: str, save: str, cmd: list[str]) -> None:
    """Start `save` from the state-0 checkpoint of `base`, with this command's config."""
    args = mif.parse_args(cmd[1:])
    mif.resolve(args)
    config = vars(args)
    os.makedirs(save, exist_ok=True)
    ck = torch.load(os.path.join(base, "0checkpoint.pth.tar"), map_location="cpu", weights_only=True)
    ck["config"] = {**ck["config"], **{k: v for k, v in config.items() if k not in mif.RUNTIME_KEYS}}
    ck["wandb_id"] = None
    torch.save(ck, os.path.join(save, "0checkpoint.pth.tar"))
    torch.save({"phase": "done", "state": 0, "file": "0checkpoint.pth.tar"}, os.path.join(save, "latest.pth.tar"))
    for name in ("init.pth.tar", "0model_SA_best.pth.tar"):
        shutil.copy(os.path.join(base, name), os.path.join(save, name))
    with open(os.path.join(save, "args.yaml"), "w") as f:  # compare.py reads it
        yaml.safe_dump({k: v for k, v in ck["config"].items() if k not in mif.RUNTIME_KEYS}, f, sort_keys=True)


def launch(item: dict, log) -> subprocess.Popen:
    save, cmd = item["save"], item["cmd"]
    if not os.path.isfile(os.path.join(save, "latest.pth.tar")) and item["base"]:
        clone_state0(item["base"], save, cmd)
    if os.path.isfile(os.path.join(save, "latest.pth.tar")):
        cmd = ["main_imp_fillback.py", "--resume", "--save_dir", save, "--threads", "1", "--wandb", "disabled"]
    elif os.path.isdir(save):
        cmd = cmd + ["--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def ready(item: dict) -> bool:
    return item["base"] is None or os.path.isfile(os.path.join(item["base"], "0checkpoint.pth.tar"))


def run_all(items: list[dict], jobs: int, states_of: dict, deadline: float | None = None) -> bool:
    """Run the unfinished ones, `jobs` at a time (a clone once its base has state 0), until
    `deadline` (time.time()): then the running ones are stopped with SIGTERM (they checkpoint) and
    the result is False."""
    todo = list({it["save"]: it for it in items if not finished(it["save"], states_of[it["save"]])}.values())
    running = []
    while todo or running:
        if deadline is not None and time.time() > deadline:
            for _, proc, _, _ in running:
                proc.send_signal(signal.SIGTERM)
            for _, proc, _, log in running:
                proc.wait()
                log.close()
            print(f"deadline: {len(running)} runs stopped, {len(todo)} not started; rerun the same command to continue")
            return False
        for item in [it for it in todo if ready(it)][: max(0, jobs - len(running))]:
            todo.remove(item)
            os.makedirs(os.path.dirname(item["save"]), exist_ok=True)
            log = open(item["save"] + ".log", "a")
            running.append((item["save"], launch(item, log), time.time(), log))
            print(f"started {item['save']}", flush=True)
        time.sleep(2)
        for entry in list(running):
            save, proc, t0, log = entry
            if proc.poll() is not None:
                running.remove(entry)
                log.close()
                print(f"finished {save}: exit {proc.returncode}, {time.time() - t0:.0f} s", flush=True)
        if todo and not running and not any(ready(it) for it in todo):
            raise SystemExit("a base run failed before its state 0: see its .log")
    return True


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(group: str, items: list, states: int) -> list[str]:
    """Markdown: per method, mean +- std test accuracy of each state's ticket, remaining %, RSST diagnostics."""
    head = (
        "| method | seeds | "
        + " | ".join(f"state {k}" for k in range(states))
        + " | max norm ratio at removal | max soft - hard |"
    )
    lines = [head, "|---|---|" + "---|" * (states + 2)]
    by_method: dict[str, list[list[dict]]] = {}
    for item in items:
        name, save = item["method"], item["save"]
        if finished(save, states):
            with open(os.path.join(save, "summary.json")) as f:
                by_method.setdefault(name, []).append(json.load(f))
    for name, runs in by_method.items():
        cells = []
        for k in range(states):
            accs = [r[k]["final_test_acc"] for r in runs]
            remaining = statistics.mean(r[k]["remaining_weights"] for r in runs)
            cells.append(f"{mean_std(accs)} ({remaining:.1f} %)")
        ratios = [
            r[k]["penalized_norm_ratio"]
            for r in runs
            for k in range(1, states)
            if r[k].get("penalized_norm_ratio") is not None
        ]
        gaps = [
            r[k]["soft_test_acc"] - r[k]["hard_test_acc"]
            for r in runs
            for k in range(1, states)
            if r[k].get("soft_test_acc") is not None
        ]
        lines.append(
            f"| {name} | {len(runs)} | " + " | ".join(cells) + f" | {max(ratios):.2g} | {max(gaps):+.2f} |"
            if ratios
            else f"| {name} | {len(runs)} | " + " | ".join(cells) + " | - | - |"
        )
    if "Refill" in by_method and "RSST calibrated" in by_method:
        means = {
            m: [statistics.mean(r[k]["final_test_acc"] for r in by_method[m]) for k in range(states)]
            for m in ("Refill", "RSST calibrated")
        }
        diff = [f"{c - r:+.2f}" for c, r in zip(means["RSST calibrated"], means["Refill"])]
        lines.append("| RSST calibrated - Refill (means) | | " + " | ".join(diff) + " | | |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    p.add_argument(
        "--seeds", nargs="+", type=int, help="these seeds for every group (default: the group's own, else 1 2 3)"
    )
    p.add_argument("--methods", nargs="+", help="only these methods (names as in the tables); default all")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_rsst"))
    p.add_argument("--no_record", action="store_true", help="print the tables, do not append them to RESULTS.md")
    p.add_argument("--report", action="store_true", help="start no run: tables of the finished ones only")
    p.add_argument("--deadline", type=float, help="seconds: then stop the runs (they checkpoint) and report")
    p.add_argument("--tag", default="", help="appended to the recorded titles and the compare.py folders")
    a = p.parse_args()
    apply_threads(1)  # the runs use --threads 1; the recorded machine line says so
    items, states_of = [], {}
    for group in a.groups:
        states = states_in(group)
        for item in runs_of(group, a.seeds, a.out):
            if a.methods and item["method"] not in a.methods:
                continue
            states_of[item["save"]] = states
            items.append((group, item))
    runs = with_bases(items, a.out)  # a base run the --methods left out still trains the shared state 0
    deadline = a.deadline and time.time() + a.deadline
    complete = a.report or run_all(
        [it for _, it in runs], a.jobs, {it["save"]: states_in(g) for g, it in runs}, deadline
    )
    for group in a.groups:
        group_items = [it for g, it in items if g == group]
        states = states_of[group_items[0]["save"]]
        lines = table(group, group_items, states)
        train_s = 0.0  # training seconds from the runs' own summaries (each run counted once)
        for save in {it["save"] for it in group_items if finished(it["save"], states)}:
            with open(os.path.join(save, "summary.json")) as f:
                train_s += sum(r.get("seconds") or 0.0 for r in json.load(f))
        spec = GROUPS[group]
        lines += [
            "",
            "Test accuracy (%) of each state's ticket, mean ± std over seeds (remaining prunable "
            "weights); RSST: largest penalized norm ratio and soft - hard gap at removal over states >= 1.",
            f"Flags: `{' '.join(spec['flags'] + COMMON)}` plus per method: "
            + "; ".join(
                f"{n}: `{' '.join(f) or '(none)'}`"
                for n, f in spec["methods"].items()
                if not a.methods or n in a.methods
            )
            + f". Seeds {seeds_of(group, a.seeds)}; state 0 trained once per seed and shared. "
            f"Training time summed over these runs' summaries (the shared state 0 counted in each): "
            f"{train_s / 60:.0f} min (the runs shared the cores with other work at times).",
        ]
        print("\n".join(lines))
        if not a.no_record and complete:  # a deadline's partial tables are printed, not recorded
            record(
                f"RSST vs Refill on digits: {group}{f' ({a.tag})' if a.tag else ''}",
                "python bench/bench_rsst.py " + shlex.join(sys.argv[1:]),
                lines,
            )
        seed1 = [
            os.path.relpath(it["save"], ROOT)
            for it in group_items  # no machine paths in results/
            if it["seed"] == 1 and finished(it["save"], states)
        ]
        if len(seed1) > 1:
            subprocess.run(
                [
                    sys.executable,
                    "compare.py",
                    *seed1,
                    "--out",
                    os.path.join("results", f"digits_{group}{a.tag and '_' + a.tag}"),
                ],
                cwd=ROOT,
                check=False,
            )
    return 0 if complete else 3


if __name__ == "__main__":
    sys.exit(main())
