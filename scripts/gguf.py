#!/usr/bin/env python
"""Convert the merged 16-bit model to GGUF for llama.cpp / Ollama (export.save_method gguf,
gguf_q8_0, gguf_q4_k_m) with llama.cpp's own convert_hf_to_gguf.py: the language model, the
vision projector (mmproj) and an Ollama Modelfile in --out.
"""

from vlmflow.cli import parser, run, setup_logging
from vlmflow.config import resolve_sections
from vlmflow.gguf import export_gguf


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--merged", required=True, help="merged model folder written by merge")
    p.add_argument("--out", required=True, help="folder to write the GGUF files to")
    a = p.parse_args()
    setup_logging(a.verbose)
    cfg = resolve_sections(a.config, ["export"])["export"]
    export_gguf(a.merged, a.out, cfg["save_method"], pretokenizer=cfg["gguf_pretokenizer"])


if __name__ == "__main__":
    run(main)
