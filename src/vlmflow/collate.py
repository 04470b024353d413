"""Conversation rows → model inputs.

`Encoder` turns one canonical conversation (see `vlmflow.data`) into token ids, labels and image
tensors with the model's own processor and chat template. `collate` pads a list of encoded
samples into a batch, laying out each processor output as the family's registry entry says.
Both are pure functions of their inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .families import Family
from .images import load_rgb

IGNORE_INDEX = -100
# Keys with one entry per token (dim 0 of a sample's tensor), and their padding value.
TOKEN_KEYS = {
    "input_ids": None,  # the tokenizer's pad id
    "labels": IGNORE_INDEX,
    "attention_mask": 0,
    "mm_token_type_ids": 0,
    "token_type_ids": 0,
    "cross_attention_mask": 0,
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
    first = pattern[0]
    for i in range(start, len(ids) - n + 1):
        if ids[i] == first and ids[i : i + n] == pattern:
            return i
    return -1


def response_labels(
    input_ids: torch.Tensor,
    response_ids: list[int],
    end_ids: list[int],
    ignore_ids: Sequence[int] = (),
    instruction_ids: list[int] | None = None,
) -> torch.Tensor:
    """Labels that keep only assistant turns: the tokens after each `response_ids` marker up to
    and including the next end-of-turn token sequence (or, when a turn is not closed, up to the
    next `instruction_ids` marker or the end). Everything else is IGNORE_INDEX.

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
        if instruction_ids:
            nxt = find_subsequence(ids, instruction_ids, start)
            if 0 <= nxt < stop:
                stop = nxt
        labels[start:stop] = input_ids[start:stop]
        pos = stop
    for t in ignore_ids:
        labels[input_ids == t] = IGNORE_INDEX
    return labels


