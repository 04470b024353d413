#!/usr/bin/env python
"""Export the trained adapter (export.save_method: lora, merged_16bit or merged_4bit).

merged_16bit streams the LoRA into the original 16-bit base checkpoint, tensor by tensor, and
writes safetensors shards + config + generation config + processor + chat template + a model card.
The merge check (merged logits vs the adapter on the fresh base, on a sample of --train) is
written to --check; the step fails when it exceeds the tolerance.
"""

import json
from pathlib import Path

from vlmflow.cli import parser, run, setup_logging
from vlmflow.config import resolve_sections
from vlmflow.data import read_conversations
from vlmflow.export import export_model
from vlmflow.hub import check_model_source


def read_json(path: str | None) -> dict | None:
    return json.loads(Path(path).read_text()) if path else None


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--adapter", required=True, help="adapter folder written by train")
    p.add_argument("--out", required=True, help="folder to write the exported model to")
    p.add_argument("--check", help="merge_check.json to write")
    p.add_argument("--train", help="train.parquet: the merge check's sample batch comes from it")
    p.add_argument("--data-summary", help="summary.json of the data stage (for the model card)")
    p.add_argument("--metrics", help="metrics.json of an evaluation (for the model card)")
    a = p.parse_args()
    setup_logging(a.verbose)
    cfg = resolve_sections(a.config, ["model", "export"])
    check_model_source(cfg["model"])  # a missing or unusable local model: say so now
    import torch

    torch.set_num_threads(a.threads)
    rows = read_conversations(a.train) if a.train else None
    export_model(
        cfg["model"],
        a.adapter,
        a.out,
        cfg["export"],
        check_rows=rows,
        check_path=a.check,
        data_summary=read_json(a.data_summary),
        metrics=read_json(a.metrics),
    )


if __name__ == "__main__":
    run(main)
