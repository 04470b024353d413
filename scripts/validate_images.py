#!/usr/bin/env python
"""Validate every image a dataset references; write one row per image to images.parquet and the
rejected images to a tab-separated table.

Embedded images are written once to the dataset's blob store and URLs downloaded into it (both
under --cache-dir); verdicts are cached there too, so that a re-run decodes only new or changed
files.
"""

import logging
from collections import Counter
from pathlib import Path

import pyarrow as pa

from vlmflow.cli import parser, run, setup_logging
from vlmflow.config import resolve_dataset
from vlmflow.data import validate_dataset
from vlmflow.image_validation import IMAGE_COLUMNS, IMAGES_SCHEMA
from vlmflow.io import atomic_file, write_parquet

log = logging.getLogger("vlmflow.validate_images")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", required=True, help="images.parquet to write")
    p.add_argument("--rejected", help="tab-separated table of the rejected images to write")
    p.add_argument(
        "--cache-dir", help="blob store and validation cache (default: cache/ beside --out)"
    )
    p.add_argument("--name", default="", help="dataset name (names its validation cache file)")
    a = p.parse_args()
    setup_logging(a.verbose)
    ds = resolve_dataset(a.config)
    cache = Path(a.cache_dir) if a.cache_dir else Path(a.out).parent / "cache"
    records = validate_dataset(ds, cache, name=a.name, threads=a.threads)
    table = pa.Table.from_pylist([{k: r[k] for k in IMAGE_COLUMNS} for r in records], IMAGES_SCHEMA)
    write_parquet(a.out, table)
    bad = [r for r in records if not r["ok"]]
    if a.rejected:
        with atomic_file(a.rejected) as tmp:
            lines = ["kind\tpath\tresolved\treason"]
            lines += [
                "\t".join(
                    str(r[k]).replace("\t", " ") for k in ("kind", "path", "resolved", "reason")
                )
                for r in bad
            ]
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    by_reason = Counter(r["reason"].split(":", 1)[0] for r in bad)
    converted = sum(1 for r in records if r["status"] == "converted")
    log.info(
        "%d images: %d ok (%d normalised by load_rgb), %d rejected %s",
        len(records),
        len(records) - len(bad),
        converted,
        len(bad),
        dict(by_reason.most_common()),
    )


if __name__ == "__main__":
    run(main)
