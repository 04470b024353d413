#!/usr/bin/env bash
# On the GPU machine: unpack the package bundle, build the 7B model once, time each variant in
# its own process (clean peak-memory numbers), print a table of ratios.
# Usage: bench/run_gpu.sh OUTDIR "VARIANT" ...
#   VARIANT = arguments of bench/bench_train.py after the model, e.g.
#     "--impl hf --quant 16bit"
#     "--impl vlmflow --quant 4bit --gc offload --set model.quantize_vision=true --tag q"
# Env: STEPS (8), WARMUP (3), MODEL_DIR (/tmp/qwen7b), BUNDLE (.site/bench.tgz),
#      PROFILE=1 writes OUTDIR/profile.txt for every vlmflow variant,
#      VARIANT_TIMEOUT (400) seconds per variant (a killed variant records nothing).
set -uo pipefail
out=${1:?usage: run_gpu.sh OUTDIR VARIANT...}; shift
mkdir -p "$out"
bundle=${BUNDLE:-.site/bench.tgz}
if [ -f "$bundle" ] && [ ! -d /tmp/site ]; then tar xzf "$bundle" -C /tmp; fi
export PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
model=${MODEL_DIR:-/tmp/qwen7b}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers, peft, bitsandbytes; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "bnb", bitsandbytes.__version__)'
if [ ! -f "$model/config.json" ]; then
  t=$(date +%s); python3 bench/make_model.py "$model" --size 7b 2>&1 | tail -1; echo "built in $(( $(date +%s) - t )) s"
fi
for variant in "$@"; do
  echo "=== $variant"
  prof=()
  if [ -n "${PROFILE:-}" ] && [[ "$variant" == *vlmflow* ]]; then prof=(--profile "$out/profile.txt"); fi
  t=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${VARIANT_TIMEOUT:-400}" python3 bench/bench_train.py "$model" $variant --steps "${STEPS:-8}" --warmup "${WARMUP:-3}" \
    --out "$out/results.jsonl" "${prof[@]}" 2>&1 \
    | grep -vE "Warning|warn\(|Loading weights|^\s*$|RESULT" | tail -25
  echo "  ($(( $(date +%s) - t )) s)"
done
python3 bench/summarize.py "$out/results.jsonl"
