# Shared by the sweep scripts (sourced, not run): settings from the environment and one run.
#   DATASET (cifar100), EPOCHS (80), PRUNING_TIMES (20): passed to every run
#   PYTHON (the repository's .venv/bin/python when it exists, else python3): the interpreter
#   OUT (runs/sweep_<name>_<dataset>): where the runs go
# Extra arguments of the calling script are passed to every run (e.g. --batch_size 64 --wandb offline).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATASET=${DATASET:-cifar100}
EPOCHS=${EPOCHS:-80}
PRUNING_TIMES=${PRUNING_TIMES:-20}
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi
RUN_DIRS=()

# sweep_run DIR FLAGS...: one run into DIR; a DIR holding a started run is resumed (a finished
# run then returns at once), so an interrupted sweep continues where it stopped.
sweep_run() {
  local dir=$1
  shift
  local resume=()
  [[ -f "$dir/args.yaml" ]] && resume=(--resume)
  "$PYTHON" main_imp_fillback.py --dataset "$DATASET" --epochs "$EPOCHS" --pruning_times "$PRUNING_TIMES" \
    --save_dir "$dir" "${resume[@]}" "$@"
  RUN_DIRS+=("$dir")
}

# sweep_compare: compare.py over every run of the sweep -> $OUT/compare.png and $OUT/compare.md
sweep_compare() {
  "$PYTHON" compare.py "${RUN_DIRS[@]}" --out "$OUT/compare"
}
