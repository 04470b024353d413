"""Gemma 4 (dense: E2B/E4B/12B/31B): a ViT with 2-D RoPE whose linears are wrapped in
`Gemma4ClippableLinear` (LoRA goes on the inner `.linear`), pooled soft tokens projected by
`embed_vision`, a decoder with sliding and full attention layers and a final logit softcap."""

from __future__ import annotations

import os
from pathlib import Path

from ..tiny import fast_tokenizer, finish, llama_text, random_model, save_tiny, vit
from .base import TEXT_PARTS, Family, user_parts

# Gemma 4: <bos><|turn>user\n...<turn|>\n<|turn>model\nanswer<turn|>\n; an image is the
# placeholder <|image|>, which the processor expands to <|image> + soft tokens + <image|>.
GEMMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    + TEXT_PARTS
    + "<turn|>{% endgeneration %}\n"
    "{% else %}" + user_parts("<|image|>") + "<turn|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)

GEMMA4_SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<|turn>",
    "<turn|>",
    "<|image>",
    "<image|>",
    "<|image|>",
    "<|audio>",
    "<audio|>",
    "<|audio|>",
]


# The named special tokens (tokenizer attributes the processor reads; `<name>_id` in the config).
GEMMA4_NAMED_TOKENS = {
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "image_token": "<|image|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "audio_token": "<|audio|>",
}


def gemma4_tokenizer():
    """Gemma 4's named special tokens (the processor reads them off the tokenizer)."""
    return fast_tokenizer(
        GEMMA4_SPECIALS,
        bos_token="<bos>",
        eos_token="<turn|>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=GEMMA4_NAMED_TOKENS,
    )


def gemma4_special_ids(ids: dict) -> dict:
    """The special-token ids of a `Gemma4Config` (images and audio), from the tokenizer's."""
    out = {f"{name}_id": ids[token] for name, token in GEMMA4_NAMED_TOKENS.items()}
    out["eoa_token_index"] = out.pop("eoa_token_id")  # Gemma4Config's name for it
    return out


def build_tiny_gemma4(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Gemma 4 (dense, like gemma-4-31B: no per-layer embeddings): a ViT with 2-D RoPE over
    variable-size patch grids, pooled to soft tokens (`embed_vision` projects them) + a decoder
    with sliding and full attention layers (the full ones with their own head_dim)."""
    from transformers import (
        Gemma4AudioFeatureExtractor,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4VideoProcessor,
    )

    tok, ids = gemma4_tokenizer()
    text = llama_text(
        tok,
        ids,
        "<turn|>",
        "<pad>",
        "<bos>",
        head_dim=16,
        global_head_dim=32,
        attention_k_eq_v=True,  # full layers: keys double as values, no v_proj (as in 31B)
        num_global_key_value_heads=1,
        sliding_window=256,  # past the 70 soft tokens of an image
        layer_types=["sliding_attention", "full_attention"],
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=len(tok),
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
    )
    # 4 px patches pooled 2x2, at most 70 soft tokens an image (past them: the sliding window)
    patches = dict(patch_size=4, pooling_kernel_size=2)
    vision = vit(num_key_value_heads=2, head_dim=16, position_embedding_size=64, **patches)
    cfg = Gemma4Config(
        text_config=text,
        vision_config=vision,
        **gemma4_special_ids(ids),
        tie_word_embeddings=True,
    )
    model = random_model(Gemma4ForConditionalGeneration, cfg, seed)
    finish(model, ids["<turn|>"], ids["<pad>"], ids["<bos>"])
    proc = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(**patches, max_soft_tokens=70),
        tokenizer=tok,
        video_processor=Gemma4VideoProcessor(**patches, max_soft_tokens=70),
        image_seq_length=70,
        chat_template=GEMMA4_CHAT_TEMPLATE,
    )
    return save_tiny(model, proc, out_dir)


FAMILIES = [
    Family(
        # The per-layer-embedding linears of E2B/E4B (per_layer_input_gate,
        # per_layer_projection) are neither attention nor MLP: not targeted.
        name="gemma4",
        vision_layers=r"model\.vision_tower\.encoder\.layers\.\d+",
        vision_attention=r"self_attn\.(?:q_proj|k_proj|v_proj|o_proj)\.linear",
        vision_mlp=r"mlp\.(?:gate_proj|up_proj|down_proj)\.linear",
        projector=("model.embed_vision",),
        response_part="<|turn>model\n",
        instruction_part="<|turn>user\n",
        end_of_turn="<turn|>",
        image_tokens=("<|image|>", "<|image>", "<image|>"),
        compile_measured=True,
        build_tiny=build_tiny_gemma4,
    ),
]
