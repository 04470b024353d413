#!/usr/bin/env python
"""Fetch llama.cpp's source (llama-cpp-python's sdist: the GGUF converter, gguf-py and the C++
tools) and the converter's Python requirements into the cache (VLMFLOW_CACHE, else
~/.cache/vlmflow), and write --out naming it. The only GGUF step that needs the internet: a local
rule (the login node under SLURM)."""

import logging

from vlmflow.cli import parser, run, setup_logging
from vlmflow.gguf import GGUFError, fetch_source
from vlmflow.io import write_json

log = logging.getLogger("vlmflow.fetch_llama_cpp")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", required=True, help="JSON naming the fetched source")
    a = p.parse_args()
    setup_logging(a.verbose)
    try:
        info = fetch_source()
    except GGUFError as e:
        raise SystemExit(f"error: {e}") from e
    write_json(a.out, info)
    log.info("llama.cpp source: %s (sha256 %s)", info["sdist"], info["sha256"])


if __name__ == "__main__":
    run(main)
