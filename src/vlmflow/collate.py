"""Conversation rows → model inputs.

`Encoder` turns one canonical conversation (see `vlmflow.data`) into token ids, labels and image
tensors with the model's own processor and chat template. `collate` pads a list of encoded
samples into a batch, laying out each processor output as the family's registry entry says.
Both are pure functions of their inputs.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch

from .errors import VlmflowError
from .families import FAMILIES
from .images import load_rgb
from .models.base import Family

IGNORE_INDEX = -100
# Keys with one entry per token (dim 0 of a sample's tensor), and their padding value: the ones
# transformers' tokenizers and processors return, and those a family adds (Family.token_keys).
TOKEN_KEYS = {
    "input_ids": None,  # the tokenizer's pad id
    "labels": IGNORE_INDEX,
    "attention_mask": 0,
    "mm_token_type_ids": 0,
    "token_type_ids": 0,
    **{k: v for f in FAMILIES.values() for k, v in f.token_keys.items()},
}


class SampleTooLongError(VlmflowError, ValueError):
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


def response_spans(
    ids: list[int],
    response_ids: list[int],
    end_ids: list[int],
    instruction_ids: list[int] | None = None,
) -> list[tuple[int, int]]:
    """[start, stop) of each assistant turn, in order: the tokens after each `response_ids`
    marker up to and including the next end-of-turn token sequence (or, when a turn is not
    closed, up to the next `instruction_ids` marker or the end)."""
    spans, pos = [], 0
    while (hit := find_subsequence(ids, response_ids, pos)) >= 0:
        start = hit + len(response_ids)
        end = find_subsequence(ids, end_ids, start)
        stop = len(ids) if end < 0 else end + len(end_ids)
        if instruction_ids:
            nxt = find_subsequence(ids, instruction_ids, start)
            if 0 <= nxt < stop:
                stop = nxt
        spans.append((start, stop))
        pos = stop
    return spans


def response_labels(
    input_ids: torch.Tensor,
    response_ids: list[int],
    end_ids: list[int],
    ignore_ids: Sequence[int] = (),
    instruction_ids: list[int] | None = None,
    skip: Collection[int] = (),
) -> torch.Tensor:
    """Labels that keep only assistant turns (`response_spans`), except the turns numbered in
    `skip` (0 = the first assistant turn: context not trained on). Everything else is
    IGNORE_INDEX.

    input_ids: (T,) int64 → labels: (T,) int64.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for k, (start, stop) in enumerate(
        response_spans(input_ids.tolist(), response_ids, end_ids, instruction_ids)
    ):
        if k not in skip:
            labels[start:stop] = input_ids[start:stop]
    for t in ignore_ids:
        labels[input_ids == t] = IGNORE_INDEX
    return labels


def untrained_turns(messages: Sequence[dict]) -> set[int]:
    """Numbers (0 = the first) of the assistant turns kept as context only (`train` False)."""
    answers = [m for m in messages if m["role"] == "assistant"]
    return {k for k, m in enumerate(answers) if m.get("train") is False}


def fitted_size(
    size: tuple[int, int], min_pixels: int | None, max_pixels: int | None
) -> tuple[int, int]:
    """(width, height) scaled (aspect ratio kept) so that width*height lies within
    [min_pixels, max_pixels]; `size` itself when it already does or both bounds are None."""
    w, h = size
    n = w * h
    scale = 1.0
    if max_pixels is not None and n > max_pixels:
        scale = (max_pixels / n) ** 0.5
    elif min_pixels is not None and n < min_pixels:
        scale = (min_pixels / n) ** 0.5
    if scale == 1.0:
        return w, h
    out = (max(1, round(w * scale)), max(1, round(h * scale)))
    if max_pixels is not None and out[0] * out[1] > max_pixels:  # rounding up overshot
        out = (max(1, int(w * scale)), max(1, int(h * scale)))
    return out


def fit_pixels(image, min_pixels: int | None, max_pixels: int | None):
    """Resize a PIL image (keeping its aspect ratio) so that width*height lies within
    [min_pixels, max_pixels]; unchanged when it already does or both bounds are None."""
    return resized(image, fitted_size(image.size, min_pixels, max_pixels))


def resized(image, size: tuple[int, int]):
    """A PIL image at (width, height) `size` (bicubic), or itself when it has that size."""
    if size == image.size:
        return image
    from PIL import Image

    return image.resize(size, Image.Resampling.BICUBIC)


def image_size_for(
    size: tuple[int, int], hint: Mapping | None, min_pixels: int | None, max_pixels: int | None
) -> tuple[int, int]:
    """The (width, height) an image of `size` is given to the processor at: its part's resize
    hint (Qwen-VL's `resized_height` / `resized_width`, or its own `min_pixels` / `max_pixels`
    instead of the model's), else the model's bounds."""
    if hint and hint.get("resized_height") and hint.get("resized_width"):
        return hint["resized_width"], hint["resized_height"]
    if hint and (hint.get("min_pixels") or hint.get("max_pixels")):
        return fitted_size(size, hint.get("min_pixels"), hint.get("max_pixels"))
    return fitted_size(size, min_pixels, max_pixels)


