"""The embedded demo dataset: the UCI handwritten digits (the copy scikit-learn ships, kept in
`vlmflow/data/digits.csv.gz`) written as a user folder (RGB PNG files + data.jsonl in the seed's
format). Nothing is downloaded."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .io import atomic_dir

PROMPT = "Which digit is written in this image?"
DIGITS_CSV = Path(__file__).parent / "data" / "digits.csv.gz"


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) of pixel counts 0-16, digits (1797,)): the arrays
    `sklearn.datasets.load_digits()` returns as `images` and `target`, from the same file."""
    with gzip.open(DIGITS_CSV, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def write_digits(out_dir: str | os.PathLike, scale: int = 7, limit: int | None = None) -> int:
    """Write digits as `images/NNNNN.png` (8·scale px, RGB, dark ink on white) + `data.jsonl`.

    Returns the number of rows written.
    """
    images, digits = load_digits()
    n = len(images) if limit is None else min(limit, len(images))
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "data.jsonl", "w") as f:
            for i in range(n):
                gray = (255 - images[i] * (255 / 16)).clip(0, 255).astype(np.uint8)
                im = Image.fromarray(gray, mode="L").resize((8 * scale, 8 * scale), Image.NEAREST)
                rel = f"images/{i:05d}.png"
                im.convert("RGB").save(tmp / rel)
                row = {"image": rel, "instruction": PROMPT, "response": str(int(digits[i]))}
                f.write(json.dumps(row) + "\n")
    return n


def digits_files(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    return out_dir / "data.jsonl", out_dir / "images"
