#!/usr/bin/env python
"""Evaluate the base and the tuned model (merged folder or adapter) on the test split.

Batched generation (greedy unless eval.do_sample) with left padding and the KV cache, a progress
bar and tokens/s in the log; scores from eval.metrics. Writes metrics.json (base, tuned, delta,
n, settings) and predictions.parquet (one row per test sample: id, image, question, reference,
both answers and per-sample scores).
"""

import gc
import logging

import pandas as pd
import torch

from vlmflow.cli import parser, run, setup_logging
from vlmflow.collate import make_encoder
from vlmflow.config import resolve_sections
from vlmflow.data import read_conversations
from vlmflow.errors import DataError
from vlmflow.evaluate import (
    compare,
    generate_answers,
    generation_kwargs,
    is_adapter,
    load_for_eval,
    question_of,
    reference_of,
    score,
)
from vlmflow.hub import check_model_source
from vlmflow.io import write_parquet

log = logging.getLogger("vlmflow.evaluate")


def answers_of(model_cfg: dict, eval_cfg: dict, rows: list[dict], tuned: str | None):
    model, processor, family = load_for_eval(model_cfg, tuned)
    encoder = make_encoder(processor, family, model_cfg)
    torch.manual_seed(eval_cfg["seed"])
    answers, stats = generate_answers(
        model,
        processor,
        encoder,
        rows,
        batch_size=eval_cfg["batch_size"],
        max_new_tokens=eval_cfg["max_new_tokens"],
        sampling=generation_kwargs(eval_cfg),
        desc="tuned" if tuned else "base",
    )
    del model
    gc.collect()
    return answers, stats


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--test", required=True, help="test.parquet")
    p.add_argument("--tuned", required=True, help="merged model folder or adapter folder")
    p.add_argument("--metrics", required=True, help="metrics.json to write")
    p.add_argument("--predictions", required=True, help="predictions.parquet to write")
    a = p.parse_args()
    setup_logging(a.verbose)
    cfg = resolve_sections(a.config, ["model", "eval"])
    check_model_source(cfg["model"])  # a missing or unusable local model: say so now
    eval_cfg = cfg["eval"]
    torch.set_num_threads(a.threads)
    rows = read_conversations(a.test)
    if eval_cfg["max_samples"] is not None:
        rows = rows[: eval_cfg["max_samples"]]
    if not rows:
        raise DataError("the test split is empty; raise datasets.<name>.split.test")
    refs = [reference_of(r) for r in rows]
    base_answers, base_stats = answers_of(cfg["model"], eval_cfg, rows, None)
    tuned_answers, tuned_stats = answers_of(cfg["model"], eval_cfg, rows, a.tuned)
    names = eval_cfg["metrics"]
    base, base_per = score(names, base_answers, refs)
    tuned, tuned_per = score(names, tuned_answers, refs)
    columns = {
        "id": [r["id"] for r in rows],
        "image": [r["images"][0] if r["images"] else None for r in rows],
        "question": [question_of(r) for r in rows],
        "reference": refs,
        "base_answer": base_answers,
        "tuned_answer": tuned_answers,
    }
    for name in names:
        columns[f"base_{name}"] = base_per[name]
        columns[f"tuned_{name}"] = tuned_per[name]
    metrics = compare(
        names,
        base,
        tuned,
        n=len(rows),
        generation={"base": base_stats, "tuned": tuned_stats},
        settings={
            "base_model": cfg["model"]["name"],
            "base_revision": cfg["model"]["revision"],
            "tuned_model": a.tuned,
            "tuned_kind": "adapter" if is_adapter(a.tuned) else "merged",
            "test": a.test,
            **eval_cfg,
        },
    )
    write_parquet(a.predictions, pd.DataFrame(columns))
    metrics.write(a.metrics)
    for m in names:
        log.info("%s: base %.4f, tuned %.4f (n=%d)", m, base[m], tuned[m], len(rows))


if __name__ == "__main__":
    run(main)
