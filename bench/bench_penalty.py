"""What calibrated RSST leaves of the penalized norm at removal, by state length, with AdamW.

The calibration makes the pure decay reach --reg_target (1e-3) at --reg_end, for any length;
the optimizer pushes back. Adam's normalized steps keep about lr in size however small a weight
gets, so without `--reg_scale_updates` a fading weight settles near lr / (lr0 * lambda), and
lr0 * lambda shrinks as 1 / T: the longer the state, the more is left. This runs the real CLI
on `digits` (ViT recipe, `--augment light`, batch 32, heads + MLP, rate 0.3, 2 states) with
`--reg_scale_updates off` and `auto` (on for AdamW) at two state lengths, and tabulates the
penalized norm ratio at removal and the accuracy around it. To fit a 2-core CPU the ViT is
vit_tiny with 2 blocks instead of 9 (`--depth`); state 0 is trained once per length and shared.

    python bench/bench_penalty.py [--epochs 40 120] [--depth 2] [--record]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from common import ROOT, apply_threads, bench_parser, record

FLAGS = [
    "--arch",
    "vit_tiny",
    "--dataset",
    "digits",
    "--vit_structured",
    "--vit_prune_target",
    "both",
    "--rate",
    "0.3",
    "--pruning_times",
    "2",
    "--augment",
    "light",
    "--batch_size",
    "32",
    "--threads",
    "1",
    "--wandb",
    "disabled",
]
MODES = ("off", "auto")  # the first trains state 0, the second starts from a copy of it


def child(depth: int, argv: list[str]) -> int:
    """Run the CLI with vit_tiny built at `depth` blocks."""
    import imp_loop
    import main_imp_fillback as mif

    build = imp_loop.create_model
    imp_loop.create_model = lambda name, nc, img_size=None, **kw: build(name, nc, img_size, **{**kw, "depth": depth})
    return mif.main(argv)


def run(save: str, argv: list[str], depth: int, base: str | None) -> None:
    from bench_rsst import clone_state0, finished

    if finished(save, 2):
        return
    cmd = ["main_imp_fillback.py", *argv, "--save_dir", save]
    if base and not os.path.isfile(os.path.join(save, "latest.pth.tar")):
        clone_state0(base, save, cmd)
    if os.path.isfile(os.path.join(save, "latest.pth.tar")):
        argv = ["--resume", "--save_dir", save, "--threads", "1", "--wandb", "disabled"]
    else:
        argv = argv + ["--save_dir", save, "--overwrite"]
    with open(save + ".log", "a") as log:
        subprocess.run(
            [sys.executable, __file__, "--child", str(depth), *argv],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(int(sys.argv[2]), sys.argv[3:])
    p = bench_parser(__doc__)
    p.add_argument("--epochs", nargs="+", type=int, default=[40, 120])
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_penalty"))
    a = p.parse_args()
    apply_threads(1)  # the runs use --threads 1; the recorded machine line says so
    lines = [
        "| epochs per state | steps per state (T) | removal step | --reg_scale_updates | norm ratio at removal "
        "(target 0.001) | soft -> hard test acc | state-1 ticket test acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for epochs in a.epochs:
        base = None
        for mode in MODES:
            save = os.path.join(a.out, f"e{epochs}_{mode}")
            os.makedirs(a.out, exist_ok=True)
            run(save, FLAGS + ["--epochs", str(epochs), "--reg_scale_updates", mode], a.depth, base)
            base = base or save
            with open(os.path.join(save, "summary.json")) as f:
                row = json.load(f)[1]
            steps = row["reg_end_step"] * 2  # --reg_end 0.5
            lines.append(
                f"| {epochs} | {steps} | {row['reg_end_step']} | {mode} | {row['penalized_norm_ratio']:.3g} | "
                f"{row['soft_test_acc']:.2f} -> {row['hard_test_acc']:.2f} | {row['final_test_acc']:.2f} |"
            )
    lines += [
        "",
        f"vit_tiny at depth {a.depth} (embed 192, 3 heads, MLP x2), flags `{' '.join(FLAGS)}`, seed 1; "
        "`auto` is on for AdamW. One test image = 0.28 points.",
    ]
    print("\n".join(lines))
    if a.record:
        record("RSST penalty against AdamW, by state length", "python bench/bench_penalty.py --record", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
