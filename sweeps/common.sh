# Shared by the sweep scripts (sourced, not run): settings from the environment and one run.
#   DATASET (cifar100), EPOCHS (80), PRUNING_TIMES (20): passed to every run
#   PYTHON (python): the interpreter; OUT (runs/sweep_<name>_<dataset>): where the runs go
# Extra arguments of the calling script are passed to every run (e.g. --batch_size 64 --wandb offline).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATASET=${DATASET:-cifar100}
EPOCHS=${EPOCHS:-80}
PRUNING_TIMES=${PRUNING_TIMES:-20}
PYTHON=${PYTHON:-python}
RUN_DIRS=()

# sweep_run DIR FLAGS...: one run into DIR; a DIR holding a started run is resumed (a finished
# run then returns at once), so an interrupted sweep continues where it stopped.
sweep_run() {
  local dir=$1
  shift
  local resume=()
  [[ -f "$dir/latest.pth.tar" ]] && resume=(--resume)
  "$PYTHON" main_imp_fillback.py --dataset "$DATASET" --epochs "$EPOCHS" --pruning_times "$PRUNING_TIMES" \
    --save_dir "$dir" "${resume[@]}" "$@"
  RUN_DIRS+=("$dir")
}

# sweep_compare: compare.py over every run of the sweep -> $OUT/compare.png and $OUT/compare.md
sweep_compare() {
  "$PYTHON" compare.py "${RUN_DIRS[@]}" --out "$OUT/compare"
}
