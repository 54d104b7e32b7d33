#!/usr/bin/env bash
# The open science question on a GPU: RSST against Refill on vit_tiny (digits, real data), where
# the CPU evidence has 2-3 seeds. bench/bench_rsst.py's vit group (Refill, RSST calibrated, RSST
# raw) and its --reg_end 0.3 variant, at 5 seeds, several runs at once on the one GPU.
#
#   bash bench/gpu_science.sh            # on a GPU machine: stops after DEADLINE s (default 290)
#   bash bench/gpu_science.sh            # again after a deadline: finished runs are kept, stopped ones resume
#   bash bench/gpu_science.sh --dry-run  # the plan, and bench_rsst's flags checked (no run; CI runs this)
#
# Expected time: untested on a GPU so far; planned for about 5 minutes on one H100/H200 (20 runs of
# 3 states x 30 epochs, 2 waves of JOBS at once: state 0 is trained once per seed and shared).
# When all runs finish, the tables are appended to bench/RESULTS.md ("RSST vs Refill on digits:
# vit (gpu)" and "... vit_ablation (gpu)"); after a deadline they are printed only (exit 3).
# Runs and logs: runs/gpu_science/. PYTHON overrides the interpreter; DEADLINE, JOBS, OUT the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEADLINE=${DEADLINE:-290}
JOBS=${JOBS:-10}
OUT=${OUT:-runs/gpu_science}
export WANDB_MODE=disabled
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # bench_rsst imports the repository's modules before bench/common
ARGS=(--groups vit vit_ablation --seeds 1 2 3 4 5 --methods Refill "RSST calibrated" "RSST raw" "reg_end 0.3"
      --jobs "$JOBS" --out "$OUT" --tag gpu)

echo "== bench_rsst.py ${ARGS[*]} --deadline $DEADLINE (about 5 min; resumable)" >&2
if [ "${1:-}" = "--dry-run" ]; then
  "$PY" bench/bench_rsst.py "${ARGS[@]}" --report --no_record
  exit $?
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "error: no CUDA device visible to $PY (these runs take hours on a CPU; see bench/bench_rsst.py)" >&2
  exit 2
fi
"$PY" bench/bench_rsst.py "${ARGS[@]}" --deadline "$DEADLINE"
rc=$?
[ "$rc" = 3 ] && echo "deadline reached: rerun bash bench/gpu_science.sh to continue (finished runs are kept)" >&2
exit $rc
