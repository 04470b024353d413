#!/usr/bin/env python
"""Evaluate the base and the tuned (merged) model on the test split: greedy generation, exact match.

Writes metrics.json (base, tuned, delta, n, settings) and predictions.parquet (one row per
test sample with both answers and per-sample scores).
"""

import logging

import pandas as pd
import torch

from vlmflow.cli import parser, run, setup_logging
from vlmflow.collate import Encoder
from vlmflow.config import resolve_sections
from vlmflow.data import read_conversations
from vlmflow.evaluate import exact_match, generate_answers, question_of, reference_of
from vlmflow.io import write_json, write_parquet
from vlmflow.modeling import load_model, load_processor

log = logging.getLogger("vlmflow.evaluate")


def answers_of(model_cfg: dict, eval_cfg: dict, rows: list[dict]) -> tuple[list[str], dict]:
    processor = load_processor(model_cfg)
    model, family = load_model(model_cfg)
    encoder = Encoder(processor, family, max_seq_length=model_cfg["max_seq_length"])
    answers, stats = generate_answers(
        model,
        processor,
        encoder,
        rows,
        batch_size=eval_cfg["batch_size"],
        max_new_tokens=eval_cfg["max_new_tokens"],
    )
    del model
    return answers, stats


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--test", required=True, help="test.parquet")
    p.add_argument("--tuned", required=True, help="merged model folder")
    p.add_argument("--metrics", required=True, help="metrics.json to write")
    p.add_argument("--predictions", required=True, help="predictions.parquet to write")
    a = p.parse_args()
    setup_logging(a.verbose)
    cfg = resolve_sections(a.config, ["model", "eval"])
    torch.set_num_threads(a.threads)
    rows = read_conversations(a.test)
    if cfg["eval"]["max_samples"] is not None:
        rows = rows[: cfg["eval"]["max_samples"]]
    if not rows:
        raise SystemExit("error: the test split is empty; raise datasets.<name>.split.test")
    refs = [reference_of(r) for r in rows]
    base_answers, base_stats = answers_of(cfg["model"], cfg["eval"], rows)
    tuned_cfg = dict(cfg["model"], name=a.tuned, revision=None, load_in_4bit=False)
    tuned_answers, tuned_stats = answers_of(tuned_cfg, cfg["eval"], rows)
    base_em = [exact_match(x, y) for x, y in zip(base_answers, refs)]
    tuned_em = [exact_match(x, y) for x, y in zip(tuned_answers, refs)]
    preds = pd.DataFrame(
        {
            "id": [r["id"] for r in rows],
            "image": [r["images"][0] if r["images"] else None for r in rows],
            "question": [question_of(r) for r in rows],
            "reference": refs,
            "base_answer": base_answers,
            "tuned_answer": tuned_answers,
            "base_exact_match": base_em,
            "tuned_exact_match": tuned_em,
        }
    )
    n = len(rows)
    base, tuned = sum(base_em) / n, sum(tuned_em) / n
    metrics = {
        "n": n,
        "base": {"exact_match": base},
        "tuned": {"exact_match": tuned},
        "delta": {"exact_match": tuned - base},
        "generation": {"base": base_stats, "tuned": tuned_stats},
        "settings": {"base_model": cfg["model"]["name"], "tuned_model": a.tuned, **cfg["eval"]},
    }
    write_parquet(a.predictions, preds)
    write_json(a.metrics, metrics)
    log.info("exact match: base %.3f, tuned %.3f (n=%d)", base, tuned, n)


if __name__ == "__main__":
    run(main)
