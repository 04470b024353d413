#!/usr/bin/env python
"""Convert a dataset's sources into canonical conversation Parquet files split train/val/test.

Rows that cannot be used go to rejected.parquet and rejected.tsv with their reason; the run
fails when more than `max_bad_fraction` of the rows are rejected (after writing them).
"""

import logging

from vlmflow.cli import parser, run, setup_logging
from vlmflow.config import resolve_dataset
from vlmflow.data import format_dataset, read_images_table

log = logging.getLogger("vlmflow.format_conversations")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", required=True, help="images.parquet from validate_images")
    p.add_argument("--outdir", required=True, help="folder for train/val/test/rejected.parquet")
    p.add_argument("--rejects-copy", help="also write the rejects table here (e.g. a log file)")
    p.add_argument("--name", default="", help="the dataset's key under `datasets` (for messages)")
    a = p.parse_args()
    setup_logging(a.verbose)
    ds = resolve_dataset(a.config)
    # The workflow trains on the train split and evaluates on the test split: both must have rows.
    summary = format_dataset(
        ds,
        read_images_table(a.images),
        a.outdir,
        rejects_copy=a.rejects_copy,
        name=a.name,
        require=("train", "test"),
    )
    log.info("%s", summary)


if __name__ == "__main__":
    run(main)
