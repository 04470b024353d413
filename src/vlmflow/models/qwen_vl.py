"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: a ViT (`model.visual.blocks.N`, fused qkv) with a patch
merger as projector, in front of a Qwen decoder with M-RoPE (3-D position ids); Qwen's
`<|im_start|>` chat markers; padding-free packing."""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType

from ..tiny import fast_tokenizer_of, finish, llama_text, random_model, save_tiny
from .base import CHATML, TEXT_PARTS, Family, user_parts

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    + TEXT_PARTS
    + "<|im_end|>{% endgeneration %}\n"
    "{% else %}" + user_parts("<|vision_start|><|image_pad|><|vision_end|>") + "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# What the Qwen-VL families share: vision blocks `model.visual.blocks.N` with a fused qkv, the
# merger as projector, Qwen's chat markers, padding-free packing (3-D M-RoPE position ids).
QWEN_VL = dict(
    vision_layers=r"model\.visual\.blocks\.\d+",
    vision_attention=r"attn\.(?:qkv|proj)",
    vision_tower=("model.visual",),
    projector=("model.visual.merger",),
    supports_packing=True,
    image_tokens=("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"),
    **CHATML,
)


def qwen_vl_patches(prefix: str, patch_embed: str | None = None) -> MappingProxyType:
    """The Qwen-VL fast paths, for transformers classes named `<prefix>VisionAttention` and
    `patch_embed` (default `<prefix>VisionPatchEmbed`; see `vlmflow.patches`)."""
    return MappingProxyType(
        {
            "vision_attention": (f"{prefix}VisionAttention",),
            "patch_embed": (patch_embed or f"{prefix}VisionPatchEmbed",),
        }
    )


def qwen_tokenizer(extra_specials: tuple[str, ...] = (), **kwargs):
    """(tokenizer, ids) of Qwen's specials (+ `extra_specials`); kwargs go to the tokenizer class
    (e.g. `extra_special_tokens`)."""
    from transformers import Qwen2TokenizerFast

    return fast_tokenizer_of(
        Qwen2TokenizerFast,
        [*QWEN_SPECIALS, *extra_specials],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        **kwargs,
    )


def qwen_tokens(ids) -> dict:
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def qwen3_text(tok, ids, **extra) -> dict:
    """Text config of the Qwen3-VL / Qwen3.5 tiny decoders (interleaved M-RoPE)."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True}
    return llama_text(
        tok,
        ids,
        "<|im_end|>",
        "<|endoftext|>",
        head_dim=16,
        **{**extra, "rope_parameters": {**rope, **extra["rope_parameters"]}},
    )


def qwen3_vision(**extra) -> dict:
    """Vision config of the Qwen3-VL / Qwen3.5 tiny towers."""
    return dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=16,
        **extra,
    )


def save_qwen(out_dir, seed, model_class, config, ids, processor_class, tok, patch_size=None):
    """Instantiate `model_class` from `config` (seeded), attach the Qwen processor and save."""
    from transformers import Qwen2VLImageProcessor

    model = random_model(model_class, config, seed)
    finish(model, ids["<|im_end|>"], ids["<|endoftext|>"])
    if patch_size is None:  # Qwen2-VL / Qwen2.5-VL: 14 px patches
        from transformers import Qwen2VLVideoProcessor

        image = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=28 * 28 * 64)
        video = Qwen2VLVideoProcessor()
    else:  # Qwen3-VL / Qwen3.5
        from transformers import Qwen3VLVideoProcessor

        side = patch_size * 2
        image = Qwen2VLImageProcessor(
            patch_size=patch_size, merge_size=2, min_pixels=side * side, max_pixels=side * side * 64
        )
        video = Qwen3VLVideoProcessor(patch_size=patch_size, merge_size=2)
    proc = processor_class(
        image_processor=image,
        tokenizer=tok,
        video_processor=video,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return save_tiny(model, proc, out_dir)


def _qwen2_text(tok, ids) -> dict:
    return llama_text(
        tok,
        ids,
        "<|im_end|>",
        "<|endoftext|>",
        "<|endoftext|>",
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    )


def build_tiny_qwen2_5_vl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Save a ~300k-parameter Qwen2.5-VL with its processor into `out_dir`."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )

    tok, ids = qwen_tokenizer()
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[1],
        tokens_per_second=2,
    )
    cfg = Qwen2_5_VLConfig(
        text_config=_qwen2_text(tok, ids),
        vision_config=vision,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
        **qwen_tokens(ids),
    )
    return save_qwen(
        out_dir, seed, Qwen2_5_VLForConditionalGeneration, cfg, ids, Qwen2_5_VLProcessor, tok
    )


def build_tiny_qwen2_vl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tok, ids = qwen_tokenizer()
    vision = dict(
        depth=2,
        embed_dim=32,
        hidden_size=64,
        mlp_ratio=2,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    cfg = Qwen2VLConfig(
        text_config=_qwen2_text(tok, ids),
        vision_config=vision,
        tie_word_embeddings=False,
        **qwen_tokens(ids),
    )
    return save_qwen(
        out_dir, seed, Qwen2VLForConditionalGeneration, cfg, ids, Qwen2VLProcessor, tok
    )


def build_tiny_qwen3_vl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    tok, ids = qwen_tokenizer()
    text = qwen3_text(tok, ids, rope_parameters={"mrope_section": [2, 3, 3]})
    cfg = Qwen3VLConfig(
        text_config=text,
        vision_config=qwen3_vision(deepstack_visual_indexes=[0]),
        tie_word_embeddings=False,
        **qwen_tokens(ids),
    )
    return save_qwen(
        out_dir, seed, Qwen3VLForConditionalGeneration, cfg, ids, Qwen3VLProcessor, tok, 16
    )


FAMILIES = [
    Family(
        name="qwen2_vl",
        vision_mlp=r"mlp\.(?:fc1|fc2)",
        patches=qwen_vl_patches("", "PatchEmbed"),
        compile_measured=True,
        build_tiny=build_tiny_qwen2_vl,
        **QWEN_VL,
    ),
    Family(
        name="qwen2_5_vl",
        vision_mlp=r"mlp\.(?:gate_proj|up_proj|down_proj)",
        patches=qwen_vl_patches("Qwen2_5_VL", "Qwen2_5_VisionPatchEmbed"),
        compile_measured=True,
        build_tiny=build_tiny_qwen2_5_vl,
        **QWEN_VL,
    ),
    Family(
        name="qwen3_vl",
        vision_mlp=r"mlp\.(?:linear_fc1|linear_fc2)",
        patches=qwen_vl_patches("Qwen3VL"),
        compile_measured=True,
        build_tiny=build_tiny_qwen3_vl,
        # the final merger and the DeepStack mergers that feed early decoder layers
        **{**QWEN_VL, "projector": ("model.visual.merger", "model.visual.deepstack_merger_list")},
    ),
]
