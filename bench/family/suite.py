#!/usr/bin/env python
"""run.sh's helpers: the standard spec set of a family, the one-line digest of a RESULT, and
summary.txt (ratios vs HF and Unsloth, floor_fraction, the first-step loss check).

    python suite.py expand gemma3 llava:hf:4bit   # one spec a line; a bare FAMILY = STANDARD
    python suite.py line LOG                      # digest of the RESULT line of a spec's log
    python suite.py summary results.jsonl         # the table and the loss check
"""

from __future__ import annotations

import json
import sys

# Families Unsloth 2026.10.9's FastVisionModel supports (its 2026 gap: Qwen3.5, Gemma 4,
# Mistral 3, Idefics3 are not listed)
UNSLOTH_FAMILIES = (
    "mllama",
    "gemma3",
    "pixtral",
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
)
UNSLOTH_TIMEOUT = 230  # Unsloth compiles every decoder layer first: 100-150 s at reduced depth
LOSS_TOLERANCE = 0.01  # first-step loss within 1% of HF's


def standard_specs(family: str) -> list[str]:
    """vlmflow and HF in 16 and 4 bit with defaults, then Unsloth where it supports the family
    (last: the slowest, so that a DEADLINE cuts it first)."""
    specs = [f"{family}:{impl}:{q}" for q in ("16bit", "4bit") for impl in ("vlmflow", "hf")]
    if family in UNSLOTH_FAMILIES:
        specs += [f"{family}:unsloth:{q}:timeout={UNSLOTH_TIMEOUT}" for q in ("16bit", "4bit")]
    return specs


def expand(args: list[str]) -> list[str]:
    """Specs as given; a bare FAMILY (no `:`) becomes its standard set."""
    out = []
    for arg in args:
        out += [arg] if ":" in arg else standard_specs(arg)
    return out


def result_of(log_text: str) -> dict | None:
    lines = [x for x in log_text.splitlines() if x.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else None


def digest(r: dict) -> str:
    return (
        f"   {r['tokens_per_s']} tok/s, {r['step_s_median']} s/step, peak {r['peak_alloc_gib']} "
        f"GiB, floor {r.get('floor_fraction')}, loss {r['loss_first']} -> {r['loss_last']}, "
        f"trainable {r['trainable_params']}, batch {r['batch_sha']}, load {r['load_s']} s"
    )


def loss_check(rows: list[dict], tolerance: float = LOSS_TOLERANCE) -> list[str]:
    """PASS/FAIL of every non-HF row's first-step loss against the first HF row of the same
    family and quantization (|ratio - 1| <= tolerance)."""
    hf = {}
    for r in rows:
        if r["impl"] == "hf":
            hf.setdefault((r["family"], r["quant"]), r)
    out = []
    for r in rows:
        if r["impl"] == "hf":
            continue
        name = f"{r['family']} {r['quant']} {r['impl']} {r['tag']}".rstrip()
        ref = hf.get((r["family"], r["quant"]))
        if ref is None or not ref["loss_first"]:
            out.append(f"loss check {name}: n/a (no hf row of the same family and quant)")
            continue
        ratio = r["loss_first"] / ref["loss_first"]
        verdict = "PASS" if abs(ratio - 1) <= tolerance else "FAIL"
        out.append(
            f"loss check {name}: {verdict} first-step loss {r['loss_first']} / hf "
            f"{ref['loss_first']} = {ratio:.4f}"
        )
    return out


def summary(rows: list[dict]) -> str:
    first = {}
    for r in rows:  # the first result of each (family, quant, impl) is the reference
        first.setdefault((r["family"], r["quant"], r["impl"]), r)

    def ratio(r, impl, key):
        b = first.get((r["family"], r["quant"], impl))
        if not b or not r.get(key) or not b.get(key):
            return ""
        return f"{r[key] / b[key]:.2f}"

    lines = [
        "| family | impl | quant | tag | tokens/s | s/step | peak GiB | x hf speed | x hf mem "
        "| x unsloth speed | x unsloth mem | floor fraction | trainable | loss first -> last "
        "| batch |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['impl']} | {r['quant']} | {r['tag']} | {r['tokens_per_s']} | "
            f"{r['step_s_median']} | {r['peak_alloc_gib']} | {ratio(r, 'hf', 'tokens_per_s')} | "
            f"{ratio(r, 'hf', 'peak_alloc_gib')} | {ratio(r, 'unsloth', 'tokens_per_s')} | "
            f"{ratio(r, 'unsloth', 'peak_alloc_gib')} | {r.get('floor_fraction')} | "
            f"{r['trainable_params']} | {r['loss_first']} -> {r['loss_last']} | "
            f"{r['batch_sha']} |"
        )
    return "\n".join([*lines, "", *loss_check(rows)])


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("expand", "line", "summary"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "expand":
        print("\n".join(expand(args)))
    elif cmd == "line":
        with open(args[0]) as f:
            r = result_of(f.read())
        if r is None:
            return 1
        print(digest(r))
    else:
        with open(args[0]) as f:
            print(summary([json.loads(x) for x in f if x.strip()]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
