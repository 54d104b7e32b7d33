"""Whole searches with --compact_train auto against off: per-state training seconds beside the MAC ratio.

    python bench/bench_search.py --threads 1 [--configs vit_refill vit_rsst res20s_refill] [--record]

Each config runs `off` then `auto`, --repeats times (interleaved: off, auto, off, auto, so a change
in machine load hits both alike), on synthetic data, and reads each run's summary.csv: `seconds` (a
state's training time, evaluation excluded; the fastest of the repeats) and `train_mac_ratio`. It
also checks the two runs agree: the state-1 hard masks are identical and the kept weights of state 1
differ by at most --tolerance.
"""

from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys
import tempfile
import time

from common import ROOT, bench_parser, record

import torch

CONFIGS = {
    "vit_refill": ["--arch", "vit_tiny", "--struct", "refill", "--vit_structured", "--vit_prune_target", "both"],
    "vit_rsst": ["--arch", "vit_tiny", "--struct", "rsst", "--vit_structured", "--vit_prune_target", "both"],
    "res20s_refill": ["--arch", "res20s", "--struct", "refill"],
}


def run_search(flags: list[str], mode: str, save_dir: str, threads: int) -> float:
    cmd = [sys.executable, os.path.join(ROOT, "main_imp_fillback.py"), *flags, "--compact_train", mode]
    cmd += ["--threads", str(threads), "--device", "cpu", "--wandb", "disabled", "--save_dir", save_dir]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{shlex.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return time.perf_counter() - t0


def summary(save_dir: str) -> list[dict]:
    with open(os.path.join(save_dir, "summary.csv")) as f:
        return list(csv.DictReader(f))


def agreement(off: str, auto: str) -> tuple[bool, float]:
    """(state-1 hard masks identical, max |w_off - w_auto| over the prunable weights they keep)."""
    load = lambda d: torch.load(os.path.join(d, "1checkpoint.pth.tar"), map_location="cpu", weights_only=True)
    a, b = load(off), load(auto)
    same = all(torch.equal(a["mask"][n], b["mask"][n]) for n in a["mask"])
    dw = max(
        float((a["state_dict"][f"{n}.weight"] - b["state_dict"][f"{n}.weight"])[m].abs().max())
        for n, m in a["mask"].items()
    )
    return same, dw


def main() -> None:
    p = bench_parser(__doc__)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--states", type=int, default=4, help="--pruning_times")
    p.add_argument("--rate", type=float, default=0.3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--synthetic_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1, help="off/auto pairs per config (per state: the fastest)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="kept-weight agreement of state 1")
    p.add_argument("--keep", default=None, help="keep the runs in this folder (default: a temporary one)")
    args = p.parse_args()
    threads = args.threads or 1
    torch.set_num_threads(threads)
    base = args.keep or tempfile.mkdtemp(prefix="bench_search_")
    common = ["--dataset", "synthetic", "--synthetic_size", str(args.synthetic_size), "--batch_size"]
    common += [str(args.batch_size), "--epochs", str(args.epochs), "--pruning_times", str(args.states)]
    common += ["--rate", str(args.rate)]
    lines = [
        f"Synthetic data ({args.synthetic_size} training images, batch {args.batch_size}), {args.states} states at "
        f"rate {args.rate}, {args.epochs} epochs per state, {threads} thread(s), {args.repeats} interleaved "
        "off/auto pair(s) per config. `s` is a state's training seconds (summary.csv `seconds`, evaluation "
        "excluded; the fastest of the repeats); time ratio = auto / off; MAC ratio = summary.csv "
        "`train_mac_ratio` of the auto run (per-sample MACs of the model trained at the state end / dense).",
        "",
        "| config | state | off s | auto s | time ratio | MAC ratio |",
        "|---|---|---|---|---|---|",
    ]
    totals = []
    for name in args.configs:
        flags = CONFIGS[name] + common
        dirs = {m: os.path.join(base, f"{name}_{m}") for m in ("off", "auto")}
        wall, secs = {"off": [], "auto": []}, {"off": [], "auto": []}
        for r in range(args.repeats):
            for m in ("off", "auto"):
                wall[m].append(run_search(flags, m, dirs[m] + f"_{r}", threads))
                secs[m].append([float(row["seconds"]) for row in summary(dirs[m] + f"_{r}")])
        dirs = {m: d + "_0" for m, d in dirs.items()}
        rows = {m: summary(d) for m, d in dirs.items()}
        best = {m: [min(col) for col in zip(*secs[m])] for m in secs}
        wall = {m: min(w) for m, w in wall.items()}
        for off, auto, so, sa in zip(rows["off"], rows["auto"], best["off"], best["auto"]):
            line = f"| {name} | {off['state']} | {so:.1f} | {sa:.1f} | {sa / so:.2f} | {auto['train_mac_ratio']} |"
            lines.append(line)
            print(line, flush=True)
        train = {m: sum(best[m]) for m in best}
        same, dw = agreement(dirs["off"], dirs["auto"])
        totals.append(
            f"- {name}: whole search training {train['off']:.1f} s off, {train['auto']:.1f} s auto "
            f"({train['off'] / train['auto']:.2f}x faster); wall incl. start-up and evaluation {wall['off']:.0f} s "
            f"vs {wall['auto']:.0f} s ({wall['off'] / wall['auto']:.2f}x); state-1 masks "
            f"{'identical' if same else 'DIFFER'}, kept weights max |dw| {dw:.2e}"
            + ("" if same and dw <= args.tolerance else f" (above --tolerance {args.tolerance:g})")
        )
        print(totals[-1], flush=True)
    lines += [""] + totals
    print("\n".join(lines))
    if args.record:
        record("compact training: whole searches, auto vs off", "python " + shlex.join(sys.argv), lines)


if __name__ == "__main__":
    main()
