"""LLaVA-OneVision (`llava-hf/llava-onevision-qwen2-7b-ov-hf`, model_type llava_onevision): the
SigLIP tower and MLP projector of the `llava` entries in front of a Qwen2 decoder, ChatML turns
closed by `<|im_end|>`. A lone image in a sample is cut into any-res tiles (pixel_values
(images, tiles, C, H, W), tile counts zero-padded across samples), the images of a multi-image
sample are not, which the model reads off `batch_num_images` (one entry per sample with images:
concatenated, it lines up with the images). Videos are quarantined by the data stage."""

from __future__ import annotations

import os
from pathlib import Path

from ..tiny import finish, llama_text, random_model, save_tiny, vit
from .base import CHATML, CLIP_TOWER, TEXT_PARTS, Family
from .qwen_vl import qwen_tokenizer

# llava-hf's OneVision template: a turn's images first (`<image>\n` each), then its text, every
# turn closed by `<|im_end|>\n`.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is not string %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    + TEXT_PARTS
    + "<|im_end|>{% endgeneration %}\n"
    "{% else %}" + TEXT_PARTS + "<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def onevision_tokenizer():
    """(tokenizer, ids): Qwen's with `<image>` and `<video>`."""
    return qwen_tokenizer(("<image>", "<video>"))


def onevision_config(text: dict, vision: dict, ids: dict, grid: list):
    """LlavaOnevisionConfig as llava-hf's checkpoints set it (every patch of the last layer,
    `anyres_max_9`), for the decoder `text`, the SigLIP `vision` and the any-res `grid`."""
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        image_grid_pinpoints=grid,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )


def build_tiny_llava_onevision(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """LLaVA-OneVision: SigLIP tower (32 px, 16 tokens a view, all kept) + MLP projector + Qwen2;
    a lone image gets any-res tiles over a 32/64 px grid and the learned newline token."""
    from transformers import (
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tok, ids = onevision_tokenizer()
    text = llama_text(tok, ids, "<|im_end|>", "<|endoftext|>", "<|endoftext|>", model_type="qwen2")
    vision = vit(
        model_type="siglip_vision_model", image_size=32, patch_size=8, vision_use_head=False
    )
    grid = [[32, 32], [32, 64], [64, 32], [64, 64]]
    cfg = onevision_config(text, vision, ids, grid)
    model = random_model(LlavaOnevisionForConditionalGeneration, cfg, seed)
    finish(model, ids["<|im_end|>"], ids["<|endoftext|>"])
    tile = {"height": 32, "width": 32}
    proc = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=tile, image_grid_pinpoints=grid),
        tokenizer=tok,
        video_processor=LlavaOnevisionVideoProcessor(size=tile),
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )
    return save_tiny(model, proc, out_dir)


FAMILIES = [
    Family(
        name="llava_onevision",
        **CLIP_TOWER,
        image_tokens=("<image>",),
        **CHATML,
        build_tiny=build_tiny_llava_onevision,
        causal_text=True,
        compile_measured=True,  # regional compile measured on an H200 (BENCHMARKS.md)
    ),
]
