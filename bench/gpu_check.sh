#!/usr/bin/env bash
# One-shot GPU check, for a bare GPU machine: about 8 minutes on one H100/H200, the install
# included. Steps (expected time on one H100/H200, after the install):
#   0. .venv with the README's install command, when missing        ~2 min (network; skipped when present)
#   1. the CUDA tests (pytest -m gpu)                                 ~2 min
#   2. 2-state RSST of vit_small, synthetic CIFAR-size data           ~1.5 min
#   3. 2-state RSST of res20s, the same data                          ~1 min
#   4. CUDA latency of the exported vit ticket (export.py)            ~20 s
#   5. res20s with --compile (inductor; skipped without a C compiler
#      and Python headers)                                           ~1 min
# Every step runs even when one before it failed; all logs and runs stay in one folder,
# runs/gpu_check_<time>/; one summary block at the end gives each step's exit code and numbers.
#
#   bash bench/gpu_check.sh            # on a GPU machine
#   bash bench/gpu_check.sh --dry-run  # the same steps on the CPU at toy sizes (CI runs this)
#
# PYTHON overrides the interpreter (then no .venv is made); OUT overrides the results folder.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-runs/gpu_check_$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export WANDB_MODE=disabled
declare -A RC
note() { echo "== $*" >&2; }

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
else
  PY=.venv/bin/python
  if [ ! -x "$PY" ]; then
    note "step 0: no .venv: the README's install command (~2 min)"
    python3 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt > "$OUT/install.log" 2>&1
    RC[install]=$?
  fi
fi

if [ "$DRY" = 1 ]; then
  DEV=cpu; N=32; BATCH=16; VIT=vit_tiny; EPOCHS=1; EXTRA=(--threads 1); EXPORT=(--batch 4 --repeats 1 --warmup 0)
  export RSST_COMPILE_BACKEND=eager  # inductor's C++ build is minutes on a CPU; the compile branch still runs
else
  DEV=cuda; N=50000; BATCH=256; VIT=vit_small; EPOCHS=2; EXTRA=(); EXPORT=(--repeats 5)
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "error: no CUDA device visible to $PY (use --dry-run on a CPU machine)" >&2
    exit 2
  fi
fi
COMMON=(--dataset synthetic --synthetic_size "$N" --batch_size "$BATCH" --pruning_times 2 --epochs "$EPOCHS"
        --struct rsst --device "$DEV" --wandb disabled "${EXTRA[@]}")

note "step 1: pytest -m gpu (~2 min)"
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/ > "$OUT/pytest.log" 2>&1
RC[pytest]=$?
note "step 2: vit RSST, heads + MLP (~1.5 min)"
"$PY" main_imp_fillback.py --arch "$VIT" --vit_structured --vit_prune_target both --rate 0.3 "${COMMON[@]}" \
  --save_dir "$OUT/vit" > "$OUT/vit.log" 2>&1
RC[vit]=$?
note "step 3: res20s RSST, channels (~1 min)"
"$PY" main_imp_fillback.py --arch res20s "${COMMON[@]}" --save_dir "$OUT/res20s" > "$OUT/res20s.log" 2>&1
RC[res20s]=$?
note "step 4: export of the vit ticket (~20 s)"
"$PY" export.py --checkpoint "$OUT/vit/1checkpoint.pth.tar" --out "$OUT/vit_compact.pt" --device "$DEV" \
  "${EXPORT[@]}" > "$OUT/export.log" 2>&1
RC[export]=$?
note "step 5: res20s with --compile (~1 min)"
if [ "${RSST_COMPILE_BACKEND:-inductor}" = inductor ] && ! { command -v "${CC:-cc}" > /dev/null || command -v gcc > /dev/null; } ; then
  echo "skipped: --compile (inductor) needs a C compiler; none found (install gcc)" | tee "$OUT/compile.log" >&2
  RC[compile]=skipped
elif [ "${RSST_COMPILE_BACKEND:-inductor}" = inductor ] && \
     ! "$PY" -c "import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))"; then
  echo "skipped: --compile (inductor) needs the Python headers (Python.h; e.g. apt install python3-dev)" \
    | tee "$OUT/compile.log" >&2
  RC[compile]=skipped
else
  "$PY" main_imp_fillback.py --arch res20s "${COMMON[@]}" --pruning_times 1 --epochs 1 --compile \
    --save_dir "$OUT/compiled" > "$OUT/compile.log" 2>&1
  RC[compile]=$?
fi

RCS=""
for k in install pytest vit res20s export compile; do RCS+="$k=${RC[$k]:-} "; done
SUMMARY_PY=$PY
"$PY" -c "" 2>/dev/null || SUMMARY_PY=python3  # a failed install: the summary still comes
"$SUMMARY_PY" - "$OUT" "$N" "$RCS" <<'EOF'
import json, os, sys
out, n, rcs = sys.argv[1], int(sys.argv[2]), dict(kv.split("=") for kv in sys.argv[3].split())
try:
    import torch
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run)"
    version = torch.__version__
except Exception as e:  # a broken install: still report every step
    dev, version = f"unknown ({e})", "?"


def tail(name, lines=1):
    try:
        text = open(os.path.join(out, name)).read().strip().splitlines()
    except OSError:
        return ["(no log)"]
    return text[-lines:] or [""]


def rows(name):
    try:
        return json.load(open(os.path.join(out, name, "summary.json")))
    except (OSError, ValueError):
        return []


print(f"===== gpu_check on {dev}, torch {version}; logs and runs in {out} =====")
if rcs.get("install"):
    print(f"install (.venv): exit {rcs['install']}: {tail('install.log')[0]}")
print(f"pytest -m gpu: exit {rcs['pytest']}: {tail('pytest.log')[0]}")
for name, log in (("vit", "vit"), ("res20s", "res20s"), ("compiled", "compile")):
    rc = rcs["compile" if name == "compiled" else name]
    print(f"{name:9s} exit {rc}" + ("" if rows(name) else f": {tail(log + '.log')[0]}"))
    for r in rows(name):
        print(f"{name:9s} state {r['state']}: {r['seconds']:7.1f} s training, test acc {r['final_test_acc']:6.2f}, "
              f"remaining {r['remaining_weights']:6.2f} %, norm ratio at removal {r['penalized_norm_ratio']}")
for name in ("vit", "res20s"):
    rs = rows(name)
    if rs:
        import yaml

        cfg = yaml.safe_load(open(os.path.join(out, name, "args.yaml")))
        secs = sum(r["seconds"] for r in rs)
        print(f"{name:9s} {cfg['arch']}: {secs / (len(rs) * cfg['epochs']):.1f} s per epoch, "
              f"{n * len(rs) * cfg['epochs'] / max(secs, 1e-9):.0f} training images/s")
print(f"export: exit {rcs['export']}:", "\n        ".join(tail("export.log", 5)))
print("=====")
failed = [k for k, v in rcs.items() if v not in ("", "0", "skipped") and not (k == "pytest" and v == "5")]
sys.exit(1 if failed else 0)
EOF
