"""Qwen3-VL-MoE and Qwen3.5-MoE: the Qwen3-VL and Qwen3.5 models with sparse MoE blocks as
decoder MLPs. transformers 5 fuses each layer's experts into two 3-D nn.Parameters,
`mlp.experts.gate_up_proj` (experts, 2 x moe_intermediate, hidden) and `mlp.experts.down_proj`
(experts, hidden, moe_intermediate): they are not nn.Linear, so LoRA reaches them through PEFT's
`target_parameters` (`Family.expert_parameters`, a `lora.ParamWrapper` per parameter with rank r
per expert), and bitsandbytes leaves them (and the routers) in 16-bit. The routers are never
LoRA'd."""

from __future__ import annotations

import os
from pathlib import Path

from . import qwen_vl
from .qwen3_5 import QWEN3_5, qwen3_5_text

# Both parameters of the fused experts (relative to a decoder layer).
EXPERTS = r"mlp\.experts\.(?:gate_up_proj|down_proj)"

# Tiny MoE blocks: 4 experts, 2 active. moe_intermediate 16 (2 x 16 != hidden 64), so that the
# (experts, out, in) and (experts, in, out) layouts of a fused expert weight differ.
_TINY_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


def build_tiny_qwen3_vl_moe(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Qwen3-VL-MoE: Qwen3-VL with every decoder MLP a sparse MoE block (router + fused
    experts, no shared expert), as in Qwen3-VL-30B-A3B. transformers 5 saves the experts in the
    model's (experts, out, in) layout; the hub checkpoints have (experts, in, out), which it
    transposes on load (tests/unit/test_moe.py merges into both)."""
    rope = {"mrope_section": [2, 3, 3]}
    moe = dict(_TINY_MOE, decoder_sparse_step=1, mlp_only_layers=[])

    def text(tok, ids):
        return qwen_vl.qwen3_text(tok, ids, rope_parameters=rope, **moe)

    vision = qwen_vl.qwen3_vision(deepstack_visual_indexes=[0])
    return qwen_vl.save_qwen(out_dir, seed, "Qwen3VLMoe", text, vision)


def build_tiny_qwen3_5_moe(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Qwen3.5-MoE: the Qwen3.5 hybrid decoder with a sparse MoE block (router, fused experts,
    a gated shared expert) in both layers, as in Qwen3.5-35B-A3B. Saved, like the hub
    checkpoints, with one tensor per expert and projection, which transformers fuses on load."""

    def text(tok, ids):
        return qwen3_5_text(tok, ids, shared_expert_intermediate_size=32, **_TINY_MOE)

    return qwen_vl.save_qwen(out_dir, seed, "Qwen3_5Moe", text, qwen_vl.qwen3_vision())


FAMILIES = [
    # Qwen3-VL-MoE (30B-A3B, 235B-A22B): the Qwen3-VL tower and DeepStack mergers; every
    # decoder MLP a router `mlp.gate` + fused experts (layers in mlp_only_layers keep a
    # dense MLP, caught by the MLP regex: none in the released checkpoints).
    qwen_vl.qwen_vl_family(
        "qwen3_vl_moe",
        qwen_vl.QWEN3_VISION_MLP,
        qwen_vl.qwen_vl_patches("Qwen3VLMoe"),
        build_tiny_qwen3_vl_moe,
        projector=qwen_vl.QWEN3_PROJECTOR,
        expert_parameters=EXPERTS,
        router_modules=("mlp.gate",),
    ),
    # Qwen3.5-MoE (35B-A3B, 122B-A10B, 397B-A17B): the Qwen3.5 hybrid decoder (Gated
    # DeltaNet and gated full attention) with a sparse MoE block in every layer: router
    # `mlp.gate`, fused experts, and a dense shared expert (nn.Linear, LoRA'd as the MLP)
    # scaled by a sigmoid gate `mlp.shared_expert_gate` (a router: frozen, 16-bit).
    qwen_vl.qwen_vl_family(
        "qwen3_5_moe",
        qwen_vl.QWEN3_VISION_MLP,
        qwen_vl.qwen_vl_patches("Qwen3_5Moe"),
        build_tiny_qwen3_5_moe,
        **{**QWEN3_5, "language_mlp": r"mlp\.shared_expert\.(?:gate_proj|up_proj|down_proj)"},
        expert_parameters=EXPERTS,
        router_modules=("mlp.gate", "mlp.shared_expert_gate"),
    ),
]
