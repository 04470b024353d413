"""LLaVA-1.5 (`llava`) and LLaVA-NeXT (`llava_next`, any-res tiles): a CLIP vision tower and an
MLP projector in front of a Llama / Mistral decoder. Both released chat templates fail to close
assistant turns with `</s>`: the entries carry templates that do."""

from __future__ import annotations

import os
from pathlib import Path

from ..tiny import fast_tokenizer, finish, llama_text, random_model, save_tiny, vit
from .base import CLIP_TOWER, TEXT_PARTS, Family, user_parts
from .mistral import MISTRAL_SPECIALS, mistral_text

# Vicuna v1 format that LLaVA-1.5 was trained with; llava-hf's shipped template drops the </s>.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %} "
    "{% elif message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %} "
    "{% else %}ASSISTANT:{% generation %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %} {{ c['text'] }}{% endif %}"
    "{% endfor %}</s>{% endgeneration %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Mistral-instruct format of llava-v1.6-mistral; the shipped template writes `<\s>` for `</s>`.
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %} {{ c['text'] }}{% endif %}"
    "{% endfor %}</s>{% endgeneration %}"
    "{% else %}[INST] "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %} [/INST]"
    "{% endif %}{% endfor %}"
)

# llava-hf/llava-1.5-*-hf ships this template: it never closes an assistant turn with </s>, so a
# model trained on it never learns to stop. vlmflow replaces it (Family.chat_template) and the
# tiny model keeps it so that the fix is tested.
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# The tiny LLaVA-NeXT's template (Mistral backbone): [INST] <image>\nquestion [/INST] answer</s>
LLAVA_NEXT_TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% generation %} "
    + TEXT_PARTS
    + "{{ eos_token }}{% endgeneration %}"
    "{% else %}[INST] " + user_parts("<image>\n") + " [/INST]{% endif %}"
    "{% endfor %}"
)


def clip_vision() -> dict:
    """Vision config of a tiny CLIP tower (32 px images, 8 px patches)."""
    return vit(model_type="clip_vision_model", image_size=32, patch_size=8, projection_dim=32)


LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


def llava_tokenizer(next_: bool = False):
    """(tokenizer, ids) of LLaVA-1.5 (Llama's specials), or of LLaVA-NeXT (Mistral's)."""
    specials = [*MISTRAL_SPECIALS, "<image>"] if next_ else LLAVA_SPECIALS
    return fast_tokenizer(specials, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _save_llava_like(out_dir, seed, model_class, cfg, tok, ids, processor) -> Path:
    model = random_model(model_class, cfg, seed)
    finish(model, ids["</s>"], ids["<pad>"], ids["<s>"])
    return save_tiny(model, processor(), out_dir)


def build_tiny_llava(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """LLaVA-1.5: CLIP vision tower (penultimate layer, CLS dropped) + MLP projector + Llama."""
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok, ids = llava_tokenizer()
    text = llama_text(tok, ids, "</s>", "<pad>", "<s>", model_type="llama")
    cfg = LlavaConfig(
        text_config=text,
        vision_config=clip_vision(),
        image_token_index=ids["<image>"],
        image_seq_length=16,
        tie_word_embeddings=False,
    )

    def processor():
        return LlavaProcessor(
            image_processor=CLIPImageProcessor(
                size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
            ),
            tokenizer=tok,
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA_HF_CHAT_TEMPLATE,
        )

    return _save_llava_like(out_dir, seed, LlavaForConditionalGeneration, cfg, tok, ids, processor)


def build_tiny_llava_next(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """LLaVA-NeXT (1.6): CLIP tower over a base view + high-resolution tiles (any-res grid)."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok, ids = llava_tokenizer(next_=True)
    grid = [[32, 32], [32, 64], [64, 32]]
    cfg = LlavaNextConfig(
        text_config=mistral_text(tok, ids),
        vision_config=clip_vision(),
        image_token_index=ids["<image>"],
        image_grid_pinpoints=grid,
        image_seq_length=16,
        tie_word_embeddings=False,
    )

    def processor():
        return LlavaNextProcessor(
            image_processor=LlavaNextImageProcessor(
                size={"shortest_edge": 32},
                crop_size={"height": 32, "width": 32},
                image_grid_pinpoints=grid,
            ),
            tokenizer=tok,
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA_NEXT_TINY_CHAT_TEMPLATE,
        )

    return _save_llava_like(
        out_dir, seed, LlavaNextForConditionalGeneration, cfg, tok, ids, processor
    )


_LLAVA = dict(**CLIP_TOWER, end_of_turn="</s>", image_tokens=("<image>",))

FAMILIES = [
    Family(
        name="llava",
        response_part=" ASSISTANT:",
        instruction_part="USER:",
        chat_template=LLAVA_CHAT_TEMPLATE,
        build_tiny=build_tiny_llava,
        **_LLAVA,
    ),
    Family(
        name="llava_next",
        response_part="[/INST]",
        instruction_part="[INST]",
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
        build_tiny=build_tiny_llava_next,
        **_LLAVA,
    ),
]
