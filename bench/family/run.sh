#!/usr/bin/env bash
# On the GPU machine: unpack the package bundles, build each family's model folder once, and time
# each SPEC in its own process (clean peak-memory numbers) with bench/bench_train.py, with a
# timeout per spec. Logs and results go under $OUT (results.jsonl appended after every spec).
#
#   bash run.sh SPEC...        SPEC = FAMILY:IMPL:QUANT[:EXTRA], or a bare FAMILY
#     FAMILY  mllama gemma3 pixtral llava llava_next qwen3_vl qwen2_vl idefics3 qwen3_5 gemma4 mistral3
#             internvl llava_onevision qwen3_vl_moe qwen3_5_moe
#     IMPL    vlmflow | hf | unsloth          QUANT  16bit | 4bit
#     EXTRA   comma-separated arguments of bench_train.py (commas become spaces), and/or
#             timeout=N (this spec's limit in seconds), e.g.
#             mllama:vlmflow:4bit:--gc,offload,--set,model.quantize_vision=true,timeout=120
#     a bare FAMILY is its standard set (suite.py standard_specs): vlmflow and hf in 16bit and
#     4bit with defaults, then unsloth 16bit/4bit where Unsloth supports the family.
# summary.txt: the table (ratios vs hf and unsloth, floor_fraction) and a PASS/FAIL line per
# non-hf row: its first-step loss within 1% of hf's (same family and quant), with the ratio.
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
#   ARGS=""                   extra bench_train.py arguments for every spec (after its
#                             defaults here: --steps 6 --quant of the spec; e.g. "--steps 4")
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

mapfile -t specs < <("$PYTHON" "$here/suite.py" expand "$@")
[ ${#specs[@]} -gt 0 ] || { echo "no specs (see the head of $0)" >&2; exit 2; }
for spec in "${specs[@]}"; do
  IFS=: read -r fam impl quant extra <<< "$spec"
  limit=$SPEC_TIMEOUT; args=""
  for x in ${extra//,/ }; do
    case $x in timeout=*) limit=${x#timeout=} ;; *) args="$args $x" ;; esac
  done
  tag=$(echo "$spec" | tr -c 'A-Za-z0-9_.-' '_' | sed 's/_*$//')
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
  timeout "$limit" "$PYTHON" "$root/bench/bench_train.py" "$(model_dir "$fam")" --impl "$impl" \
    --quant "$quant" --steps 6 --tag "$tag" $ARGS $args --out "$OUT/results.jsonl" > "$OUT/logs/$tag.log" 2>&1
  rc=$?
  echo "== $spec: rc=$rc in $((SECONDS - t)) s$([ $rc -eq 124 ] && echo " (timeout $limit s)")"
  "$PYTHON" "$here/suite.py" line "$OUT/logs/$tag.log" ||
    grep -vE "Warning|warn\(|^\s*$|Loading weights" "$OUT/logs/$tag.log" | tail -12 | cut -c1-300
done

[ -f "$OUT/results.jsonl" ] && "$PYTHON" "$here/suite.py" summary "$OUT/results.jsonl" | tee "$OUT/summary.txt"
echo "== done in ${SECONDS} s; results in $OUT"
