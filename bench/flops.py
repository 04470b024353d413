#!/usr/bin/env python
"""Arithmetic floor of one LoRA training step of Qwen2.5-VL: the matmul FLOPs a step cannot
avoid, and the tokens/s they allow at a given matmul throughput.

Counted per forward pass (2 FLOP per multiply-add):
- language model, per token: every decoder linear (q, k, v, o; gate, up, down); causal
  attention per sample of n tokens: QK^T and AV over n^2/2 pairs per layer; the output head on
  label tokens only (vlmflow's loss never computes the others).
- vision tower, per patch: patch embedding, every block's qkv/proj/MLP; attention per window
  (Qwen2.5-VL: 112-px windows = 4x4 merged tokens = 64 patches, smaller at the image's edges)
  and per whole image in the full-attention blocks; the merger MLP per merged token.
A step is 3 forward passes: the forward, its recomputation under gradient checkpointing, and
the backward, which for frozen weights computes only input gradients (one forward's worth; the
LoRA weight gradients add about r/d and are left out). Elementwise work, norms, RoPE, softmax
and the optimizer are left out: a floor, not a prediction.

    python bench/flops.py       # the fixed and the realistic case of bench_train.py, 7B config
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

PEAK_FLOPS = 790e12  # bf16 dense matmul FLOP/s an H200 reaches in a large GEMM


def text_flops(text: dict, lengths: list[int], label_tokens: int) -> float:
    """Forward FLOPs of the language model over samples of `lengths` tokens."""
    d, layers = text["hidden_size"], text["num_hidden_layers"]
    kv = d // text["num_attention_heads"] * text["num_key_value_heads"]
    per_token = 2 * layers * (2 * d * d + 2 * d * kv + 3 * d * text["intermediate_size"])
    attention = 2 * layers * 2 * d * sum(n * n / 2 for n in lengths)
    head = 2 * d * text["vocab_size"] * label_tokens
    return per_token * sum(lengths) + attention + head


def vision_flops(vision: dict, grids: list[tuple[int, int, int]]) -> float:
    """Forward FLOPs of the vision tower over images of patch grids (t, h, w)."""
    d, depth, ff = vision["hidden_size"], vision["depth"], vision["intermediate_size"]
    merge, patch = vision["spatial_merge_size"], vision["patch_size"]
    full = len(vision["fullatt_block_indexes"])
    window = vision["window_size"] // merge // patch  # merged tokens per window side
    patch_in = 3 * vision["temporal_patch_size"] * patch * patch
    total = 0.0
    for t, h, w in grids:
        n = t * h * w
        total += 2 * n * patch_in * d  # patch embedding
        total += 2 * depth * n * (4 * d * d + 3 * d * ff)  # qkv, proj, gate/up/down
        total += 2 * full * 2 * d * n * n  # full-attention blocks: QK^T and AV
        mh, mw = h // merge, w // merge
        pairs = 0  # windowed blocks: attention pairs within each window
        for i in range(math.ceil(mh / window)):
            for j in range(math.ceil(mw / window)):
                cells = min(window, mh - i * window) * min(window, mw - j * window)
                pairs += t * (cells * merge * merge) ** 2
        total += 2 * (depth - full) * 2 * d * pairs
        m = n // (merge * merge)  # merger: 2 linears on 4 patches' features
        total += 2 * m * (4 * d * 4 * d + 4 * d * vision["out_hidden_size"])
    return total


def step_flops(text: dict, vision: dict, lengths, grids, label_tokens: int) -> float:
    """FLOPs of one training step (forward + recomputation + backward = 3 forwards)."""
    return 3 * (text_flops(text, list(lengths), label_tokens) + vision_flops(vision, grids))


def batch_shapes(batches: list[dict]) -> tuple[list[int], list[tuple[int, int, int]], int]:
    """(sample lengths, image grids, label tokens) of collated padded or packed batches."""
    lengths, grids, labels = [], [], 0
    for b in batches:
        if "row_lengths" in b:  # packed: a sample starts where its text position is 0
            for row, used in zip(b["position_ids"][0], b["row_lengths"].tolist()):
                starts = (row[:used] == 0).nonzero().flatten().tolist() + [used]
                lengths += [e - s for s, e in zip(starts[:-1], starts[1:])]
        else:
            lengths += b["attention_mask"].sum(1).tolist()
        grids += [tuple(g) for g in b.get("image_grid_thw", []).tolist()]
        labels += int((b["labels"][:, 1:] != -100).sum())
    return lengths, grids, labels


def main() -> None:
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train import fixed_rows, realistic_rows
    from make_model import SIZES, build_processor

    from vlmflow.collate import Encoder, collate
    from vlmflow.families import FAMILIES

    text, vision = SIZES["7b"]
    encoder = Encoder(build_processor(), FAMILIES["qwen2_5_vl"], max_seq_length=8192)
    peak = PEAK_FLOPS
    with tempfile.TemporaryDirectory() as tmp:
        cases = {"fixed": fixed_rows(4, 896, 300, tmp), "realistic": realistic_rows(64, tmp)}
        for name, rows in cases.items():
            samples = [encoder(r) for r in rows]
            lengths, grids, labels = batch_shapes([collate(samples, encoder.pad_id)])
            flops = step_flops(text, vision, lengths, grids, labels)
            tokens = sum(lengths)
            patches = sum(t * h * w for t, h, w in grids)
            print(
                f"{name}: {len(lengths)} samples, {tokens} tokens, {patches} patches, "
                f"{labels} label tokens: {flops:.3g} FLOP per step = {flops / peak:.2f} s at "
                f"{peak / 1e12:.0f} TFLOP/s = {tokens / (flops / peak):,.0f} tokens/s"
            )


if __name__ == "__main__":
    main()
