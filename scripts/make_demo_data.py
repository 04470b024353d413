#!/usr/bin/env python
"""Write the embedded demo dataset (the UCI handwritten digits) as a user folder."""

import argparse

from vlmflow.cli import run, setup_logging
from vlmflow.demo import write_digits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="folder to write (data.jsonl + images/)")
    p.add_argument("--scale", type=int, default=7, help="upscaling factor of the 8x8 images")
    p.add_argument("--limit", type=int, default=0, help="keep only the first N images (0 = all)")
    a = p.parse_args()
    setup_logging()
    n = write_digits(a.out, scale=a.scale, limit=a.limit or None)
    print(f"wrote {n} digit images and data.jsonl to {a.out}")


if __name__ == "__main__":
    run(main)