def image_hints(row: Mapping) -> list:
    """Each image's resize hint (None: none), by its index in `row["images"]`."""
    hints = [None] * len(row["images"])
    for m in row["messages"]:
        for p in m["content"]:
            if p["type"] == "image" and p.get("resize"):
                hints[int(p["image"])] = p["resize"]
    return hints


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
        out = []
        for path, hint in zip(row["images"], image_hints(row)):
            image = load_rgb(path)
            out.append(
                resized(image, image_size_for(image.size, hint, self.min_pixels, self.max_pixels))
            )
        return out

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
        skip = untrained_turns(row["messages"])
        if self.train_on_responses_only or skip:
            n_turns = sum(m["role"] == "assistant" for m in messages)
            found = _count(ids.tolist(), self.response_ids)
            if found != n_turns:
                raise ValueError(
                    f"sample '{sid}': found the assistant marker {self.family.response_part!r} "
                    f"{found} times in the tokenized chat template for {n_turns} assistant "
                    f"turns; the chat template does not match the '{self.family.name}' family"
                )
        if self.train_on_responses_only:
            labels = response_labels(
                ids, self.response_ids, self.end_ids, self.ignore_ids, self.instruction_ids, skip
            )
        else:
            labels = ids.clone()
            spans = response_spans(
                ids.tolist(), self.response_ids, self.end_ids, self.instruction_ids
            )
            for k in skip:  # an answer with loss weight 0 stays context here too
                labels[spans[k][0] : spans[k][1]] = IGNORE_INDEX
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


# ------------------------------------------------------------------------------------- packing
PACK_META_KEYS = ("row_lengths",)
"""Keys of a packed batch that describe it and are not model inputs (see `model_inputs`)."""


def make_encoder(processor, family: Family, model_cfg: dict) -> Encoder:
    """The Encoder of a model section as training builds it (answers-only labels, the same pixel
    limits), for the steps that encode rows without training: evaluation, the merge check."""
    return Encoder(
        processor,
        family,
        max_seq_length=model_cfg["max_seq_length"],
        min_pixels=model_cfg["min_pixels"],
        max_pixels=model_cfg["max_pixels"],
    )


def collate_batch(samples: Sequence[dict[str, torch.Tensor]], pad_id: int, family: Family) -> dict:
    """`collate` with the family's batch layout."""
    return collate(samples, pad_id, family.batch_layout)


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """First-fit decreasing bin packing of samples (by token count) into rows of at most
    `max_length` tokens. A sample is never split: one longer than `max_length` raises
    SampleTooLongError (the encoder's policy; such samples are dropped by the data stage).

    Returns rows of sample indices; each row lists its samples in their input order, rows are
    ordered by their first sample. Deterministic (ties keep the input order).
    """
    for i, n in enumerate(lengths):
        if n > max_length:
            raise SampleTooLongError(
                f"sample {i} of the micro-batch has {n} tokens > max_seq_length {max_length} "
                "(packing never splits a sample)"
            )
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(max_length - lengths[i])
    rows = [sorted(r) for r in rows]
    return sorted(rows, key=lambda r: r[0])


