#!/usr/bin/env bash
# The seed's loop over pruning rates: ViT-Tiny, RSST, head-level (--vit_structured), magnitude.
# Runs go to $OUT/vit_head_rate<rate> (OUT default runs/sweep_rates_$DATASET), then compare.py
# writes $OUT/compare.png and $OUT/compare.md.
#   DATASET=cifar100 EPOCHS=80 PRUNING_TIMES=20 bash sweeps/rates.sh [extra flags for every run]
source "$(dirname "$0")/common.sh"
OUT=${OUT:-runs/sweep_rates_${DATASET}}
for rate in 0.2 0.3 0.4 0.5; do
  sweep_run "$OUT/vit_head_rate${rate}" --arch vit_tiny --struct rsst --vit_structured \
    --criteria magnitude --rate "$rate" --exp_name "vit_head_rate${rate}" "$@"
done
sweep_compare
