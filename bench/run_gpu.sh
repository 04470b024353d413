#!/usr/bin/env bash
# On the GPU machine: unpack the package bundle, build the 7B model once, time each variant in
# its own process (clean peak-memory numbers). Usage: bench/run_gpu.sh OUTDIR SPEC...
#   SPEC = impl:quant[:gc]   e.g. hf:16bit vlmflow:4bit vlmflow:16bit:offload
# Env: STEPS (8), WARMUP (3), MODEL_DIR (/tmp/qwen7b).
set -uo pipefail
out=${1:?usage: run_gpu.sh OUTDIR SPEC...}; shift
mkdir -p "$out"
if [ -f .site/site.tgz ] && [ ! -d /tmp/site ]; then tar xzf .site/site.tgz -C /tmp; fi
export PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
model=${MODEL_DIR:-/tmp/qwen7b}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers, peft, bitsandbytes; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "bnb", bitsandbytes.__version__)'
if [ ! -f "$model/config.json" ]; then
  t=$(date +%s); python3 bench/make_model.py "$model" --size 7b 2>&1 | tail -1; echo "built in $(( $(date +%s) - t )) s"
fi
for spec in "$@"; do
  IFS=: read -r impl quant gc <<<"$spec"
  echo "=== $spec"
  python3 bench/bench_train.py "$model" --impl "$impl" --quant "$quant" --gc "${gc:-true}" \
    --steps "${STEPS:-8}" --warmup "${WARMUP:-3}" --out "$out/results.jsonl" 2>&1 \
    | grep -vE "Warning|warn\(|Loading weights|^\s*$" | tail -4
done
python3 - "$out/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
base = {r["quant"]: r for r in rows if r["impl"] == "hf"}
print(f"{'impl':8} {'quant':6} {'gc':8} {'tok/s':>8} {'peakGiB':>8} {'loss0':>8} {'lossN':>8} {'x speed':>8} {'x mem':>6}")
for r in rows:
    b = base.get(r["quant"])
    sp = r["tokens_per_s"] / b["tokens_per_s"] if b else float("nan")
    mem = r["peak_alloc_gib"] / b["peak_alloc_gib"] if b and b["peak_alloc_gib"] else float("nan")
    print(f"{r['impl']:8} {r['quant']:6} {r['gc']:8} {r['tokens_per_s']:8.0f} {r['peak_alloc_gib'] or 0:8.2f} {r['loss_first']:8.4f} {r['loss_last']:8.4f} {sp:8.2f} {mem:6.2f}")
PY
