#!/usr/bin/env bash
# The r1 study from the pretrained bases: the stages (3 seeds) and Table 6, then the tables.
#   bash experiments/r1/run_base.sh            # Table 6 for seeds 0, 1, 2 (TABLE6_SEEDS="0" for one)
# The bases are built (or found in the cache) first; their hf/ paths are the ones the configs name.
set -euo pipefail
esft base --config configs/base/dense_small.yaml --out runs/bases
esft base --config configs/base/dense.yaml --out runs/bases
for seed in 0 1 2; do
  esft pipeline --config experiments/r1/stages_base.yaml --out experiments/r1/runs_base/stages_seed$seed --seed $seed
done
for seed in ${TABLE6_SEEDS:-0 1 2}; do
  esft pipeline --config experiments/r1/table6_base.yaml --out experiments/r1/runs_base/table6_seed$seed --seed $seed
done
python experiments/r1/collect.py experiments/r1/runs_base results_base
