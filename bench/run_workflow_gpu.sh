#!/usr/bin/env bash
# On the GPU machine: the workflow (validate_images -> format_conversations -> token_budget ->
# train) through snakemake on the real-size Qwen2.5-VL-7B (bench/gpu_workflow.yaml), then the
# same run with packing (bench/gpu_workflow_packed.yaml). Needs the package bundle .site/site.tgz
# (snakemake, bitsandbytes, jsonschema, pyarrow...). Usage: bench/run_workflow_gpu.sh OUTDIR
set -uo pipefail
out=${1:?usage: run_workflow_gpu.sh OUTDIR}
mkdir -p "$out"
[ -d /tmp/site ] || tar xzf .site/site.tgz -C /tmp
# snakemake's shell commands call `python`: a wrapper (not a symlink: the venv must resolve)
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" >/tmp/bin/python
chmod +x /tmp/bin/python
export PATH=/tmp/bin:$PATH PYTHONPATH=$PWD/src:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
[ -f /tmp/qwen7b/config.json ] || python3 bench/make_model.py /tmp/qwen7b --size 7b 2>&1 | tail -1
python3 bench/make_gpu_data.py /tmp/gpudata 2>&1 | tail -1
for run in gpu7b gpu7b-packed; do
  extra=""; [ "$run" = gpu7b-packed ] && extra=bench/gpu_workflow_packed.yaml
  t=$(date +%s)
  python3 -m snakemake "results/runs/$run/adapter" --cores 8 --scheduler greedy \
    --configfile bench/gpu_workflow.yaml $extra >"$out/snakemake-$run.log" 2>&1
  echo "== $run: snakemake rc=$? in $(( $(date +%s) - t )) s"
  cp "results/runs/$run/adapter/train_log.jsonl" "$out/train_log-$run.jsonl" 2>/dev/null
  for f in logs/train/"$run"*; do [ -f "$f" ] && cp "$f" "$out/train-$run.log"; done
  grep -E "step [0-9]+/|compile|packing|LoRA|host memory|Error|error" "$out/train-$run.log" 2>/dev/null | tail -8
done
