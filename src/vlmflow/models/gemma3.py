"""Gemma 3: a SigLIP tower and an average-pooled projector (a bare weight, no nn.Linear) in
front of a Gemma 3 decoder with sliding and full attention layers."""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType

import torch

from ..tiny import fast_tokenizer, finish, llama_text, random_model, save_tiny, vit
from .base import CLIP_TOWER, TEXT_PARTS, Family, user_parts

GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    + TEXT_PARTS
    + "<end_of_turn>{% endgeneration %}\n"
    "{% else %}" + user_parts("<start_of_image>") + "<end_of_turn>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

GEMMA3_SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]


def gemma3_tokenizer():
    """Gemma 3's processor needs the named special tokens `boi_token`, `eoi_token`,
    `image_token` on its tokenizer."""
    return fast_tokenizer(
        GEMMA3_SPECIALS,
        bos_token="<bos>",
        eos_token="<end_of_turn>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )


def build_tiny_gemma3(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Gemma 3: SigLIP tower + pooled projector (4 tokens per image) + Gemma 3 decoder. The
    projector weight starts at zero (images would get no gradient): it is initialised randomly."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    tok, ids = gemma3_tokenizer()
    text = llama_text(
        tok,
        ids,
        "<end_of_turn>",
        "<pad>",
        "<bos>",
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=True,
    )
    vision = vit(
        model_type="siglip_vision_model", image_size=32, patch_size=8, vision_use_head=False
    )
    cfg = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        tie_word_embeddings=True,
    )
    model = random_model(Gemma3ForConditionalGeneration, cfg, seed)
    with torch.no_grad():  # the projector starts at zero: images would get no gradient
        w = model.model.multi_modal_projector.mm_input_projection_weight
        if not w.any():
            w.normal_(0.0, 0.05)
    finish(model, ids["<end_of_turn>"], ids["<pad>"], ids["<bos>"])
    proc = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tok,
        image_seq_length=4,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    return save_tiny(model, proc, out_dir)


FAMILIES = [
    Family(
        name="gemma3",
        compile_measured=True,
        # 4-bit, one call on an H200 (2026-12-04): 10,266 tok/s at 3.21 GiB offloaded, 9,637 at
        # 3.67 plain (Unsloth 3.84)
        offload_quantized=True,
        # 16-bit is not offloaded: at full depth (34 / 27 layers, one H100, 2026-12-06) plain
        # 5,261 tok/s at 10.78 GiB, offloaded 4,530 at 9.61, Unsloth 3,467 at 10.15.
        # compiled_checkpoint measured on an H200 (BENCHMARKS.md, 2026-12-03): 1.14x, same
        # peak; Qwen3-VL was not faster with it and took 0.21 GiB more, so other families keep
        # the default checkpoint.
        # saved_attention is not declared: 1.13-1.29x in every layer but 0.44 GiB more, above
        # Unsloth's peak; in the decoder layers alone no faster (BENCHMARKS.md, 2026-12-03).
        patches=MappingProxyType(
            {"compiled_checkpoint": ("Gemma3DecoderLayer", "SiglipEncoderLayer")}
        ),
        **CLIP_TOWER,
        response_part="<start_of_turn>model\n",
        instruction_part="<start_of_turn>user\n",
        end_of_turn="<end_of_turn>",
        image_tokens=("<image_soft_token>", "<start_of_image>", "<end_of_image>"),
        build_tiny=build_tiny_gemma3,
    ),
]
