#!/usr/bin/env python
"""Count every sample's tokens with the run's model processor (image tokens after resizing
included); write the run's train/val/test Parquet without the samples over max_seq_length, the
token-length distribution (Parquet, table, PNG histogram) and the dropped samples with reasons.
"""

import logging
import os

from vlmflow.cli import parser, run, setup_logging
from vlmflow.config import resolve_sections
from vlmflow.hub import check_model_source

log = logging.getLogger("vlmflow.token_budget")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="folder with the dataset's split Parquet files")
    p.add_argument("--images", help="images.parquet (image sizes); else images are opened")
    p.add_argument("--outdir", required=True, help="folder for the run's data files")
    p.add_argument("--max-bad-fraction", type=float, default=1.0)
    p.add_argument("--rejects-copy", help="also write the rejects table here (e.g. a log file)")
    a = p.parse_args()
    setup_logging(a.verbose)
    cfg = resolve_sections(a.config, ["model"])
    check_model_source(cfg["model"])  # a missing or unusable local model: say so now
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    from vlmflow.budget import token_budget

    summary = token_budget(
        cfg["model"],
        a.data,
        a.images,
        a.outdir,
        max_bad_fraction=a.max_bad_fraction,
        rejects_copy=a.rejects_copy,
    )
    log.info("%s", summary)


if __name__ == "__main__":
    run(main)
