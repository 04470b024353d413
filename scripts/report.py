#!/usr/bin/env python
"""Figures and pages for `snakemake --report`.

report.py data        --summary S --rejected R --images I --html OUT --figures DIR [--extra PNG...]
report.py training    --log train_log.jsonl --png OUT
report.py evaluation  --metrics M --predictions P [--merge-check C] [--serve-check S]
                      --html OUT --png OUT --gallery OUT
report.py summary     --run R --dataset D [--lora-only] [--budget B] --png TRAINING_PNG --html OUT
                      (the landing page's fragment: metrics base vs tuned, facts, curves)
"""

import logging
import shutil
from pathlib import Path

from vlmflow.cli import parser, run, setup_logging
from vlmflow.config import resolve_sections
from vlmflow.io import atomic_dir, atomic_file
from vlmflow.report import data_qc, gallery_page, metrics_page, training_curves
from vlmflow.summary import run_summary, summary_html

log = logging.getLogger("vlmflow.report")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("what", choices=["data", "training", "evaluation", "summary"])
    p.add_argument("--run", help="summary: run name")
    p.add_argument("--dataset", help="summary: the run's dataset")
    p.add_argument("--lora-only", action="store_true", help="summary: no merged model")
    p.add_argument("--budget", help="summary: the run's token budget summary.json")
    p.add_argument("--summary")
    p.add_argument("--rejected")
    p.add_argument("--images")
    p.add_argument("--figures", help="data: folder for the QC figures")
    p.add_argument("--extra", nargs="*", default=[], help="data: more figures to show (copied)")
    p.add_argument("--log", help="training: train_log.jsonl")
    p.add_argument("--metrics")
    p.add_argument("--predictions")
    p.add_argument("--merge-check")
    p.add_argument("--serve-check")
    p.add_argument("--html")
    p.add_argument("--png")
    p.add_argument("--gallery")
    a = p.parse_args()
    setup_logging(a.verbose)
    cfg = resolve_sections(a.config, ["report"])["report"]
    if a.what == "data":
        with atomic_dir(a.figures) as tmp:
            data_qc(a.summary, a.rejected, a.images, a.html, tmp / "data_qc.png")
            for extra in a.extra:
                shutil.copy(extra, tmp / Path(extra).name)
        log.info("data QC: %s, %s (+%d figures)", a.html, a.figures, len(a.extra))
    elif a.what == "training":
        n = training_curves(a.log, a.png)
        log.info("training curves of %d steps: %s", n, a.png)
    elif a.what == "summary":
        s = run_summary(a.run, a.dataset, merged=not a.lora_only, budget=a.budget)
        with atomic_file(a.html) as tmp:
            tmp.write_text(summary_html(s, a.png) + "\n")
        log.info("run summary: %s", a.html)
    else:
        metrics_page(a.metrics, a.html, a.png, a.merge_check, a.serve_check)
        n = gallery_page(a.predictions, a.metrics, a.gallery, max_items=cfg["gallery_samples"])
        log.info("metrics: %s, %s; gallery of %d samples: %s", a.html, a.png, n, a.gallery)


if __name__ == "__main__":
    run(main)
