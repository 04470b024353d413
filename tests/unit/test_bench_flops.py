"""bench/flops.py: the arithmetic floor the GPU benchmark reports its speed against."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from flops import batch_shapes, step_flops, text_flops, vision_flops  # noqa: E402
from helpers import HAND_TEXT  # noqa: E402

from vlmflow.collate import Encoder, collate, collate_packed, rope_index_fn  # noqa: E402
from vlmflow.families import FAMILIES  # noqa: E402

TEXT = dict(HAND_TEXT, num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
VISION = dict(
    hidden_size=4,
    depth=3,
    intermediate_size=6,
    spatial_merge_size=2,
    patch_size=14,
    window_size=112,  # 4x4 merged tokens = 64 patches per window
    fullatt_block_indexes=[2],
    temporal_patch_size=2,
    out_hidden_size=8,
)


def test_text_flops_by_hand():
    # per token: 2 layers x 2 x (q, o: 8x8; k, v: 8x4; gate, up, down: 8x16)
    per_token = 2 * 2 * (2 * 64 + 2 * 32 + 3 * 128)
    attention = 2 * 2 * 2 * 8 * (3 * 3 / 2 + 5 * 5 / 2)  # causal pairs of samples of 3 and 5
    head = 2 * 8 * 100 * 4
    assert text_flops(TEXT, [3, 5], label_tokens=4) == per_token * 8 + attention + head


def test_vision_windows_are_cut_at_the_image_edge():
    def window_pairs(grid):  # windows of 8x8 patches, the last ones cut by the edge
        t, h, w = grid
        rows = [min(8, h - i) for i in range(0, h, 8)]
        cols = [min(8, w - j) for j in range(0, w, 8)]
        return t * sum((r * c) ** 2 for r in rows for c in cols)

    # 12 x 20 patches: windows of 8x8, 8x8, 8x4, 4x8, 4x8, 4x4
    assert window_pairs((1, 12, 20)) == 2 * 64**2 + 32**2 + 2 * 32**2 + 16**2
    n = 12 * 20
    dense = vision_flops({**VISION, "fullatt_block_indexes": []}, [(1, 12, 20)])
    rest = dense - 2 * VISION["depth"] * 2 * 4 * window_pairs((1, 12, 20))
    linears = 2 * n * (3 * 2 * 14 * 14 * 4) + 2 * 3 * n * (4 * 16 + 3 * 4 * 6)
    merger = 2 * (n // 4) * (16 * 16 + 16 * 8)
    assert rest == linears + merger
    # a full-attention block instead of a windowed one adds n^2 - window pairs
    one_full = vision_flops(VISION, [(1, 12, 20)])
    assert one_full - dense == 2 * 2 * 4 * (n * n - window_pairs((1, 12, 20)))


def test_a_step_is_three_forwards():
    f = text_flops(TEXT, [7], 2) + vision_flops(VISION, [(1, 4, 4)])
    assert step_flops(TEXT, VISION, [7], [(1, 4, 4)], 2) == 3 * f


def test_packed_and_padded_batches_have_the_same_shapes(tiny_qwen, chat_rows, digits_rows):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen, dtype=torch.float32)
    enc = Encoder(
        AutoProcessor.from_pretrained(tiny_qwen), FAMILIES["qwen2_5_vl"], max_seq_length=512
    )
    samples = [enc(r) for r in [*chat_rows, *digits_rows[:3]]]
    lengths = sorted(int(s["input_ids"].shape[0]) for s in samples)
    padded = batch_shapes([collate(samples[:2], enc.pad_id), collate(samples[2:], enc.pad_id)])
    packed = batch_shapes([collate_packed(samples, enc.pad_id, rope_index_fn(model), 256)])
    assert sorted(padded[0]) == sorted(packed[0]) == lengths
    assert sorted(padded[1]) == sorted(packed[1])
    assert len(padded[1]) == sum(
        int(s["image_grid_thw"].shape[0]) for s in samples if "image_grid_thw" in s
    )
    assert padded[2] == packed[2] > 0
    with pytest.raises(KeyError):
        batch_shapes([{"input_ids": torch.zeros(1, 2)}])
