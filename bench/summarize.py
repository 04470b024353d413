#!/usr/bin/env python
"""Table of bench_train.py results: tokens/s, peak memory, losses, and ratios against the HF
baseline of the same quantization measured in the same file (and against the anchor numbers of
../shared/anchor-bench, measured on the same batch on 2026-11-28, for reference).

    python bench/summarize.py bench/results/FILE.jsonl
"""

import json
import sys

# ../shared/anchor-bench/README.md (H200, same batch): tokens/s and peak allocated GiB
ANCHOR = {
    ("hf", "4bit"): (1000, 25.8),
    ("unsloth", "4bit"): (2188, 9.24),
    ("hf", "16bit"): (1083, 29.7),
    ("unsloth", "16bit"): (1995, 19.1),
}
# the issue's floor of the fixed batch (3.2e14 FLOP at ~790 TFLOP/s, 5544 tokens), for results
# without bench/flops.py's `floor_fraction` (which puts it at 2.93e14)
FLOOR_TOKENS_PER_S = 13_800


def main(path: str) -> None:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]

    def case(r):
        return r.get("case", "fixed")

    # baseline: the HF run of the same quantization and case (realistic: the ungrouped one)
    base = {
        (r["quant"], case(r)): r for r in rows if r["impl"] == "hf" and not r.get("group_by_length")
    }
    head = (
        f"{'impl':8} {'quant':5} {'gc':7} {'tag':14} {'tok/s':>7} {'GiB':>6} {'loss0':>8} "
        f"{'lossN':>8} {'xHF':>5} {'xHFmem':>6} {'xAnc':>5} {'xAncMem':>7} {'floor':>5}"
    )
    print(head)
    for r in rows:
        b = base.get((r["quant"], case(r)))
        # the anchor numbers and the issue's floor are for the fixed batch only
        fixed = case(r) == "fixed"
        anc = ANCHOR[("hf", r["quant"])] if fixed else (float("nan"), float("nan"))
        tps, mem = r["tokens_per_s"], r["peak_alloc_gib"] or float("nan")
        floor = r.get("floor_fraction") or (tps / FLOOR_TOKENS_PER_S if fixed else float("nan"))
        sp = tps / b["tokens_per_s"] if b else float("nan")
        mm = mem / b["peak_alloc_gib"] if b and b["peak_alloc_gib"] else float("nan")
        print(
            f"{r['impl']:8} {r['quant']:5} {str(r.get('gc', '')):7} {r.get('tag', '')[:14]:14} "
            f"{tps:7.0f} {mem:6.2f} {r['loss_first']:8.4f} {r['loss_last']:8.4f} {sp:5.2f} "
            f"{mm:6.2f} {tps / anc[0]:5.2f} {mem / anc[1]:7.2f} {floor:5.2f}"
        )


if __name__ == "__main__":
    main(sys.argv[1])
