#!/usr/bin/env bash
# GPU checks on one CUDA machine: the `gpu` tests (flash varlen, precisions, torchao FP8, Liger,
# compile, a CLI fit), the SFT throughput table, and the side-by-side with TRL when `trl` imports
# (torchao and liger-kernel are optional: their tests skip without them).
# Writes logs and JSON to $OUT (default /tmp/esft-gpu). About 5 minutes on one H200.
#   bash benchmarks/gpu_checks.sh           # SKIP_BENCH=1 runs the tests only
set -uo pipefail
OUT=${OUT:-/tmp/esft-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/gpu.txt"
python3 -c "import inspect; from torch.nn.attention.varlen import varlen_attn; print('varlen_attn', inspect.signature(varlen_attn))" | tee -a "$OUT/gpu.txt"
python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -W ignore::DeprecationWarning --tb=short > "$OUT/gpu_tests.log" 2>&1
grep -E "^E |Error|passed|failed" "$OUT/gpu_tests.log" | head -40
[ "${SKIP_BENCH:-0}" = 1 ] || ! python3 -c "import trl" 2>/dev/null || python3 benchmarks/sft_vs_trl.py --device cuda \
    --model-size 0.5b --max-length 2048 --rows 8 --dtype bfloat16 --steps 10 --warmup 3 \
    --out "$OUT/sft_vs_trl.json" 2>&1 | grep -E "^\||model," | tee "$OUT/sft_vs_trl.log"
[ "${SKIP_BENCH:-0}" = 1 ] || python3 benchmarks/sft_throughput.py --out "$OUT/sft_throughput.json" 2>&1 | grep -v Warning | tee "$OUT/sft_throughput.log"
[ "${SKIP_BENCH:-0}" = 1 ] || python3 benchmarks/esft_step.py --device cuda --size small --steps 12 \
    --out "$OUT/esft_step.json" 2>&1 | grep -E "^\||model" | tee "$OUT/esft_step.log"
