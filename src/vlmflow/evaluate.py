"""Evaluation: batched generation (left padding, KV cache) on the test split for the base and the
tuned model, scored with metrics chosen in the config.

Metrics (per sample and over the split; `HIGHER_IS_BETTER` says which way is good):

- exact_match: normalised equality (NFKC, lower case, punctuation stripped at the ends, spaces
  collapsed).
- accuracy: relaxed accuracy for short answers (ChartQA): exact match, or, when both answers are
  numbers, a relative difference of at most 5%.
- anls: Average Normalized Levenshtein Similarity (Biten et al., 2019, the DocVQA metric): per
  sample 1 - NL(pred, ref) when the normalised Levenshtein distance NL (case-insensitive, spaces
  trimmed) is below 0.5, else 0. Distances from rapidfuzz (a dependency of jiwer).
- cer / wer: character / word error rate from jiwer; the split score is corpus level (all edits /
  all reference characters or words), per sample it is the sample's rate.
- bleu: sacreBLEU corpus BLEU (0-100, default 13a tokenisation); per sample sentence BLEU.
- rouge_l: ROUGE-L F1 from Google's rouge-score; the split score is the mean.
"""

from __future__ import annotations

import logging
import re
import string
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .artifacts import Metrics
from .collate import Encoder

log = logging.getLogger(__name__)

ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05


# ---------------------------------------------------------------------------------------- text
def normalize_answer(text: str) -> str:
    """Lower-case, NFKC, strip punctuation at the ends and collapse whitespace."""
    text = unicodedata.normalize("NFKC", text).lower().strip()
    text = text.strip(string.punctuation + " ")
    return re.sub(r"\s+", " ", text)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _number(text: str) -> float | None:
    t = normalize_answer(text).replace(",", "").rstrip("%").strip()
    try:
        return float(t)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, reference: str) -> float:
    """Exact match, or both numbers within 5% of the reference (ChartQA's relaxed accuracy)."""
    if exact_match(prediction, reference):
        return 1.0
    p, r = _number(prediction), _number(reference)
    if p is None or r is None:
        return 0.0
    if r == 0:
        return float(p == 0)
    return float(abs(p - r) / abs(r) <= RELAXED_TOLERANCE)


def anls(prediction: str, reference: str, threshold: float = ANLS_THRESHOLD) -> float:
    """Normalized Levenshtein similarity of one answer (DocVQA's ANLS for one reference)."""
    from rapidfuzz.distance import Levenshtein

    p = " ".join(prediction.lower().split())
    r = " ".join(reference.lower().split())
    if not p and not r:
        return 1.0
    nl = Levenshtein.normalized_distance(p, r)  # distance / max(len(p), len(r))
    return 1.0 - nl if nl < threshold else 0.0


def _error_rate(kind: str, predictions: Sequence[str], references: Sequence[str]):
    """jiwer CER/WER: (corpus score, per-sample scores). An empty reference scores 0 when the
    prediction is empty too, else 1 (jiwer refuses empty references)."""
    import jiwer

    fn = jiwer.cer if kind == "cer" else jiwer.wer
    per = []
    for p, r in zip(predictions, references):
        if not r.strip():
            per.append(0.0 if not p.strip() else 1.0)
        else:
            per.append(float(fn(r, p)))
    pairs = [(r, p) for p, r in zip(predictions, references) if r.strip()]
    corpus = float(fn([r for r, _ in pairs], [p for _, p in pairs])) if pairs else 0.0
    return corpus, per


def _mean_of(fn: Callable[[str, str], float]):
    def score(predictions, references):
        per = [float(fn(p, r)) for p, r in zip(predictions, references)]
        return (sum(per) / len(per) if per else 0.0), per

    return score


def _bleu(predictions, references):
    import sacrebleu

    corpus = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    per = [sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(predictions, references)]
    return float(corpus), [float(x) for x in per]


def _rouge_l(predictions, references):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    per = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return (sum(per) / len(per) if per else 0.0), [float(x) for x in per]


METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], tuple[float, list[float]]]] = {
    "exact_match": _mean_of(exact_match),
    "accuracy": _mean_of(relaxed_accuracy),
    "anls": _mean_of(anls),
    "cer": lambda p, r: _error_rate("cer", p, r),
    "wer": lambda p, r: _error_rate("wer", p, r),
    "bleu": _bleu,
    "rouge_l": _rouge_l,
}
HIGHER_IS_BETTER = {m: m not in ("cer", "wer") for m in METRICS}


def compare(
    names: Sequence[str],
    base: dict[str, float],
    tuned: dict[str, float],
    *,
    n: int,
    generation: dict[str, dict],
    settings: dict,
) -> Metrics:
    """The metrics.json of a comparison: both sides' scores, the delta and which way is good."""
    return Metrics(
        n=n,
        metrics=list(names),
        base=base,
        tuned=tuned,
        delta={m: tuned[m] - base[m] for m in names},
        higher_is_better={m: HIGHER_IS_BETTER[m] for m in names},
        generation=generation,
        settings=settings,
    )


