#!/usr/bin/env bash
# ESFT of a DeepSeek-V2-Lite-shaped MoE (15.7B parameters, random init, bf16) on one GPU, then full
# fine-tuning of the same model on the same GPU (expected: out of memory, reported), within 15
# minutes of GPU time including start-up (benchmarks/esft_v2lite.py; benchmarks/README.md).
#   bash benchmarks/esft_v2lite_gpu.sh          # writes $OUT (default /tmp/esft-v2lite)/esft_v2lite.json and .log
# Extra arguments go to the Python script, e.g. `--steps 6 --max-tokens 8192`.
set -uo pipefail
OUT=${OUT:-/tmp/esft-v2lite}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
start=$(date +%s)
# 12 min for the run itself leaves start-up, model build and the copy-back inside 15 min
timeout 720 python3 benchmarks/esft_v2lite.py --device cuda --out "$OUT/esft_v2lite.json" "$@" 2>&1 | tee "$OUT/esft_v2lite.log"
status=${PIPESTATUS[0]}
echo "esft_v2lite: exit $status after $(( $(date +%s) - start )) s"
exit "$status"
