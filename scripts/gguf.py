#!/usr/bin/env python
"""GGUF export for llama.cpp / Ollama, and its serve check.

gguf.py convert      --merged DIR --source STAMP --out DIR
    the merged 16-bit model converted by llama.cpp's own convert_hf_to_gguf.py (export.save_method
    gguf, gguf_q8_0, gguf_q4_k_m): the language model, the vision projector (mmproj) and an
    Ollama Modelfile in --out.
gguf.py serve-check  --merged DIR --source STAMP --gguf DIR --train PARQUET --out JSON
    the GGUF served by llama.cpp's llama-mtmd-cli answers the merge check's sample prompts as the
    merged model does in transformers (greedy); the result is written to --out.
"""

import json
import logging
from pathlib import Path

from vlmflow.cli import parser, run, setup_logging
from vlmflow.config import resolve_sections
from vlmflow.gguf import export_gguf

log = logging.getLogger("vlmflow.gguf")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("what", choices=["convert", "serve-check"])
    p.add_argument("--merged", required=True, help="merged model folder written by merge")
    p.add_argument("--source", required=True, help="JSON of rule llama_cpp_source")
    p.add_argument("--out", required=True, help="convert: GGUF folder; serve-check: JSON")
    p.add_argument("--gguf", help="serve-check: the GGUF folder")
    p.add_argument("--train", help="serve-check: train.parquet (the merge check's samples)")
    a = p.parse_args()
    setup_logging(a.verbose)
    root = Path(json.loads(Path(a.source).read_text())["root"])
    if a.what == "convert":
        cfg = resolve_sections(a.config, ["export"])["export"]
        export_gguf(
            a.merged,
            a.out,
            cfg["save_method"],
            pretokenizer=cfg["gguf_pretokenizer"],
            root=root,
            threads=a.threads,
        )
        return
    serve_check(a, root)


def serve_check(a, root: Path) -> None:
    import torch

    from vlmflow.data import read_conversations
    from vlmflow.io import write_json
    from vlmflow.serve_check import ServeCheckError, serve_check_gguf

    cfg = resolve_sections(a.config, ["model", "export"])
    torch.set_num_threads(a.threads)
    rows = read_conversations(a.train)
    try:
        result = serve_check_gguf(
            a.merged, a.gguf, rows, cfg["export"], cfg["model"], root=root, threads=a.threads
        )
    except ServeCheckError as e:
        if hasattr(e, "result"):
            log.error("serve check result:\n%s", json.dumps(e.result, indent=2))
        raise
    write_json(a.out, result)


if __name__ == "__main__":
    run(main)
