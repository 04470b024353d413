"""Idefics3 and SmolVLM v1 (model_type idefics3), SmolVLM2 (model_type smolvlm: the same
architecture under new class names): a SigLIP-like tower, a pixel-shuffle connector and a
Llama-style text model named `text_model`."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

from ..tiny import fast_tokenizer, finish, llama_text, random_model, save_tiny, vit
from .base import CLIP_ATTN, CLIP_MLP, TEXT_PARTS, Family, user_parts

# Idefics3 / SmolVLM: User:<image>question<end_of_utterance>\nAssistant: answer<end_of_utterance>
IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% if message['role'] == 'assistant' %}{% generation %} "
    + TEXT_PARTS
    + "<end_of_utterance>{% endgeneration %}\n"
    "{% else %}" + user_parts("<image>") + "<end_of_utterance>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


IDEFICS3_SPECIALS = [
    "<|begin_of_text|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    # row/column markers of up to 6x6 crops
    *[f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)],
]


def idefics3_tokenizer():
    """(tokenizer, ids) of Idefics3 / SmolVLM: pad == eos == <end_of_utterance>."""
    eou = "<end_of_utterance>"
    return fast_tokenizer(
        IDEFICS3_SPECIALS, bos_token="<|begin_of_text|>", eos_token=eou, pad_token=eou
    )


def idefics3_config(config_class, text: dict, vision: dict, ids: dict):
    """An Idefics3 / SmolVLM config: pixel shuffle by 2, padding with <end_of_utterance>."""
    return config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<image>"],
        scale_factor=2,
        pad_token_id=ids["<end_of_utterance>"],
        tie_word_embeddings=False,
    )


def build_tiny_idefics3(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Idefics3 (SmolVLM v1's architecture): SigLIP-like tower + pixel-shuffle connector + Llama.
    pad == eos == <end_of_utterance>, as in SmolVLM's released tokenizer."""
    return _build_idefics3_like(out_dir, seed, smolvlm=False)


def build_tiny_smolvlm(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """SmolVLM2 (model_type smolvlm): the Idefics3 architecture with its own processor."""
    return _build_idefics3_like(out_dir, seed, smolvlm=True)


def _build_idefics3_like(out_dir, seed: int, smolvlm: bool) -> Path:
    import transformers as tr

    prefix = "SmolVLM" if smolvlm else "Idefics3"
    tok, ids = idefics3_tokenizer()
    eou = ids["<end_of_utterance>"]
    eos = "<end_of_utterance>"
    text = llama_text(tok, ids, eos, eos, "<|begin_of_text|>", model_type="llama")
    vision = vit(image_size=32, patch_size=8)
    cfg = idefics3_config(getattr(tr, f"{prefix}Config"), text, vision, ids)
    model = random_model(getattr(tr, f"{prefix}ForConditionalGeneration"), cfg, seed)
    finish(model, eou, eou, ids["<|begin_of_text|>"])
    image_processor = getattr(tr, f"{prefix}ImageProcessor")(
        size={"longest_edge": 64},
        max_image_size={"longest_edge": 32},
        do_image_splitting=True,
    )
    kwargs = dict(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_len=4,  # (image_size / patch_size)^2 / scale_factor^2
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    if smolvlm:
        kwargs["video_processor"] = tr.SmolVLMVideoProcessor()
    proc = getattr(tr, f"{prefix}Processor")(**kwargs)
    return save_tiny(model, proc, out_dir)


IDEFICS3 = Family(
    name="idefics3",
    vision_layers=r"model\.vision_model\.encoder\.layers\.\d+",
    language_layers=r"model\.text_model\.layers\.\d+",
    vision_attention=CLIP_ATTN,
    vision_mlp=CLIP_MLP,
    vision_tower=("model.vision_model",),
    projector=("model.connector",),
    response_part="\nAssistant:",
    instruction_part="User:",
    end_of_turn="<end_of_utterance>",
    image_tokens=("<image>", "<fake_token_around_image>", "<global-img>"),
    # pixel_values (1, images x crops, C, H, W); all-zero images are padding to the model
    batch_layout=MappingProxyType({"pixel_values": "sample", "pixel_attention_mask": "sample"}),
    build_tiny=build_tiny_idefics3,
    causal_text=True,
    compile_measured=True,  # regional compile 1.19x on an H200 (BENCHMARKS.md)
)

FAMILIES = [
    IDEFICS3,
    # SmolVLM: the same model code, compile not measured on it
    replace(
        IDEFICS3,
        name="smolvlm",
        model_types=("smolvlm",),
        build_tiny=build_tiny_smolvlm,
        compile_measured=False,
    ),
]
