#!/usr/bin/env bash
# On the GPU machine: unpack the package bundles, build each family's model folder once, and time
# each SPEC in its own process (clean peak-memory numbers), with a timeout per spec. Logs and
# results go under $OUT. See README.md for the copy step that puts this next to vlmflow's code.
#
#   bash run.sh SPEC...        SPEC = FAMILY:IMPL:QUANT[:EXTRA]
#     FAMILY  mllama gemma3 pixtral llava llava_next qwen3_vl qwen2_vl idefics3 qwen3_5 gemma4 mistral3
#             qwen3_vl_moe qwen3_5_moe
#     IMPL    vlmflow | hf | unsloth          QUANT  16bit | 4bit
#     EXTRA   comma-separated arguments of time_family.py (commas become spaces), and/or
#             timeout=N (this spec's limit in seconds), e.g.
#             mllama:vlmflow:4bit:--gc,offload,--set,model.quantize_vision=true,timeout=120
#
# Environment (defaults):
#   OUT=/tmp/out              logs/, results.jsonl, summary.txt, build logs
#   MODELS=/tmp/fam-models    model folders, one per family and depth (reused when present)
#   SCALE=real                real | tiny (tiny: CPU-sized widths, same processors)
#   DEPTH=recommended         recommended | full (make_family.py's CHECKPOINTS)
#   BUNDLES=<here>/bundle     every *.tgz in it is unpacked once into SITE_ROOT=/tmp (each holds
#                             site/: SITE_ROOT/site goes on PYTHONPATH after vlmflow's src/)
#   SPEC_TIMEOUT=90           seconds per spec (a killed spec records no RESULT)
#   DEADLINE=0                if > 0: seconds since the start by which every spec must end (for a
#                             600 s device call): a spec's timeout is cut to the time left, and
#   MIN_SPEC=30               a spec is not started with less than MIN_SPEC seconds left
#   ARGS=""                   extra time_family.py arguments for every spec (e.g. "--steps 4")
#   PYTHON=python3
#   VLMFLOW_ROOT=<found>      the folder holding vlmflow's src/, bench/, config/ (its checkout or
#                             the copy of README.md); default: here, or a parent of here
set -u
here=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/out}
MODELS=${MODELS:-/tmp/fam-models}
SCALE=${SCALE:-real}
DEPTH=${DEPTH:-recommended}
BUNDLES=${BUNDLES:-$here/bundle}
SPEC_TIMEOUT=${SPEC_TIMEOUT:-90}
DEADLINE=${DEADLINE:-0}
MIN_SPEC=${MIN_SPEC:-30}
ARGS=${ARGS:-}
PYTHON=${PYTHON:-python3}
SITE_ROOT=${SITE_ROOT:-/tmp}
mkdir -p "$OUT/logs" "$MODELS" && OUT=$(cd "$OUT" && pwd) && MODELS=$(cd "$MODELS" && pwd) || exit 2
[ -d "$BUNDLES" ] && BUNDLES=$(cd "$BUNDLES" && pwd)
SECONDS=0

root=${VLMFLOW_ROOT:-}
if [ -z "$root" ]; then
  for r in "$here" "$here/.." "$here/../.."; do
    [ -f "$r/src/vlmflow/families.py" ] && { root=$(cd "$r" && pwd); break; }
  done
fi
[ -n "$root" ] && [ -f "$root/src/vlmflow/families.py" ] || {
  echo "vlmflow's src/ not found beside $here: set VLMFLOW_ROOT (see README.md)" >&2; exit 2; }

