"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: a ViT (`model.visual.blocks.N`, fused qkv) with a patch
merger as projector, in front of a Qwen decoder with M-RoPE (3-D position ids); Qwen's
`<|im_start|>` chat markers; padding-free packing."""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType

from ..tiny import fast_tokenizer_of, finish, llama_text, random_model, save_tiny
from .base import CHATML, CLIP_MLP, LANG_MLP, TEXT_PARTS, Family, user_parts

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
    causal_text=True,
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


def qwen_vision(**extra) -> dict:
    """Vision config of a tiny Qwen-VL tower: 2 blocks, 2 heads, 2x2 merge (plus `extra`)."""
    return dict(depth=2, num_heads=2, spatial_merge_size=2, temporal_patch_size=2, **extra)


def qwen_tower(**extra) -> dict:
    """Vision config of the Qwen2.5-VL / Qwen3-VL / Qwen3.5 tiny towers (32 wide, into 64)."""
    return qwen_vision(hidden_size=32, intermediate_size=64, out_hidden_size=64, **extra)


def qwen3_vision(**extra) -> dict:
    """Vision config of the Qwen3-VL / Qwen3.5 tiny towers (16 px patches)."""
    return qwen_tower(patch_size=16, num_position_embeddings=16, **extra)


def save_qwen(out_dir, seed, prefix, text, vision, patch_size=16, processor=None, top_ids=False):
    """Save a tiny Qwen-VL model: transformers' `<prefix>Config` from `text(tok, ids)` (a function
    of the Qwen tokenizer and its ids) and `vision` (with the begin/end/padding ids at the top
    level too when `top_ids`), `<prefix>ForConditionalGeneration` seeded, with the Qwen processor
    (`processor`, default Qwen3VLProcessor; Qwen2-VL's 14 px image processor when `patch_size`
    is None)."""
    import transformers as tr
    from transformers import Qwen2VLImageProcessor

    tok, ids = qwen_tokenizer()
    eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    top = dict(bos_token_id=pad, eos_token_id=eos, pad_token_id=pad) if top_ids else {}
    cfg = getattr(tr, f"{prefix}Config")(
        text_config=text(tok, ids),
        vision_config=vision,
        tie_word_embeddings=False,
        **top,
        **qwen_tokens(ids),
    )
    model = random_model(getattr(tr, f"{prefix}ForConditionalGeneration"), cfg, seed)
    finish(model, eos, pad)
    if patch_size is None:  # Qwen2-VL / Qwen2.5-VL: 14 px patches
        image = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=28 * 28 * 64)
        video = tr.Qwen2VLVideoProcessor()
    else:  # Qwen3-VL / Qwen3.5
        side = patch_size * 2
        image = Qwen2VLImageProcessor(
            patch_size=patch_size, merge_size=2, min_pixels=side * side, max_pixels=side * side * 64
        )
        video = tr.Qwen3VLVideoProcessor(patch_size=patch_size, merge_size=2)
    proc = getattr(tr, processor or "Qwen3VLProcessor")(
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
    vision = qwen_tower(
        patch_size=14, window_size=112, fullatt_block_indexes=[1], tokens_per_second=2
    )
    processor = "Qwen2_5_VLProcessor"
    return save_qwen(out_dir, seed, "Qwen2_5_VL", _qwen2_text, vision, None, processor, True)


def build_tiny_qwen2_vl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    vision = qwen_vision(embed_dim=32, hidden_size=64, mlp_ratio=2, patch_size=14)
    return save_qwen(out_dir, seed, "Qwen2VL", _qwen2_text, vision, None, "Qwen2VLProcessor")


def build_tiny_qwen3_vl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    def text(tok, ids):
        return qwen3_text(tok, ids, rope_parameters={"mrope_section": [2, 3, 3]})

    vision = qwen3_vision(deepstack_visual_indexes=[0])
    return save_qwen(out_dir, seed, "Qwen3VL", text, vision)


# The Qwen-VL vision MLPs: Qwen2.5-VL's is gated, Qwen3-VL's (and Qwen3.5's) `linear_fc1/2`; the
# Qwen3-VL projectors: the final merger and the DeepStack mergers that feed early decoder layers.
QWEN3_VISION_MLP = r"mlp\.(?:linear_fc1|linear_fc2)"
QWEN3_PROJECTOR = ("model.visual.merger", "model.visual.deepstack_merger_list")


def qwen_vl_family(name, vision_mlp, patches, build_tiny, **extra) -> Family:
    """A Qwen-VL entry: `QWEN_VL` with this vision MLP, these patches and tiny builder."""
    return Family(
        name=name,
        vision_mlp=vision_mlp,
        patches=patches,
        build_tiny=build_tiny,
        **{**QWEN_VL, **extra},
    )


FAMILIES = [
    qwen_vl_family(
        "qwen2_vl",
        CLIP_MLP,
        qwen_vl_patches("", "PatchEmbed"),
        build_tiny_qwen2_vl,
        compile_measured=True,
        offload_quantized=True,  # 4-bit: 5.01 instead of 5.44 GiB (Unsloth 5.29), 0.96x speed
        offload_16bit=True,  # full depth: 17.73 instead of 19.75 GiB (Unsloth 19.07), 1.00x
    ),
    qwen_vl_family(
        "qwen2_5_vl",
        LANG_MLP,
        qwen_vl_patches("Qwen2_5_VL", "Qwen2_5_VisionPatchEmbed"),
        build_tiny_qwen2_5_vl,
        compile_measured=True,
        offload_quantized=True,  # the 7B QLoRA example's setting: 7.5 GiB, Unsloth 9.2 (README)
    ),
    qwen_vl_family(
        "qwen3_vl",
        QWEN3_VISION_MLP,
        qwen_vl_patches("Qwen3VL"),
        build_tiny_qwen3_vl,
        projector=QWEN3_PROJECTOR,
        compile_measured=True,
        offload_quantized=True,  # 4-bit: 5.20 instead of 5.52 GiB (Unsloth 5.43), 0.91x speed
        offload_16bit=True,  # full depth: 18.35 instead of 20.01 GiB (Unsloth 19.27), 0.98x
    ),
]
