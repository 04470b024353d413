#!/usr/bin/env python
"""Validate every image a dataset references; write one row per image to images.parquet."""

import logging
from collections import Counter

import pandas as pd

from vlmflow.cli import parser, run, setup_logging
from vlmflow.config import resolve_dataset
from vlmflow.data import Source, seed_image_refs
from vlmflow.images import IMAGE_COLUMNS, ImagePolicy, validate_images
from vlmflow.io import write_parquet

log = logging.getLogger("vlmflow.validate_images")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", required=True, help="images.parquet to write")
    a = p.parse_args()
    setup_logging(a.verbose)
    ds = resolve_dataset(a.config)
    policy = ImagePolicy(
        allowed_formats=tuple(ds["images"]["allowed_formats"]),
        max_pixels=ds["images"]["max_pixels"],
        min_side=ds["images"]["min_side"],
    )
    refs = []
    for s in ds["sources"]:
        refs += seed_image_refs(Source(**s))
    records = validate_images(refs, policy, threads=a.threads)
    df = pd.DataFrame(records, columns=IMAGE_COLUMNS)
    write_parquet(a.out, df)
    bad = Counter(r["reason"].split(":", 1)[0] for r in records if not r["ok"])
    log.info(
        "%d images: %d ok, %d bad %s",
        len(records),
        len(records) - sum(bad.values()),
        sum(bad.values()),
        dict(bad),
    )


if __name__ == "__main__":
    run(main)