if [ -d "$BUNDLES" ]; then
  mkdir -p "$SITE_ROOT"
  for b in "$BUNDLES"/*.tgz; do
    [ -f "$b" ] || continue
    stamp=$SITE_ROOT/.unpacked-$(basename "$b")-$(stat -c %s "$b")
    [ -f "$stamp" ] || { tar xzf "$b" -C "$SITE_ROOT" && touch "$stamp"; } || exit 2
  done
fi
site=""; [ -d "$SITE_ROOT/site" ] && site=$SITE_ROOT/site
export PYTHONPATH=$root/src${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}
export VLMFLOW_ROOT=$root HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Unsloth writes its compiled-module cache into the working directory
work=/tmp/fam-cwd; mkdir -p "$work"; cd "$work" || exit 2

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" - <<'EOF'
import importlib.metadata as md
out = []
for m in ("torch", "transformers", "peft", "bitsandbytes", "jsonschema", "unsloth", "unsloth_zoo"):
    try:
        out.append(f"{m} {md.version(m)}")
    except md.PackageNotFoundError:
        out.append(f"{m} MISSING")
print(", ".join(out))
EOF

model_dir() { echo "$MODELS/$1-$SCALE-$DEPTH"; }

ensure_model() {  # build the family's folder once
  local fam=$1 dir; dir=$(model_dir "$fam")
  [ -f "$dir/config.json" ] && return 0
  local flags="--scale $SCALE"; [ "$DEPTH" = recommended ] && flags="$flags --recommended"
  local t=$SECONDS
  # shellcheck disable=SC2086
  "$PYTHON" "$here/make_family.py" "$fam" "$dir" $flags > "$OUT/build_$fam.log" 2>&1
  local rc=$?
  echo "== build $fam: rc=$rc in $((SECONDS - t)) s; $(grep -E '^saved|Error|error' "$OUT/build_$fam.log" | tail -2)"
  [ $rc -eq 0 ]
}

for spec in "$@"; do
  IFS=: read -r fam impl quant extra <<< "$spec"
  limit=$SPEC_TIMEOUT; args=""
  for x in ${extra//,/ }; do
    case $x in timeout=*) limit=${x#timeout=} ;; *) args="$args $x" ;; esac
  done
  tag=$(echo "$spec" | tr -c 'A-Za-z0-9_.=-' '_' | sed 's/_*$//')
  if [ "$DEADLINE" -gt 0 ] && [ $((DEADLINE - SECONDS)) -lt "$MIN_SPEC" ]; then
    echo "== $spec: skipped (${SECONDS} s of DEADLINE=$DEADLINE s used)"; continue
  fi
  ensure_model "$fam" || { echo "== $spec: no model folder (see $OUT/build_$fam.log)"; continue; }
  if [ "$DEADLINE" -gt 0 ]; then  # end before the deadline, so that the summary is written
    left=$((DEADLINE - SECONDS))
    [ "$left" -lt "$MIN_SPEC" ] && { echo "== $spec: skipped (${SECONDS} s of DEADLINE=$DEADLINE s used)"; continue; }
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  t=$SECONDS
  # shellcheck disable=SC2086
  timeout "$limit" "$PYTHON" "$here/time_family.py" "$(model_dir "$fam")" --impl "$impl" --quant "$quant" \
    --tag "$tag" $ARGS $args --out "$OUT/results.jsonl" > "$OUT/logs/$tag.log" 2>&1
  rc=$?
  echo "== $spec: rc=$rc in $((SECONDS - t)) s$([ $rc -eq 124 ] && echo " (timeout $limit s)")"
  if grep -q '^RESULT' "$OUT/logs/$tag.log"; then
    grep '^RESULT' "$OUT/logs/$tag.log" | "$PYTHON" -c '
import json, sys
r = json.loads(sys.stdin.read()[7:])
print("   %(tokens_per_s)s tok/s, %(step_s_median)s s/step, peak %(peak_alloc_gib)s GiB, loss %(loss_first)s -> %(loss_last)s, trainable %(trainable_params)s, batch %(batch_sha)s, load %(load_s)s s" % r)'
  else
    grep -vE "Warning|warn\(|^\s*$|Loading weights" "$OUT/logs/$tag.log" | tail -12 | cut -c1-300
  fi
done

[ -f "$OUT/results.jsonl" ] && "$PYTHON" - "$OUT/results.jsonl" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
first = {}
for r in rows:  # the first result of each (family, quant, impl) is the reference
    first.setdefault((r["family"], r["quant"], r["impl"]), r)


def ratio(r, impl, key):
    b = first.get((r["family"], r["quant"], impl))
    if not b or not r[key] or not b[key]:
        return ""
    return f"{r[key] / b[key]:.2f}"


print("| family | impl | quant | tag | tokens/s | s/step | peak GiB | x hf speed | x hf mem "
      "| x unsloth speed | x unsloth mem | trainable | loss first -> last | batch |")
print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
for r in rows:
    print(f"| {r['family']} | {r['impl']} | {r['quant']} | {r['tag']} | {r['tokens_per_s']} | "
          f"{r['step_s_median']} | {r['peak_alloc_gib']} | {ratio(r, 'hf', 'tokens_per_s')} | "
          f"{ratio(r, 'hf', 'peak_alloc_gib')} | {ratio(r, 'unsloth', 'tokens_per_s')} | "
          f"{ratio(r, 'unsloth', 'peak_alloc_gib')} | {r['trainable_params']} | "
          f"{r['loss_first']} -> {r['loss_last']} | {r['batch_sha']} |")
EOF
echo "== done in ${SECONDS} s; results in $OUT"
