#!/usr/bin/env bash
# One-shot GPU check (about 8 minutes on one GPU): the CUDA tests (pytest -m gpu), a 2-state
# RSST run of vit_small and of res20s on synthetic CIFAR-sized data (seconds per epoch, images/s),
# the CUDA latency of an exported ticket, and a --compile run; ends with one summary block.
#
#   bash bench/gpu_check.sh            # on a GPU machine, after the README's install line
#   bash bench/gpu_check.sh --dry-run  # the same steps on the CPU at toy sizes (CI runs this)
#
# PYTHON overrides the interpreter (default: the repository's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$OUT"' EXIT
export WANDB_MODE=disabled

if [ "${1:-}" = "--dry-run" ]; then
  DEV=cpu; N=32; BATCH=16; VIT=vit_tiny; EPOCHS=1; EXTRA=(--threads 1); EXPORT=(--batch 4 --repeats 1 --warmup 0)
  export RSST_COMPILE_BACKEND=eager  # inductor's C++ build is minutes on a CPU; the compile branch still runs
else
  DEV=cuda; N=50000; BATCH=256; VIT=vit_small; EPOCHS=2; EXTRA=(); EXPORT=(--repeats 5)
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA: use --dry-run')"
fi
COMMON=(--dataset synthetic --synthetic_size "$N" --batch_size "$BATCH" --pruning_times 2 --epochs "$EPOCHS"
        --struct rsst --device "$DEV" --wandb disabled "${EXTRA[@]}")

step() { echo "== $1" >&2; }
step "pytest -m gpu"
set +e
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py > "$OUT/pytest.log" 2>&1
PYTEST_RC=$?
set -e
step "vit RSST (heads + MLP)"
"$PY" main_imp_fillback.py --arch "$VIT" --vit_structured --vit_prune_target both --rate 0.3 "${COMMON[@]}" \
  --save_dir "$OUT/vit" > "$OUT/vit.log"
step "res20s RSST (channels)"
"$PY" main_imp_fillback.py --arch res20s "${COMMON[@]}" --save_dir "$OUT/res20s" > "$OUT/res20s.log"
step "export of the vit ticket"
"$PY" export.py --checkpoint "$OUT/vit/1checkpoint.pth.tar" --out "$OUT/vit_compact.pt" --device "$DEV" \
  "${EXPORT[@]}" > "$OUT/export.log"
step "res20s with --compile"
"$PY" main_imp_fillback.py --arch res20s "${COMMON[@]}" --pruning_times 1 --epochs 1 --compile \
  --save_dir "$OUT/compiled" > "$OUT/compile.log"

"$PY" - "$OUT" "$N" "$PYTEST_RC" <<'EOF'
import json, os, sys
import torch
out, n, pytest_rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run)"
tail = open(os.path.join(out, "pytest.log")).read().strip().splitlines()
print(f"===== gpu_check on {dev}, torch {torch.__version__} =====")
print(f"pytest -m gpu: exit {pytest_rc}: {tail[-1] if tail else ''}")
for name in ("vit", "res20s", "compiled"):
    rows = json.load(open(os.path.join(out, name, "summary.json")))
    for r in rows:
        print(f"{name:9s} state {r['state']}: {r['seconds']:7.1f} s training, test acc {r['final_test_acc']:6.2f}, "
              f"remaining {r['remaining_weights']:6.2f} %, norm ratio at removal {r['penalized_norm_ratio']}")
import yaml
for name in ("vit", "res20s"):
    cfg = yaml.safe_load(open(os.path.join(out, name, "args.yaml")))
    rows = json.load(open(os.path.join(out, name, "summary.json")))
    secs = sum(r["seconds"] for r in rows)
    print(f"{name:9s} {cfg['arch']}: {secs / (len(rows) * cfg['epochs']):.1f} s per epoch, "
          f"{n * len(rows) * cfg['epochs'] / max(secs, 1e-9):.0f} training images/s")
print("export:", "\n        ".join(open(os.path.join(out, "export.log")).read().strip().splitlines()[-5:]))
print("=====")
sys.exit(pytest_rc if pytest_rc not in (0, 5) else 0)
EOF
