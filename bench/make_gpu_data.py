#!/usr/bin/env python
"""Write a seed-format dataset for the GPU workflow run: N samples, each one side x side image +
a 40-word question + an answer of --answer-words words (the benchmark's shapes)."""

import argparse
import json
from pathlib import Path

import numpy as np
from bench_train import WORDS  # the benchmark's vocabulary (same directory)
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--side", type=int, default=896)
    ap.add_argument("--answer-words", type=int, default=300)
    a = ap.parse_args()
    out = Path(a.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(out / "data.jsonl", "w") as f:
        for i in range(a.n):
            rel = f"images/{i:04d}.jpg"
            img = rng.integers(0, 255, (a.side, a.side, 3), dtype=np.uint8)
            Image.fromarray(img).save(out / rel, quality=90)
            row = {
                "image": rel,
                "instruction": " ".join(rng.choice(WORDS, 40)),
                "response": " ".join(rng.choice(WORDS, a.answer_words)),
            }
            f.write(json.dumps(row) + "\n")
    print(f"wrote {a.n} samples to {out}")


if __name__ == "__main__":
    main()
