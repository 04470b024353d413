"""Llama 3.2 Vision (mllama): a tile-based ViT (local + global transformer) feeding gated
cross-attention decoder layers (`cross_attn`), which count as language attention."""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType

import torch

from ..tiny import VISION_WIDTHS, fast_tokenizer, finish, llama_text, random_model, save_tiny
from .base import CLIP_MLP, TEXT_PARTS, Family, user_parts

LLAMA3_CHAT_TEMPLATE = (
    "<|begin_of_text|>"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    + TEXT_PARTS
    + "<|eot_id|>{% endgeneration %}"
    "{% else %}" + user_parts("<|image|>") + "<|eot_id|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
    "<|python_tag|>",
    "<|image|>",
]


def llama3_tokenizer():
    """(tokenizer, ids) with Llama 3's special tokens."""
    return fast_tokenizer(
        LLAMA3_SPECIALS,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
    )


def build_tiny_mllama(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Llama 3.2 Vision: a 3-layer decoder whose layer 1 is a gated cross-attention layer. The
    gates start at zero (images would get no gradient): they are initialised randomly."""
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessor,
        MllamaProcessor,
    )

    tok, ids = llama3_tokenizer()
    text = llama_text(
        tok,
        ids,
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
        "<|begin_of_text|>",
        num_hidden_layers=3,
        cross_attention_layers=[1],
    )
    vision = dict(
        **VISION_WIDTHS,
        num_global_layers=1,
        attention_heads=2,
        vision_output_dim=64,  # hidden_size * (1 + len(intermediate_layers_indices))
        intermediate_layers_indices=[0],
        image_size=28,
        patch_size=14,
        max_num_tiles=2,
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
    )
    cfg = MllamaConfig(text_config=text, vision_config=vision, image_token_index=ids["<|image|>"])
    model = random_model(MllamaForConditionalGeneration, cfg, seed)
    with torch.no_grad():  # the gates start at zero: images would get no gradient
        for name, p in model.named_parameters():
            if "gate" in name and p.ndim <= 1 and not p.any():
                p.uniform_(0.5, 1.0)
    finish(model, ids["<|eot_id|>"], ids["<|finetune_right_pad_id|>"], ids["<|begin_of_text|>"])
    proc = MllamaProcessor(
        image_processor=MllamaImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=2),
        tokenizer=tok,
        chat_template=LLAMA3_CHAT_TEMPLATE,
    )
    return save_tiny(model, proc, out_dir)


FAMILIES = [
    Family(
        name="mllama",
        compile_measured=True,
        patches=MappingProxyType(
            {
                "tile_attention": ("MllamaVisionAttention",),
                "saved_attention": (
                    "MllamaVisionEncoderLayer",
                    "MllamaSelfAttentionDecoderLayer",
                    "MllamaCrossAttentionDecoderLayer",
                ),
            }
        ),
        vision_layers=r"model\.vision_model\.(?:transformer|global_transformer)\.layers\.\d+",
        vision_attention=r"self_attn\.(?:q_proj|k_proj|v_proj|o_proj)",
        vision_mlp=CLIP_MLP,
        language_attention=r"(?:self_attn|cross_attn)\.(?:q_proj|k_proj|v_proj|o_proj)",
        vision_tower=("model.vision_model",),
        response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
        instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
        end_of_turn="<|eot_id|>",
        image_tokens=("<|image|>",),
        # pixel_values (1, images, tiles, C, H, W) and the aspect-ratio tensors are per sample
        batch_layout=MappingProxyType(
            {"pixel_values": "sample", "aspect_ratio_ids": "sample", "aspect_ratio_mask": "sample"}
        ),
        # (T, images, tiles): which image tiles each token attends to
        token_keys=MappingProxyType({"cross_attention_mask": 0}),
        build_tiny=build_tiny_mllama,
        causal_text=True,
    ),
]
