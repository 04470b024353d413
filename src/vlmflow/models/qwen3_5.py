"""Qwen3.5 (dense, natively multimodal): the Qwen3-VL tower without DeepStack in front of a 3:1
hybrid of Gated DeltaNet (linear attention) and full (gated) attention layers."""

from __future__ import annotations

import os
from pathlib import Path

from .qwen_vl import (
    QWEN3_VISION_MLP,
    qwen3_text,
    qwen3_vision,
    qwen_vl_family,
    qwen_vl_patches,
    save_qwen,
)

# The Gated DeltaNet layers' five projections count as attention too.
QWEN3_5_ATTN = (
    r"(?:self_attn\.(?:q_proj|k_proj|v_proj|o_proj)"
    r"|linear_attn\.(?:in_proj_qkv|in_proj_z|in_proj_b|in_proj_a|out_proj))"
)
LINEAR_ATTENTION_PACKING = (
    "its Gated DeltaNet (linear-attention) layers carry a recurrent state and a causal "
    "convolution along the whole row: position ids do not reset them, so packed samples would "
    "read each other's tokens (the varlen cu_seqlens path of flash-linear-attention is not "
    "wired in)"
)

# What Qwen3.5 and Qwen3.5-MoE change in the Qwen-VL entry: the hybrid decoder's attention,
# packing refused.
QWEN3_5 = {
    "language_attention": QWEN3_5_ATTN,
    "supports_packing": False,
    "packing_refusal": LINEAR_ATTENTION_PACKING,
}


def qwen3_5_text(tok, ids, **extra) -> dict:
    """Text config of the Qwen3.5 tiny hybrid decoders: layer 0 a Gated DeltaNet (linear
    attention), layer 1 full (gated) attention with partial rotary."""
    return qwen3_text(
        tok,
        ids,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention"],
        rope_parameters={"partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]},
        **extra,
    )


def build_tiny_qwen3_5(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Qwen3.5 (dense): the Qwen3-VL vision tower and processor in front of a hybrid decoder whose
    layer 0 is a Gated DeltaNet (linear attention) and layer 1 full (gated) attention, as the
    released 3:1 pattern alternates them."""
    return save_qwen(out_dir, seed, "Qwen3_5", qwen3_5_text, qwen3_vision())


FAMILIES = [
    qwen_vl_family(
        "qwen3_5", QWEN3_VISION_MLP, qwen_vl_patches("Qwen3_5"), build_tiny_qwen3_5, **QWEN3_5
    ),
]
