#!/usr/bin/env bash
# GPU checks on one CUDA machine: the `gpu` tests (flash varlen, precisions, torchao FP8, Liger,
# compile, a CLI fit, FSDP2 and DeepSpeed ZeRO-2/3 on one GPU), then the throughput suite at the
# anchor setup side by side with TRL (benchmarks/README.md, "esft bench"). torchao, liger-kernel,
# trl and deepspeed are optional: their tests and rows skip without them. Writes logs, JSON and
# Markdown to $OUT (default /tmp/esft-gpu).
#   bash benchmarks/gpu_checks.sh           # SKIP_BENCH=1: tests only; SKIP_TESTS=1: suite only
# The precision checks (bf16 vs fp32 loss curves, torchao FP8 on a 1B shape) are
# benchmarks/gpu_precision.sh.
set -uo pipefail
OUT=${OUT:-/tmp/esft-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -W ignore::DeprecationWarning --tb=short > "$OUT/gpu_tests.log" 2>&1
  grep -E "^E |Error|passed|failed" "$OUT/gpu_tests.log" | head -40
  echo "tests: $(( $(date +%s) - start )) s"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  # the throughput issue's anchor: Qwen2-0.5B shape (151,936 vocabulary), bf16 weights, 4096 lognormal
  # documents, 8 x 2048 tokens per optimizer step on every row; TRL packed and padded in the same run
  bench_start=$(date +%s)
  python3 -m esft.cli bench --device cuda --shape 0.5b --data lognormal --docs 4096 --max-length 2048 --rows 8 \
      --steps 10 --warmup 3 --layout flat rows --compile off on --trl-padded-batch 16 --out "$OUT/bench_0.5b" \
      2> "$OUT/bench_0.5b.log"
  echo "suite: $(( $(date +%s) - bench_start )) s"
fi
echo "total: $(( $(date +%s) - start )) s"
[ "${SKIP_BENCH:-0}" = 1 ] || python3 benchmarks/distill_throughput.py --out "$OUT/distill_throughput.json" 2>&1 | grep -v Warning | tee "$OUT/distill_throughput.log"
python3 -m pytest -m gpu tests/test_distill.py -q -p no:cacheprovider -W ignore::DeprecationWarning --tb=short > "$OUT/distill_gpu_tests.log" 2>&1
grep -E "^E |Error|passed|failed" "$OUT/distill_gpu_tests.log" | head -20
# optimizers: the 8-bit AdamW test (skips without bitsandbytes) and state memory / step time per optimizer
python3 -m pytest -m gpu tests/test_optim.py -q -p no:cacheprovider -W ignore::DeprecationWarning --tb=short > "$OUT/gpu_tests_optim.log" 2>&1
grep -E "^E |Error|passed|failed|skipped" "$OUT/gpu_tests_optim.log" | head -10
[ "${SKIP_BENCH:-0}" = 1 ] || python3 benchmarks/optimizer_step.py --device cuda --model-size 0.5b --dtype bfloat16 \
    --optimizers adamw muon adafactor lion adamw8bit --out "$OUT/optimizer_step.json" 2>&1 | grep -E "^\||model|skipped" | tee "$OUT/optimizer_step.log"
# GRPO rollout / update tokens/s beside TRL's GRPOTrainer (0.5B-shaped model, bf16)
[ "${SKIP_BENCH:-0}" = 1 ] || ! python3 -c "import trl" 2>/dev/null || python3 benchmarks/grpo_vs_trl.py --device cuda \
    --model-size 0.5b --dtype bfloat16 --prompts 32 --max-completion-length 256 --steps 6 --warmup 2 \
    --out "$OUT/grpo_vs_trl.json" 2>&1 | grep -E "setup|tokens_per_s" | tee "$OUT/grpo_vs_trl.log"
[ "${SKIP_BENCH:-0}" = 1 ] || python3 benchmarks/esft_step.py --device cuda --size small --steps 12 \
    --out "$OUT/esft_step.json" 2>&1 | grep -E "^\||model" | tee "$OUT/esft_step.log"
