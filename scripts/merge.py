#!/usr/bin/env python
"""Merge a LoRA adapter into the 16-bit base model; write safetensors + processor + model card."""

from vlmflow.cli import parser, run, setup_logging
from vlmflow.config import resolve_sections
from vlmflow.merge import merge_adapter


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    setup_logging(a.verbose)
    cfg = resolve_sections(a.config, ["model", "export"])
    merge_adapter(cfg["model"], a.adapter, a.out, cfg["export"])


if __name__ == "__main__":
    run(main)
