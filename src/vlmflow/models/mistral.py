"""Pixtral (a `llava` model around a Pixtral vision encoder) and Mistral Small 3.1 / 3.2
(model_type mistral3: the same encoder and chat format, a projector that merges 2x2 patches
before its MLP). The encoder's blocks name their parts `attention` and `feed_forward`."""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType

from ..tiny import fast_tokenizer, finish, llama_text, random_model, save_tiny, vit
from .base import TEXT_PARTS, Family, user_parts

# Pixtral / Mistral: <s>[INST]...[/INST]answer</s>
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    + TEXT_PARTS
    + "{{ eos_token }}{% endgeneration %}"
    "{% else %}[INST]" + user_parts("[IMG]") + "[/INST]{% endif %}"
    "{% endfor %}"
)

MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]"]

PIXTRAL_ENCODER = dict(
    vision_layers=r"model\.vision_tower\.transformer\.layers\.\d+",
    vision_attention=r"attention\.(?:q_proj|k_proj|v_proj|o_proj)",
    vision_mlp=r"feed_forward\.(?:gate_proj|up_proj|down_proj)",
    response_part="[/INST]",
    instruction_part="[INST]",
    end_of_turn="</s>",
    image_tokens=("[IMG]", "[IMG_BREAK]", "[IMG_END]"),
    patches=MappingProxyType({"block_attention": ("PixtralAttention",)}),
)


def mistral_text(tok, ids) -> dict:
    """Text config of a tiny Mistral decoder."""
    return llama_text(
        tok,
        ids,
        "</s>",
        "<pad>",
        "<s>",
        model_type="mistral",
        head_dim=16,
        sliding_window=None,
    )


def pixtral_tokenizer():
    """(tokenizer, ids): Mistral's special tokens and Pixtral's image tokens."""
    specials = [*MISTRAL_SPECIALS, "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    return fast_tokenizer(specials, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def pixtral_parts():
    """The Mistral tokenizer, its special-token ids, the Mistral decoder config and the Pixtral
    encoder config shared by the Pixtral and Mistral 3 tiny models."""
    tok, ids = pixtral_tokenizer()
    vision = vit(model_type="pixtral", image_size=64, patch_size=8, head_dim=16)
    return tok, ids, mistral_text(tok, ids), vision


def pixtral_config(config_class, text: dict, vision: dict, ids: dict, **extra):
    """The config of a Pixtral-encoder model (`LlavaConfig`: Pixtral; `Mistral3Config`: Mistral
    Small 3.1 / 3.2, a 2x2 patch merger) as the checkpoints set it: every patch of the last
    layer, Pixtral's projector a biased gelu MLP; `extra` added or overriding."""
    if config_class.model_type == "llava":
        kwargs = dict(
            vision_feature_select_strategy="full",
            projector_hidden_act="gelu",
            multimodal_projector_bias=True,
        )
    else:
        kwargs = dict(spatial_merge_size=2)
    return config_class(
        text_config=text,
        vision_config=vision,
        image_token_index=ids["[IMG]"],
        vision_feature_layer=-1,
        tie_word_embeddings=False,
        **{**kwargs, **extra},
    )


def _save_pixtral_like(out_dir, seed, model_class, cfg, tok, ids, longest_edge, merge) -> Path:
    from transformers import PixtralImageProcessor, PixtralProcessor

    model = random_model(model_class, cfg, seed)
    finish(model, ids["</s>"], ids["<pad>"], ids["<s>"])
    proc = PixtralProcessor(
        image_processor=PixtralImageProcessor(size={"longest_edge": longest_edge}, patch_size=8),
        tokenizer=tok,
        patch_size=8,
        spatial_merge_size=merge,
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )
    return save_tiny(model, proc, out_dir)


def build_tiny_pixtral(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Pixtral: LlavaForConditionalGeneration with a Pixtral vision encoder (2D RoPE, variable
    image sizes, [IMG_BREAK] after each row of patches)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tok, ids, text, vision = pixtral_parts()
    cfg = pixtral_config(LlavaConfig, text, vision, ids)
    return _save_pixtral_like(out_dir, seed, LlavaForConditionalGeneration, cfg, tok, ids, 32, 1)


def build_tiny_mistral3(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Mistral Small 3.1 / 3.2 vision (model_type mistral3): a Pixtral encoder, a projector that
    merges 2x2 patches (`patch_merger`) before its MLP, and a Mistral decoder; PixtralProcessor
    with spatial_merge_size 2."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tok, ids, text, vision = pixtral_parts()
    cfg = pixtral_config(Mistral3Config, text, vision, ids)
    return _save_pixtral_like(out_dir, seed, Mistral3ForConditionalGeneration, cfg, tok, ids, 64, 2)


FAMILIES = [
    Family(
        name="pixtral",
        model_types=("llava:pixtral",),
        compile_measured=True,
        offload_quantized=True,  # 4-bit: 8.00 instead of 9.47 GiB (Unsloth 8.28), 0.98x speed
        # 16-bit at full depth (40 / 24 layers): 27.96 instead of 34.52 GiB (Unsloth 31.12) at
        # 0.92x the speed; with the checkpoint compiled over the offloader (2026-12-06, H100)
        # 28.72 GiB at 1.09x offloading's speed.
        offload_16bit=True,
        build_tiny=build_tiny_pixtral,
        causal_text=True,
        **{
            **PIXTRAL_ENCODER,
            # 16-bit, one call on an H200 (2026-12-04): 1.08x (28,317 vs 26,249 tok/s), peak
            # 13.68 vs 12.92 GiB. Decoder layers only: the vision layers' block attention is
            # eager (a graph break), which a compiled checkpoint cannot hold.
            "patches": MappingProxyType(
                {**PIXTRAL_ENCODER["patches"], "compiled_checkpoint": ("MistralDecoderLayer",)}
            ),
        },
    ),
    Family(
        name="mistral3",
        compile_measured=True,
        build_tiny=build_tiny_mistral3,
        causal_text=True,
        **PIXTRAL_ENCODER,
    ),
]
