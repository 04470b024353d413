"""LLaVA-1.5 (`llava`) and LLaVA-NeXT (`llava_next`, any-res tiles): a CLIP vision tower and an
MLP projector in front of a Llama / Mistral decoder. Both released chat templates fail to close
assistant turns with `</s>`: the entries carry templates that do."""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType

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


def llava_processor(processor_class, image_processor, tok, patch_size: int, template: str):
    """A LLaVA-1.5 / LLaVA-NeXT processor as llava-hf's checkpoints set it: the CLS token
    counted, then dropped (`vision_feature_select_strategy` "default")."""
    return processor_class(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )


def build_tiny_llava(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """LLaVA-1.5: CLIP vision tower (penultimate layer, CLS dropped) + MLP projector + Llama."""
    return _build_llava_like(out_dir, seed, next_=False)


def build_tiny_llava_next(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """LLaVA-NeXT (1.6): CLIP tower over a base view + high-resolution tiles (any-res grid)."""
    return _build_llava_like(out_dir, seed, next_=True)


def _build_llava_like(out_dir, seed: int, next_: bool) -> Path:
    """LLaVA-1.5 (a Llama decoder, llava-hf's template) or LLaVA-NeXT (a Mistral decoder, any-res
    tiles over a 32/64 px grid): the same CLIP tower, 16 tokens a view."""
    import transformers as tr

    prefix = "LlavaNext" if next_ else "Llava"
    tok, ids = llava_tokenizer(next_=next_)
    crop = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    if next_:
        text = mistral_text(tok, ids)
        grid = dict(image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]])
        image_processor = tr.LlavaNextImageProcessor(**crop, **grid)
        template = LLAVA_NEXT_TINY_CHAT_TEMPLATE
    else:
        text = llama_text(tok, ids, "</s>", "<pad>", "<s>", model_type="llama")
        grid = {}
        image_processor = tr.CLIPImageProcessor(**crop)
        template = LLAVA_HF_CHAT_TEMPLATE
    cfg = getattr(tr, f"{prefix}Config")(
        text_config=text,
        vision_config=clip_vision(),
        image_token_index=ids["<image>"],
        image_seq_length=16,
        tie_word_embeddings=False,
        **grid,
    )
    model = random_model(getattr(tr, f"{prefix}ForConditionalGeneration"), cfg, seed)
    finish(model, ids["</s>"], ids["<pad>"], ids["<s>"])
    proc = llava_processor(getattr(tr, f"{prefix}Processor"), image_processor, tok, 8, template)
    return save_tiny(model, proc, out_dir)


# compile_measured: regional compile 1.26x (LLaVA) / 1.23x (LLaVA-NeXT) on an H200 (BENCHMARKS.md)
_LLAVA = dict(
    **CLIP_TOWER,
    end_of_turn="</s>",
    image_tokens=("<image>",),
    compile_measured=True,
    causal_text=True,
)

FAMILIES = [
    Family(
        name="llava",
        response_part=" ASSISTANT:",
        instruction_part="USER:",
        chat_template=LLAVA_CHAT_TEMPLATE,
        build_tiny=build_tiny_llava,
        # 16-bit at full depth (32 / 24 layers), one call on an H100 (2026-12-06): 14.62 instead
        # of 15.46 GiB (Unsloth 15.22) at 0.99x the speed.
        offload_16bit=True,
        **_LLAVA,
    ),
    Family(
        name="llava_next",
        response_part="[/INST]",
        instruction_part="[INST]",
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
        build_tiny=build_tiny_llava_next,
        # 16-bit, one call on an H200 (2026-12-04), llava-v1.6-mistral widths: 1.10x (45,013 vs
        # 40,763 tok/s), peak 8.39 vs 7.69 GiB. LLaVA-1.5 (Llama) gained 1.01x: not declared
        # there; a Vicuna-based LLaVA-NeXT (LlamaDecoderLayer) was not measured.
        patches=MappingProxyType(
            {"compiled_checkpoint": ("MistralDecoderLayer", "CLIPEncoderLayer")}
        ),
        # 16-bit at full depth (32 / 24 layers): 17.70 instead of 21.76 GiB (Unsloth 20.29) at
        # 0.98x the speed; with the checkpoint compiled over the offloader (2026-12-06, H100)
        # 18.40 GiB at 1.06x offloading's speed, 1.25x Unsloth's.
        offload_16bit=True,
        **_LLAVA,
    ),
]
