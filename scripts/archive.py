#!/usr/bin/env python
"""Write a run's reproducibility archive (.tar.gz): resolved config and seeds, data manifest
(sha256 of every image, source and Parquet file), requirements.lock + pip freeze, git commit +
diff of uncommitted changes, hardware/CUDA info, logs, the adapter with its per-step training
log, the merge check and model card, metrics and predictions, and REPRODUCE.md. The base weights
are not archived: their id and revision (hub commit or file hashes) are.

--config takes the whole resolved configuration (Snakemake passes it).
"""

import logging

from vlmflow.archive import DATA_SPLITS, build_archive
from vlmflow.cli import parser, run, setup_logging
from vlmflow.config import validate_config

log = logging.getLogger("vlmflow.archive")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", required=True, help="archive.tar.gz to write")
    p.add_argument("--images", required=True, help="images.parquet of the dataset")
    p.add_argument("--data", nargs="+", required=True, help="split Parquet files and sources")
    p.add_argument("--summary", required=True, help="summary.json of the data stage")
    p.add_argument("--adapter", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--predictions", required=True)
    p.add_argument("--merged", help="merged model folder (its model card is archived)")
    p.add_argument("--merge-check")
    p.add_argument("--lock", help="requirements.lock")
    p.add_argument("--report", nargs="*", default=[], help="report figures and pages")
    p.add_argument("--repo", default=".", help="the workflow's git checkout")
    p.add_argument("--log-dirs", nargs="*", default=["logs", "benchmarks"])
    a = p.parse_args()
    setup_logging(a.verbose)
    config = validate_config(a.config)
    manifest = build_archive(
        a.out,
        config=config,
        images_parquet=a.images,
        data_files=a.data,
        summary=a.summary,
        adapter=a.adapter,
        metrics=a.metrics,
        predictions=a.predictions,
        merged=a.merged,
        merge_check=a.merge_check,
        lock=a.lock,
        report_files=a.report,
        repo=a.repo,
        log_dirs=a.log_dirs,
    )
    log.info("archive %s: %s (splits %s)", a.out, manifest["totals"], ", ".join(DATA_SPLITS))


if __name__ == "__main__":
    run(main)
