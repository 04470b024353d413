#!/usr/bin/env python
"""Publish-ready folders of the adapter and the merged model, with final model cards.

Writes --out/adapter and --out/merged (hard links of the exported files where possible, cleaned
for serving) and a README.md in each made with huggingface_hub.ModelCard: license and base model
id from the base's card, the dataset, the test metrics as model-index, the training settings.
Nothing is uploaded (see README, "Deploying").
"""

import json
from pathlib import Path

from vlmflow.cli import parser, run, setup_logging
from vlmflow.config import resolve_sections
from vlmflow.publish import publish


def read_json(path: str | None) -> dict | None:
    return json.loads(Path(path).read_text()) if path else None


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--adapter", required=True, help="adapter folder written by train")
    p.add_argument("--merged", help="merged model folder written by merge")
    p.add_argument("--merge-check", help="merge_check.json of the merge")
    p.add_argument("--metrics", help="eval/metrics.json")
    p.add_argument("--data-summary", help="summary.json of the data stage")
    p.add_argument("--out", required=True, help="folder to write adapter/ and merged/ into")
    a = p.parse_args()
    setup_logging(a.verbose)
    cfg = resolve_sections(a.config, ["run", "model", "export"])
    publish(
        model_cfg=cfg["model"],
        export_cfg=cfg["export"],
        adapter_dir=a.adapter,
        merged_dir=a.merged,
        out_dir=a.out,
        run=cfg["run"]["name"],
        dataset=cfg["run"]["dataset"],
        metrics=read_json(a.metrics),
        merge_check=read_json(a.merge_check),
        data_summary=read_json(a.data_summary),
    )


if __name__ == "__main__":
    run(main)
