#!/usr/bin/env bash
# The seed's loop over unit criteria: ViT-Tiny, RSST, head-level (--vit_structured), rate 0.3.
# Runs go to $OUT/vit_head30_<criteria> (OUT default runs/sweep_criteria_$DATASET), then compare.py
# writes $OUT/compare.png and $OUT/compare.md.
#   DATASET=cifar100 EPOCHS=80 PRUNING_TIMES=20 bash sweeps/criteria.sh [extra flags for every run]
source "$(dirname "$0")/common.sh"
OUT=${OUT:-runs/sweep_criteria_${DATASET}}
for criteria in remain magnitude l1 l2 saliency; do
  sweep_run "$OUT/vit_head30_${criteria}" --arch vit_tiny --struct rsst --vit_structured \
    --criteria "$criteria" --rate 0.3 --exp_name "vit_head30_${criteria}" "$@"
done
sweep_compare
