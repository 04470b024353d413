#!/usr/bin/env python
"""Convert a dataset's sources into canonical conversation Parquet files split train/val/test.

Rows that cannot be used go to rejected.parquet with their reason; the run fails when more than
`max_bad_fraction` of the rows are rejected.
"""

import logging
from collections import Counter
from pathlib import Path

import pandas as pd

from vlmflow.cli import parser, run, setup_logging
from vlmflow.config import resolve_dataset
from vlmflow.data import (
    SPLITS,
    Source,
    check_bad_fraction,
    dedupe,
    rejected_table,
    seed_to_conversations,
    to_table,
)
from vlmflow.io import write_json, write_parquet

log = logging.getLogger("vlmflow.format_conversations")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", required=True, help="images.parquet from validate_images")
    p.add_argument("--outdir", required=True, help="folder for train/val/test/rejected.parquet")
    a = p.parse_args()
    setup_logging(a.verbose)
    ds = resolve_dataset(a.config)
    imgs = pd.read_parquet(a.images)
    image_map = {(r["root"], r["path"]): r for r in imgs.to_dict("records")}
    accepted, rejected = [], []
    for s in ds["sources"]:
        acc, rej = seed_to_conversations(Source(**s), image_map, ds["split"])
        accepted += acc
        rejected += rej
    accepted = dedupe(accepted, rejected)
    n_in = len(accepted) + len(rejected)
    outdir = Path(a.outdir)
    # Quarantine is written before the threshold check, so a failed run still shows why.
    write_parquet(outdir / "rejected.parquet", rejected_table(rejected))
    check_bad_fraction(n_in, rejected, ds["max_bad_fraction"])
    counts = {}
    for split in SPLITS:
        rows = [r for r in accepted if r["split"] == split]
        counts[split] = len(rows)
        write_parquet(outdir / f"{split}.parquet", to_table(rows))
    summary = {
        "rows_in": n_in,
        "accepted": len(accepted),
        "rejected": len(rejected),
        "splits": counts,
        "rejected_by_reason": dict(Counter(r["reason"].split(":", 1)[0] for r in rejected)),
    }
    write_json(outdir / "summary.json", summary)
    log.info("%s", summary)


if __name__ == "__main__":
    run(main)
