"""InternVL 3 / 3.5 in the HF format (`OpenGVLab/InternVL3_5-8B-HF`, model_type internvl; the
trust_remote_code checkpoints without -HF are another format): InternViT blocks
`encoder.layer.N` whose attention output is `projection_layer`, a pixel-shuffle + MLP projector,
a Qwen2.5 / Qwen3 decoder, ChatML turns closed by `<|im_end|>`. An image is the placeholder
<IMG_CONTEXT>, which the processor expands to <img> + 256 <IMG_CONTEXT> per 448 px tile +
</img>; the tiles (pixel_values (tiles, C, H, W)) concatenate along dim 0 like LLaVA's images."""

from __future__ import annotations

import os
from pathlib import Path

from ..tiny import finish, llama_text, random_model, save_tiny, vit
from .base import CHATML, CLIP_MLP, Family
from .qwen_vl import QWEN_CHAT_TEMPLATE, qwen_tokenizer

INTERNVL_SPECIALS = ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")
# InternVL's HF template: a turn's parts in order, an image is `<IMG_CONTEXT>\n`, every turn
# closed by `<|im_end|>\n`.
INTERNVL_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace(
    "<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n"
)


def internvl_tokenizer():
    """(tokenizer, ids): Qwen's with InternVL's image tokens, named as the processor reads them."""
    return qwen_tokenizer(
        INTERNVL_SPECIALS,
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )


def build_tiny_internvl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """InternVL 3.5 (HF format): InternViT (32 px tiles of 8 px patches) + pixel shuffle (4
    tokens a tile) + MLP projector + Qwen3 decoder; InternVLProcessor with the GOT-OCR2 image
    processor cutting an image into up to 4 tiles plus a thumbnail."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    tok, ids = internvl_tokenizer()
    text = llama_text(
        tok, ids, "<|im_end|>", "<|endoftext|>", "<|endoftext|>", model_type="qwen3", head_dim=16
    )
    cfg = InternVLConfig(
        text_config=text,
        vision_config=vit(image_size=32, patch_size=8),
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=4,  # (32 / 8)^2 patches, pixel-shuffled by downsample_ratio 0.5
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    model = random_model(InternVLForConditionalGeneration, cfg, seed)
    finish(model, ids["<|im_end|>"], ids["<|endoftext|>"])
    tile = {"height": 32, "width": 32}
    proc = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            size=tile, crop_to_patches=True, min_patches=1, max_patches=4
        ),
        tokenizer=tok,
        video_processor=InternVLVideoProcessor(size=tile),
        image_seq_length=4,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    return save_tiny(model, proc, out_dir)


FAMILIES = [
    Family(
        name="internvl",
        vision_layers=r"model\.vision_tower\.encoder\.layer\.\d+",
        vision_attention=r"attention\.(?:q_proj|k_proj|v_proj|projection_layer)",
        vision_mlp=CLIP_MLP,
        image_tokens=("<IMG_CONTEXT>", "<img>", "</img>"),
        **CHATML,
        build_tiny=build_tiny_internvl,
        causal_text=True,
        compile_measured=True,  # regional compile measured on an H200 (BENCHMARKS.md)
    ),
]
