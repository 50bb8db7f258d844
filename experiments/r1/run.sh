#!/usr/bin/env bash
# The r1 study: the R1 stages and the Table 6 comparison, 2 seeds each, then the tables.
#   bash experiments/r1/run.sh
set -euo pipefail
for seed in 0 1; do
  esft pipeline --config configs/pipelines/r1_tiny.yaml --out experiments/r1/runs/stages_seed$seed --seed $seed
  esft pipeline --config experiments/r1/table6.yaml --out experiments/r1/runs/table6_seed$seed --seed $seed
done
python experiments/r1/collect.py experiments/r1/runs
