#!/usr/bin/env python
"""The comparison of an experiment's runs, and its archive.

compare.py compare --runs RUNS_JSON --out-dir DIR   (table.tsv/.html, loss.png, gallery.html,
                                                     best.json)
compare.py archive --runs RUNS_JSON --comparison FILE... --out ARCHIVE

RUNS_JSON: {run: {config, metrics, predictions, train_log, adapter, merged}} (paths; merged
null without a merge), in the experiment's run order. --config takes the experiment and report
sections.
"""

import json
import logging

from vlmflow.cli import parser, run, setup_logging
from vlmflow.compare import compare, experiment_archive
from vlmflow.config import resolve_sections

log = logging.getLogger("vlmflow.compare")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("what", choices=["compare", "archive"])
    p.add_argument("--runs", required=True, type=json.loads, help="the runs' files, as JSON")
    p.add_argument("--out-dir", help="compare: the experiment's folder")
    p.add_argument("--comparison", nargs="*", default=[], help="archive: comparison files")
    p.add_argument("--out", help="archive: the .tar.gz to write")
    a = p.parse_args()
    setup_logging(a.verbose)
    cfg = resolve_sections(a.config, ["experiment", "report"])
    if a.what == "compare":
        best = compare(
            a.runs,
            experiment=cfg["experiment"],
            out_dir=a.out_dir,
            gallery_samples=cfg["report"]["gallery_samples"],
        )
        log.info("best run: %s (%s %.4g)", best["run"], best["metric"], best["value"])
    else:
        configs = {r: files["config"] for r, files in a.runs.items()}
        name = cfg["experiment"]["name"]
        experiment_archive(a.out, name=name, configs=configs, comparison=a.comparison)
        log.info("experiment archive: %s (%d runs)", a.out, len(configs))


if __name__ == "__main__":
    run(main)
