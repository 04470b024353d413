#!/usr/bin/env python
"""Build a tiny random-weight model + processor of one family (offline), for demos and tests."""

import argparse

from vlmflow.cli import run, setup_logging
from vlmflow.families import FAMILIES
from vlmflow.tiny import build_tiny


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--family", required=True, choices=sorted(FAMILIES))
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    setup_logging()
    build_tiny(a.family, a.out, seed=a.seed)
    print(f"saved tiny {a.family} model to {a.out}")


if __name__ == "__main__":
    run(main)