def score(
    names: Sequence[str], predictions: Sequence[str], references: Sequence[str]
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Split-level and per-sample scores of every metric in `names`."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown} (known: {', '.join(METRICS)})")
    totals, per_sample = {}, {}
    for name in names:
        totals[name], per_sample[name] = METRICS[name](predictions, references)
    return totals, per_sample


# ----------------------------------------------------------------------------------------- rows
def reference_of(row: dict) -> str:
    last = [m for m in row["messages"] if m["role"] == "assistant"][-1]
    return "".join(p["text"] for p in last["content"] if p["type"] == "text")


def question_of(row: dict) -> str:
    users = [m for m in row["messages"] if m["role"] == "user"]
    return (
        "".join(p["text"] or "" for p in users[-1]["content"] if p["type"] == "text")
        if users
        else ""
    )


# ----------------------------------------------------------------------------------- generation
def generation_kwargs(eval_cfg: dict | None) -> dict:
    """model.generate settings from the eval section: greedy unless do_sample."""
    if not eval_cfg or not eval_cfg.get("do_sample"):
        return {"do_sample": False}
    return {
        "do_sample": True,
        "temperature": eval_cfg["temperature"],
        "top_p": eval_cfg["top_p"],
        "top_k": eval_cfg["top_k"],
    }


@torch.no_grad()
def generate_answers(
    model,
    processor,
    encoder: Encoder,
    rows: list[dict],
    *,
    batch_size: int,
    max_new_tokens: int,
    progress: bool = True,
    sampling: dict | None = None,
    desc: str = "generate",
) -> tuple[list[str], dict]:
    """Answers for `rows` (prompt = everything before the last assistant turn), in batches with
    left padding and the KV cache. Greedy unless `sampling` (from `generation_kwargs`) says
    otherwise.

    Returns (answers, stats) with stats = {generated_tokens, seconds, tokens_per_s}.
    """
    from tqdm import tqdm

    tok = encoder.tokenizer
    device = next(model.parameters()).device
    answers: list[str] = []
    n_new = 0
    t0 = time.perf_counter()
    model.eval()
    eos = [tok.convert_tokens_to_ids(encoder.family.end_of_turn)]
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    kwargs = sampling or {"do_sample": False}
    bar = tqdm(total=len(rows), desc=desc, unit="sample", disable=not progress)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = [encoder.prompt(r) for r in chunk]
        texts = [p[0] for p in prompts]
        images = [p[1] for p in prompts]
        image_kwargs = {"images": images} if any(images) else {}
        # The chat template already holds BOS where the model wants one (as in training).
        batch = processor(
            text=texts,
            padding=True,
            padding_side="left",
            return_tensors="pt",
            add_special_tokens=False,
            **image_kwargs,
        )
        batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=encoder.pad_id,
            use_cache=True,
            **kwargs,
        )
        new = out[:, batch["input_ids"].shape[1] :]
        for seq in new:
            keep = []
            for t in seq.tolist():
                if t in eos or t == encoder.pad_id:
                    break
                keep.append(t)
            n_new += len(keep) + 1
            answers.append(tok.decode(keep, skip_special_tokens=True).strip())
        bar.update(len(chunk))
        dt = time.perf_counter() - t0
        bar.set_postfix(tok_s=f"{n_new / max(dt, 1e-9):.1f}")
    bar.close()
    dt = time.perf_counter() - t0
    stats = {
        "generated_tokens": n_new,
        "seconds": round(dt, 3),
        "tokens_per_s": round(n_new / max(dt, 1e-9), 1),
    }
    log.info(
        "%s: %d samples, %d tokens in %.1fs (%.1f tokens/s)",
        desc,
        len(rows),
        n_new,
        dt,
        stats["tokens_per_s"],
    )
    return answers, stats


def is_adapter(folder) -> bool:
    return (Path(folder) / "adapter_config.json").exists()


def load_for_eval(model_cfg: dict, tuned: str | None):
    """(model, processor, family) of the base (`tuned` None) or of the tuned model: a merged
    folder loaded as it is (plain from_pretrained: 16-bit or its saved 4-bit), or an adapter
    folder applied to the base loaded as in training (4-bit when model.load_in_4bit)."""
    from .modeling import load_model, load_processor

    if tuned is None:
        # The base in 16-bit, the model one would deploy without fine-tuning. An adapter is
        # compared against the base as it was trained on (quantized under QLoRA).
        model, family = load_model(model_cfg, quantize=False)
        return model, load_processor(model_cfg, family), family
    if is_adapter(tuned):
        from peft import PeftModel

        base, family = load_model(model_cfg)
        return PeftModel.from_pretrained(base, tuned), load_processor(model_cfg, family), family
    cfg = dict(model_cfg, name=tuned, revision=None, load_in_4bit=False)
    model, family = load_model(cfg)
    return model, load_processor(cfg, family), family
