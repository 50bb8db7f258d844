#!/usr/bin/env bash
# Precision checks on one CUDA machine (about 8 minutes on one H200, not yet run):
# 1. bf16 against fp32 over 200 steps: Qwen2-0.5B shape, built-in task mix, 4 x 2048 tokens per
#    step, the same data order on every row; "loss gap %" is the largest gap of the 10-step
#    moving-average loss to the 32-true row's.
# 2. torchao FP8 (tensorwise, rowwise) against bf16 on the Llama-3.2-1B shape, all compiled,
#    200 steps: tokens/s ratio and loss gap.
# Needs torchao for (2) (pip install torchao, or carry its wheel). Writes to $OUT (default /tmp/esft-gpu).
set -uo pipefail
OUT=${OUT:-/tmp/esft-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
python3 -m esft.cli bench --device cuda --shape 0.5b --data builtin --docs 8000 --max-length 2048 --rows 4 \
    --steps 200 --warmup 0 --lr 3e-4 --no-trl --dtype float32 --precision 32-true bf16-mixed bf16-true \
    --out "$OUT/precision_0.5b" 2> "$OUT/precision_0.5b.log"
echo "bf16 vs fp32: $(( $(date +%s) - start )) s"
python3 -m esft.cli bench --device cuda --shape 1b --data builtin --docs 8000 --max-length 2048 --rows 4 \
    --steps 200 --warmup 5 --lr 3e-4 --no-trl --dtype bfloat16 --precision bf16-true --layout flat --compile on \
    --fp8 none tensorwise rowwise --out "$OUT/fp8_1b" 2> "$OUT/fp8_1b.log"
echo "total: $(( $(date +%s) - start )) s"
