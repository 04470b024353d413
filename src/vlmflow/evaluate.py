"""Evaluation: batched greedy generation (left padding, KV cache) on the test split, for the base
model and the tuned model, scored with normalised exact match."""

from __future__ import annotations

import logging
import re
import string
import time
import unicodedata

import torch

from .collate import Encoder

log = logging.getLogger(__name__)


def normalize_answer(text: str) -> str:
    """Lower-case, NFKC, strip punctuation at the ends and collapse whitespace."""
    text = unicodedata.normalize("NFKC", text).lower().strip()
    text = text.strip(string.punctuation + " ")
    return re.sub(r"\s+", " ", text)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


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
) -> tuple[list[str], dict]:
    """Greedy answers for `rows` (prompt = everything before the last assistant turn).

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
    for i in tqdm(range(0, len(rows), batch_size), desc="generate", disable=not progress):
        chunk = rows[i : i + batch_size]
        prompts = [encoder.prompt(r) for r in chunk]
        texts = [p[0] for p in prompts]
        images = [p[1] for p in prompts]
        kwargs = {"images": images} if any(images) else {}
        batch = processor(
            text=texts, padding=True, padding_side="left", return_tensors="pt", **kwargs
        )
        batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=encoder.pad_id,
            use_cache=True,
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
    dt = time.perf_counter() - t0
    return answers, {
        "generated_tokens": n_new,
        "seconds": round(dt, 3),
        "tokens_per_s": round(n_new / max(dt, 1e-9), 1),
    }