def collate_packed(
    samples: Sequence[dict[str, torch.Tensor]],
    pad_id: int,
    rope_index,
    max_length: int,
) -> dict[str, torch.Tensor]:
    """Pack encoded samples padding-free into rows of at most `max_length` tokens (Qwen-VL).

    Samples are placed with `pack_rows` (first-fit decreasing, never split) and concatenated
    within a row; padding only fills the end of a row up to the longest row's length T. With R
    rows and samples k of lengths n_k:

    - input_ids (R, T): the samples' tokens, then `pad_id`.
    - labels (R, T): the samples' labels, except IGNORE_INDEX at the first token of every sample
      (the loss shifts labels by one: that token would be predicted from the previous sample's
      last token; a padded batch never predicts a row's first token either, so the label count
      is the same) and on padding.
    - position_ids (4, R, T) int64: row 0 = text positions 0..n_k-1 of each sample (and
      0..pad-1 on the padding), rows 1-3 = `rope_index(sample)` (the model's own (3, n_k) M-RoPE
      ids of the sample alone; the padding repeats its text positions). Row 0 confines
      attention to each sample (the padding attends only to itself): transformers builds a
      block-diagonal causal mask from it for sdpa/eager attention, and `patches.packed_attention`
      (what `train.packing` installs for sdpa) cuts the rows at it into one causal call per
      sample. No `attention_mask` is returned: a 2-D one would switch that off.
    - other per-token keys (mm_token_type_ids, ...) (R, T), padded as in `collate`.
    - image tensors (pixel_values (sum P_k, D), image_grid_thw (sum N_k, 3), ...): concatenated
      in the order their image tokens appear in the flattened (R, T) rows.
    - row_lengths (R,) int64: real tokens per row (not a model input, see `model_inputs`).

    Per sample, the causal LM outputs equal those of the sample alone (RoPE sees the same
    positions, attention the same keys).
    """
    lengths = [int(s["input_ids"].shape[0]) for s in samples]
    rows = pack_rows(lengths, max_length)
    width = max(sum(lengths[i] for i in r) for r in rows)
    token_keys = [k for k in dict.fromkeys(k for s in samples for k in s) if k in TOKEN_KEYS]
    token_keys = [k for k in token_keys if k not in ("attention_mask", "cross_attention_mask")]
    other_keys = [k for k in dict.fromkeys(k for s in samples for k in s) if k not in TOKEN_KEYS]
    out: dict[str, list] = {k: [] for k in token_keys}
    positions, row_lengths, order = [], [], []
    for r in rows:
        used = sum(lengths[i] for i in r)
        pad = width - used
        for key in token_keys:
            fill = pad_id if key == "input_ids" else TOKEN_KEYS[key]
            parts = []
            for i in r:
                t = samples[i].get(key)
                if t is None:
                    t = samples[i]["input_ids"].new_full((lengths[i],), TOKEN_KEYS[key])
                if key == "labels":
                    t = t.clone()
                    t[0] = IGNORE_INDEX
                parts.append(t)
            parts.append(samples[r[0]]["input_ids"].new_full((pad,), fill))
            out[key].append(torch.cat(parts))
        pos = []
        for i in r:
            mrope = torch.as_tensor(rope_index(samples[i]), dtype=torch.long)
            if tuple(mrope.shape) != (3, lengths[i]):
                raise ValueError(
                    f"rope_index returned shape {tuple(mrope.shape)} for a sample of "
                    f"{lengths[i]} tokens; expected (3, {lengths[i]})"
                )
            text = torch.arange(lengths[i], dtype=torch.long)[None]
            pos.append(torch.cat([text, mrope]))
        pos.append(torch.arange(pad, dtype=torch.long)[None].expand(4, pad))
        positions.append(torch.cat(pos, dim=1))
        row_lengths.append(used)
        order.extend(r)
    batch = {k: torch.stack(v) for k, v in out.items()}
    batch["position_ids"] = torch.stack(positions, dim=1)  # (4, R, T)
    for key in other_keys:
        present = [samples[i][key] for i in order if key in samples[i]]
        rest = _max_shape(present, 1)
        batch[key] = torch.cat([_pad_to(t, (t.shape[0], *rest), 0) for t in present])
    batch["row_lengths"] = torch.tensor(row_lengths, dtype=torch.long)
    return batch


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of a (padded or packed) batch that the model takes."""
    return {k: v for k, v in batch.items() if k not in PACK_META_KEYS}


def without_padding_mask(
    batch: Mapping[str, torch.Tensor], max_length: float = float("inf")
) -> dict[str, torch.Tensor]:
    """`batch` without its 2-D `attention_mask` when that mask hides right padding only (each
    row: real tokens, then padding without a label) and the batch is at most `max_length`
    tokens long (a sliding window's span); any other batch is returned unchanged.

    In a causal language model a real token never attends to the padding after it, so every
    real token's output, and the loss, are the same without the mask (only the padding
    positions' outputs change), and SDPA runs its causal kernel, which skips the masked half,
    instead of a dense masked one (`train.fast_paths.padded_attention`; for the families that
    declare `Family.causal_text`)."""
    mask = batch.get("attention_mask")
    if mask is None or mask.ndim != 2 or mask.shape[1] > max_length:
        return dict(batch)
    real = mask.bool()
    if bool((real[:, 1:] & ~real[:, :-1]).any()):  # a real token after padding: left padding
        return dict(batch)
    labels = batch.get("labels")
    if labels is not None and bool((labels[~real] != IGNORE_INDEX).any()):
        return dict(batch)
    return {k: v for k, v in batch.items() if k != "attention_mask"}


def count_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a padded (attention_mask) or packed (row_lengths) batch."""
    if "row_lengths" in batch:
        return int(batch["row_lengths"].sum())
    return int(batch["attention_mask"].sum())


def rope_index_fn(model):
    """`sample -> (3, T)` M-RoPE position ids of one encoded sample alone, computed with the
    model's own `get_rope_index` (Qwen2/2.5/3-VL; it reads only the config, so it runs on the
    CPU tensors of the sample whatever device the model is on)."""
    owner = next((m for m in model.modules() if hasattr(type(m), "get_rope_index")), None)
    if owner is None:
        raise ValueError(f"{type(model).__name__} has no get_rope_index: it cannot be packed")

    def rope_index(sample: Mapping[str, torch.Tensor]) -> torch.Tensor:
        ids = sample["input_ids"][None]
        types = sample.get("mm_token_type_ids")
        types = torch.zeros_like(ids) if types is None else types[None]
        pos, _ = owner.get_rope_index(
            ids,
            mm_token_type_ids=types,
            image_grid_thw=sample.get("image_grid_thw"),
            video_grid_thw=sample.get("video_grid_thw"),
        )
        return pos[:, 0]

    return rope_index
