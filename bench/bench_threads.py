"""CPU thread settings for small models on a shared machine: seconds per training step of res20s
(batch 64) with torch's default thread count, with the same count and passive OpenMP waiting
(OMP_WAIT_POLICY=PASSIVE, which main_imp_fillback.py sets before torch loads), and with one
thread; each in a fresh process, taking turns, with the machine's load average recorded. Run it
on a loaded machine (that is the case it is about) and on an idle one.

    python bench/bench_threads.py [--steps 20] [--rounds 3] [--record]
"""

from __future__ import annotations

import os
import shlex
import statistics
import subprocess
import sys

from common import ROOT, bench_parser, machine, record

STEP = """
import sys, time, torch
sys.path.insert(0, {root!r})
from models import create_model
if {threads}:
    torch.set_num_threads({threads})
m = create_model("res20s", 10, 32)
opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
def step():
    opt.zero_grad(); torch.nn.functional.cross_entropy(m(x), y).backward(); opt.step()
for _ in range(3):
    step()
t0 = time.perf_counter()
for _ in range({steps}):
    step()
print((time.perf_counter() - t0) / {steps}, torch.get_num_threads())
"""
SETTINGS = {
    "torch default": ({}, 0),
    "default + OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, 0),
    "1 thread": ({}, 1),
}


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    times: dict[str, list[float]] = {k: [] for k in SETTINGS}
    threads = {}
    env0 = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    for _ in range(a.rounds):
        for name, (env, n) in SETTINGS.items():
            code = STEP.format(root=ROOT, threads=n, steps=a.steps)
            out = subprocess.run(
                [sys.executable, "-c", code], env={**env0, **env}, capture_output=True, text=True, check=True
            ).stdout.split()
            times[name].append(float(out[0]))
            threads[name] = out[1]
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = ["| setting | threads | median s/step | min s/step |", "|---|---|---|---|"]
    for name, t in times.items():
        lines.append(f"| {name} | {threads[name]} | {statistics.median(t):.3f} | {min(t):.3f} |")
    lines += [
        "",
        f"res20s, batch 64, SGD, {a.steps} steps x {a.rounds} rounds per setting; load average at the end {load}.",
    ]
    print(machine())
    print("\n".join(lines))
    if a.record:
        record("CPU threads under load", "python bench/bench_threads.py " + shlex.join(sys.argv[1:]), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
