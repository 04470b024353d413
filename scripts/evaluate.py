#!/usr/bin/env python
"""Evaluate the base and the tuned model (merged folder or adapter) on the test split.

Batched generation (greedy unless eval.do_sample) with left padding and the KV cache, a progress
bar and tokens/s in the log; scores from eval.metrics. Writes metrics.json (base, tuned, delta,
n, settings) and predictions.parquet (one row per test sample: id, image, question, reference,
both answers and per-sample scores).

The base model's answers are shared by the runs of an experiment: without --tuned, only the
base answers are generated (--base-answers, --base-stats are written); with --tuned and
--base-answers / --base-stats given, they are read instead of generated again.
"""

import gc
import json
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
from vlmflow.io import write_json, write_parquet

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


def read_base_answers(answers: str, stats: str, rows: list[dict]):
    """The shared base answers, checked to be those of exactly these test rows, in order."""
    df = pd.read_parquet(answers)
    ids = [r["id"] for r in rows]
    if df["id"].tolist() != ids:
        raise SystemExit(
            f"error: {answers} answers other test rows than this run's test split "
            f"({len(df)} vs {len(ids)} rows); re-run its evaluate_base job"
        )
    with open(stats) as f:
        return df["base_answer"].tolist(), json.load(f)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--test", required=True, help="test.parquet")
    p.add_argument("--tuned", help="merged model folder or adapter folder (none: base only)")
    p.add_argument("--base-answers", help="the base model's answers.parquet (read or written)")
    p.add_argument("--base-stats", help="the base model's generation.json (read or written)")
    p.add_argument("--metrics", help="metrics.json to write (with --tuned)")
    p.add_argument("--predictions", help="predictions.parquet to write (with --tuned)")
    a = p.parse_args()
    if a.tuned and not (a.metrics and a.predictions):
        p.error("--tuned needs --metrics and --predictions")
    if not a.tuned and not (a.base_answers and a.base_stats):
        p.error("without --tuned, give --base-answers and --base-stats to write")
    if bool(a.base_answers) != bool(a.base_stats):
        p.error("--base-answers and --base-stats go together")
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
    if a.tuned and a.base_answers:
        base_answers, base_stats = read_base_answers(a.base_answers, a.base_stats, rows)
    else:
        base_answers, base_stats = answers_of(cfg["model"], eval_cfg, rows, None)
    if not a.tuned:
        ids = [r["id"] for r in rows]
        write_parquet(a.base_answers, pd.DataFrame({"id": ids, "base_answer": base_answers}))
        write_json(a.base_stats, base_stats)
        return
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
