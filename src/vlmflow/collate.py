"""Conversation rows → model inputs.

`encode` turns one canonical conversation (see `vlmflow.data`) into token ids, labels and image
tensors with the model's own processor and chat template. `collate` pads a list of encoded
samples into a batch. Both are pure functions of their inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .families import Family
from .images import load_rgb

IGNORE_INDEX = -100
# Keys whose tensors have one entry per token (padded with the given value).
_PER_TOKEN = {
    "input_ids": None,
    "labels": IGNORE_INDEX,
    "attention_mask": 0,
    "mm_token_type_ids": 0,
    "token_type_ids": 0,
}


class SampleTooLongError(ValueError):
    """A sample's tokens (image tokens included) exceed max_seq_length. It is never truncated:
    cutting through image tokens breaks the model, and cutting the answer trains on half of it.
    The data stage drops such samples before training; reaching this error means one slipped by."""


def to_hf_messages(messages: Sequence[dict]) -> list[dict]:
    """Canonical messages → the `{"type": "image"}` / `{"type": "text"}` form chat templates read."""
    out = []
    for m in messages:
        parts = []
        for p in m["content"]:
            if p["type"] == "image":
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": p["text"]})
        out.append({"role": m["role"], "content": parts})
    return out


def find_subsequence(ids: list[int], pattern: list[int], start: int = 0) -> int:
    n = len(pattern)
    for i in range(start, len(ids) - n + 1):
        if ids[i : i + n] == pattern:
            return i
    return -1


def response_labels(
    input_ids: torch.Tensor,
    response_ids: list[int],
    end_ids: list[int],
    ignore_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Labels that keep only assistant turns: the tokens after each `response_ids` marker up to
    and including the next end-of-turn token sequence. Everything else is IGNORE_INDEX.

    input_ids: (T,) int64 → labels: (T,) int64.
    """
    ids = input_ids.tolist()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    pos = 0
    while True:
        hit = find_subsequence(ids, response_ids, pos)
        if hit < 0:
            break
        start = hit + len(response_ids)
        end = find_subsequence(ids, end_ids, start)
        stop = len(ids) if end < 0 else end + len(end_ids)
        labels[start:stop] = input_ids[start:stop]
        pos = stop
    for t in ignore_ids:
        labels[input_ids == t] = IGNORE_INDEX
    return labels


class Encoder:
    """Callable that encodes one conversation row for a given processor and family."""

    def __init__(
        self,
        processor,
        family: Family,
        *,
        max_seq_length: int,
        train_on_responses_only: bool = True,
    ):
        self.processor = processor
        self.family = family
        self.max_seq_length = max_seq_length
        self.train_on_responses_only = train_on_responses_only
        tok = self.tokenizer
        self.response_ids = tok(family.response_part, add_special_tokens=False).input_ids
        self.end_ids = tok(family.end_of_turn, add_special_tokens=False).input_ids
        self.image_token_id = tok.convert_tokens_to_ids(family.image_token)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def images_of(self, row: dict) -> list:
        return [load_rgb(p) for p in row["images"]]

    def __call__(self, row: dict) -> dict[str, torch.Tensor]:
        """Encode one row. Returns per-sample tensors without a batch dimension:
        input_ids (T,), attention_mask (T,), labels (T,), and the processor's image tensors
        (for Qwen: pixel_values (P, C·t·p·p), image_grid_thw (N_img, 3)).
        """
        messages = to_hf_messages(row["messages"])
        text = self.processor.apply_chat_template(messages, tokenize=False)
        images = self.images_of(row)
        enc = self.processor(text=[text], images=[images] if images else None, return_tensors="pt")
        out = {k: (v[0] if k in _PER_TOKEN else v) for k, v in enc.items() if torch.is_tensor(v)}
        ids = out["input_ids"]
        if ids.shape[0] > self.max_seq_length:
            raise SampleTooLongError(
                f"sample '{row.get('id', '?')}' has {ids.shape[0]} tokens > max_seq_length "
                f"{self.max_seq_length}"
            )
        if self.train_on_responses_only:
            labels = response_labels(ids, self.response_ids, self.end_ids, [self.image_token_id])
        else:
            labels = ids.clone()
            labels[ids == self.image_token_id] = IGNORE_INDEX
        if not bool((labels != IGNORE_INDEX).any()):
            raise ValueError(f"sample '{row.get('id', '?')}' has no assistant tokens to train on")
        out["labels"] = labels
        return out

    def prompt(self, row: dict) -> tuple[str, list]:
        """The generation prompt of a row (everything before the last assistant turn) + images."""
        messages = to_hf_messages(row["messages"])
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        text = self.processor.apply_chat_template(
            messages[:last], tokenize=False, add_generation_prompt=True
        )
        n_images = sum(p["type"] == "image" for m in messages[:last] for p in m["content"])
        return text, self.images_of(row)[:n_images]


def collate(samples: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded samples into a batch.

    Per-token keys (input_ids, labels, attention_mask, ...) of shape (T_i,) become (B, max T_i):
    input_ids padded with `pad_id`, labels with -100, masks with 0. Image tensors
    (pixel_values (P_i, D), image_grid_thw (N_i, 3), ...) are concatenated along dim 0 in sample
    order, which is the order of the image tokens in the flattened batch; samples without images
    contribute nothing.
    """
    length = max(s["input_ids"].shape[0] for s in samples)
    batch: dict[str, torch.Tensor] = {}
    keys = dict.fromkeys(k for s in samples for k in s)
    for key in keys:
        if key in _PER_TOKEN:
            fill = pad_id if key == "input_ids" else _PER_TOKEN[key]
            out = torch.full((len(samples), length), fill, dtype=samples[0][key].dtype)
            for i, s in enumerate(samples):
                out[i, : s[key].shape[0]] = s[key]
            batch[key] = out
        else:
            batch[key] = torch.cat([s[key] for s in samples if key in s], dim=0)
    return batch