def fit_pixels(image, min_pixels: int | None, max_pixels: int | None):
    """Resize a PIL image (keeping its aspect ratio) so that width*height lies within
    [min_pixels, max_pixels]; unchanged when it already does or both bounds are None."""
    w, h = image.size
    n = w * h
    scale = 1.0
    if max_pixels is not None and n > max_pixels:
        scale = (max_pixels / n) ** 0.5
    elif min_pixels is not None and n < min_pixels:
        scale = (min_pixels / n) ** 0.5
    if scale == 1.0:
        return image
    from PIL import Image

    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if max_pixels is not None and size[0] * size[1] > max_pixels:  # rounding up overshot
        size = (max(1, int(w * scale)), max(1, int(h * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


class Encoder:
    """Callable that encodes one conversation row for a given processor and family."""

    def __init__(
        self,
        processor,
        family: Family,
        *,
        max_seq_length: int,
        train_on_responses_only: bool = True,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ):
        self.processor = processor
        self.family = family
        self.max_seq_length = max_seq_length
        self.train_on_responses_only = train_on_responses_only
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        tok = self.tokenizer
        self.response_ids = self._ids(family.response_part)
        self.instruction_ids = self._ids(family.instruction_part)
        self.end_ids = self._ids(family.end_of_turn)
        self.image_token_id = tok.convert_tokens_to_ids(family.image_token)
        self.ignore_ids = [
            i
            for i in (tok.convert_tokens_to_ids(t) for t in family.image_tokens)
            if i is not None and i != tok.unk_token_id
        ]
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def images_of(self, row: dict) -> list:
        return [fit_pixels(load_rgb(p), self.min_pixels, self.max_pixels) for p in row["images"]]

    def __call__(self, row: dict) -> dict[str, torch.Tensor]:
        """Encode one row. Returns per-sample tensors: token keys without a batch dimension
        (input_ids (T,), attention_mask (T,), labels (T,), token_type_ids (T,),
        cross_attention_mask (T, images, tiles)), and the processor's image tensors as it
        returns them for one sample (e.g. Qwen: pixel_values (patches, C·t·p·p),
        image_grid_thw (images, 3); Mllama: pixel_values (1, images, tiles, C, H, W)).
        """
        messages = to_hf_messages(row["messages"])
        text = self.processor.apply_chat_template(messages, tokenize=False)
        images = self.images_of(row)
        kwargs = {"images": [images]} if images else {}
        enc = self.processor(text=[text], return_tensors="pt", add_special_tokens=False, **kwargs)
        out = {k: (v[0] if k in TOKEN_KEYS else v) for k, v in enc.items() if torch.is_tensor(v)}
        ids = out["input_ids"]
        sid = row.get("id", "?")
        if ids.shape[0] > self.max_seq_length:
            raise SampleTooLongError(
                f"sample '{sid}' has {ids.shape[0]} tokens > max_seq_length "
                f"{self.max_seq_length} (never truncated: image tokens would be cut)"
            )
        if self.train_on_responses_only:
            labels = response_labels(
                ids, self.response_ids, self.end_ids, self.ignore_ids, self.instruction_ids
            )
            n_turns = sum(m["role"] == "assistant" for m in messages)
            found = _count(ids.tolist(), self.response_ids)
            if found != n_turns:
                raise ValueError(
                    f"sample '{sid}': found the assistant marker {self.family.response_part!r} "
                    f"{found} times in the tokenized chat template for {n_turns} assistant "
                    f"turns; the chat template does not match the '{self.family.name}' family"
                )
        else:
            labels = ids.clone()
            for t in self.ignore_ids:
                labels[ids == t] = IGNORE_INDEX
        if not bool((labels != IGNORE_INDEX).any()):
            raise ValueError(f"sample '{sid}' has no assistant tokens to train on")
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


def _count(ids: list[int], pattern: list[int]) -> int:
    n, pos = 0, 0
    while (hit := find_subsequence(ids, pattern, pos)) >= 0:
        n, pos = n + 1, hit + len(pattern)
    return n


def _pad_to(t: torch.Tensor, shape: Sequence[int], fill) -> torch.Tensor:
    """`t` placed at the origin of a tensor of `shape` filled with `fill` (no copy if equal)."""
    if tuple(t.shape) == tuple(shape):
        return t
    out = t.new_full(tuple(shape), fill)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def _max_shape(tensors: Sequence[torch.Tensor], first: int) -> list[int]:
    return [max(t.shape[d] for t in tensors) for d in range(first, tensors[0].ndim)]


def collate(
    samples: Sequence[dict[str, torch.Tensor]],
    pad_id: int,
    layout: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded samples into a batch.

    Each key is laid out as `layout[key]` says (default: 'token' for TOKEN_KEYS, 'cat' else):
    - 'token': (T_i, *rest_i) → (B, max T_i, *max rest); input_ids padded with `pad_id`, labels
      with -100, masks with 0. Samples without the key get an all-padding row.
    - 'cat': image-major tensors (N_i, *rest_i) (Qwen pixel_values (P_i, D), image_grid_thw
      (N_i, 3), LLaVA pixel_values (N_i, C, H, W), image_sizes (N_i, 2)...) → (sum N_i, *max rest),
      concatenated in sample order (the order of the image tokens in the flattened batch), smaller
      trailing dims zero-padded (LLaVA-NeXT tile counts, Pixtral image sizes); samples without
      images contribute nothing.
    - 'sample': per-sample tensors with a leading dim of 1 (Mllama pixel_values
      (1, images, tiles, C, H, W), Idefics3 (1, crops, C, H, W)...) → (B, *max rest), zero-padded
      (zero images are padding to these models); samples without images get all zeros.
    """
    layout = layout or {}
    length = max(s["input_ids"].shape[0] for s in samples)
    batch: dict[str, torch.Tensor] = {}
    keys = dict.fromkeys(k for s in samples for k in s)
    for key in keys:
        mode = layout.get(key, "token" if key in TOKEN_KEYS else "cat")
        present = [s[key] for s in samples if key in s]
        ref = present[0]
        if mode == "token":
            fill = pad_id if key == "input_ids" else TOKEN_KEYS.get(key, 0)
            shape = [length, *_max_shape(present, 1)]
            batch[key] = torch.stack(
                [
                    _pad_to(s[key], shape, fill) if key in s else ref.new_full(shape, fill)
                    for s in samples
                ]
            )
        elif mode == "cat":
            rest = _max_shape(present, 1)
            batch[key] = torch.cat([_pad_to(t, (t.shape[0], *rest), 0) for t in present])
        elif mode == "sample":
            shape = _max_shape(present, 1)
            batch[key] = torch.stack(
                [
                    _pad_to(s[key][0], shape, 0) if key in s else ref.new_zeros(shape)
                    for s in samples
                ]
            )
        else:
            raise ValueError(f"unknown batch layout '{mode}' for '{key}'")
    return batch
