"""Tiny random-weight models with real processors, built offline: one builder per family.

Tests and the demo use them in place of hub checkpoints: they are saved with `save_pretrained`
and loaded back through the same `AutoModelForImageTextToText` / `AutoProcessor`
`from_pretrained` path as e.g. `Qwen/Qwen2.5-VL-7B-Instruct`. Each has the real architecture
class, processor class and chat-template format of its family (same special tokens and turn
markers), at ~100k-300k parameters with tiny images. The tokenizer is a byte-level BPE trained
here with `tokenizers`.

Traps handled here (they would make a test pass for the wrong reason or fail for no reason):
Gemma 3's projector weight and Mllama's cross-attention gates start at zero (images would get
no gradient): they are initialised randomly; Gemma 3's processor needs the named special tokens
`boi_token`, `eoi_token`, `image_token` on its tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

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

# Chat templates in the format of each family's released checkpoints, with `{% generation %}`
# markers around assistant turns. Content is either a string or a list of typed parts.
_TEXT_PARTS = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
)


def _user_parts(image: str) -> str:
    return (
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for c in message['content'] %}"
        f"{{% if c['type'] == 'image' %}}{image}"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    )


QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    + _TEXT_PARTS
    + "<|im_end|>{% endgeneration %}\n"
    "{% else %}" + _user_parts("<|vision_start|><|image_pad|><|vision_end|>") + "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAMA3_CHAT_TEMPLATE = (
    "<|begin_of_text|>"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    + _TEXT_PARTS
    + "<|eot_id|>{% endgeneration %}"
    "{% else %}" + _user_parts("<|image|>") + "<|eot_id|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Pixtral / Mistral: <s>[INST]...[/INST]answer</s>
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    + _TEXT_PARTS
    + "{{ eos_token }}{% endgeneration %}"
    "{% else %}[INST]" + _user_parts("[IMG]") + "[/INST]{% endif %}"
    "{% endfor %}"
)

# llava-hf/llava-1.5-*-hf ships this template: it never closes an assistant turn with </s>, so a
# model trained on it never learns to stop. vlmflow replaces it (see families.Family.chat_template)
# and the tiny model keeps it so that the fix is tested.
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

# LLaVA-NeXT (Mistral backbone): [INST] <image>\nquestion [/INST] answer</s>
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% generation %} "
    + _TEXT_PARTS
    + "{{ eos_token }}{% endgeneration %}"
    "{% else %}[INST] " + _user_parts("<image>\n") + " [/INST]{% endif %}"
    "{% endfor %}"
)

GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    + _TEXT_PARTS
    + "<end_of_turn>{% endgeneration %}\n"
    "{% else %}" + _user_parts("<start_of_image>") + "<end_of_turn>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# Idefics3 / SmolVLM: User:<image>question<end_of_utterance>\nAssistant: answer<end_of_utterance>
IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% if message['role'] == 'assistant' %}{% generation %} "
    + _TEXT_PARTS
    + "<end_of_utterance>{% endgeneration %}\n"
    "{% else %}" + _user_parts("<image>") + "<end_of_utterance>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# Text the byte-level BPE is trained on: enough for chat roles, the demo prompt and answers.
_CORPUS = [
    "system user assistant",
    "Which digit is written in this image? The answer is 0 1 2 3 4 5 6 7 8 9",
    "What is in this image? Describe the picture in detail.",
    "the quick brown fox jumps over the lazy dog, a red circle on a white background.",
    "zero one two three four five six seven eight nine ten yes no",
]


def train_bpe_tokenizer(specials: list[str], vocab_size: int = 512):
    """A byte-level BPE `tokenizers.Tokenizer` trained on a small built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return tok


def _fast_tokenizer(specials: list[str], **kwargs):
    """A `PreTrainedTokenizerFast` over a fresh byte-level BPE with `specials` as special tokens.
    kwargs: bos/eos/pad tokens and `extra_special_tokens` (named ones become attributes)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=train_bpe_tokenizer(specials), **kwargs)


def _ids(tok, names) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in names}


def _llama_text(tok, ids: dict, **extra) -> dict:
    """Text-config kwargs of a 2-layer, 64-wide Llama-style decoder."""
    out = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    out.update(ids)
    out.update(extra)
    return out


def _finish(model, eos_id: int, pad_id: int, bos_id: int | None = None) -> None:
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    if bos_id is not None:
        model.generation_config.bos_token_id = bos_id


def _qwen_tokenizer():
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast(
        tokenizer_object=train_bpe_tokenizer(QWEN_SPECIALS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
    )


def _qwen_text(tok, ids) -> dict:
    return _llama_text(
        tok,
        dict(
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    )


def _qwen_tokens(ids) -> dict:
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def build_tiny_qwen2_5_vl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Save a ~300k-parameter Qwen2.5-VL with its processor into `out_dir`."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = _qwen_tokenizer()
    ids = _ids(tok, QWEN_SPECIALS)
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[1],
        tokens_per_second=2,
    )
    cfg = Qwen2_5_VLConfig(
        text_config=_qwen_text(tok, ids),
        vision_config=vision,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
        **_qwen_tokens(ids),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    _finish(model, ids["<|im_end|>"], ids["<|endoftext|>"])
    proc = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=28 * 28 * 64),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return _save(model, proc, out_dir)


def build_tiny_qwen2_vl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = _qwen_tokenizer()
    ids = _ids(tok, QWEN_SPECIALS)
    vision = dict(
        depth=2,
        embed_dim=32,
        hidden_size=64,
        mlp_ratio=2,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    cfg = Qwen2VLConfig(
        text_config=_qwen_text(tok, ids),
        vision_config=vision,
        tie_word_embeddings=False,
        **_qwen_tokens(ids),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    _finish(model, ids["<|im_end|>"], ids["<|endoftext|>"])
    proc = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=28 * 28 * 64),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return _save(model, proc, out_dir)


def build_tiny_qwen3_vl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    return _build_qwen3(Qwen3VLConfig, Qwen3VLForConditionalGeneration, out_dir, seed)


def _qwen3_text(tok, ids, *, linear_attention: bool = False, **extra) -> dict:
    """Text config of the Qwen3-VL decoder (interleaved M-RoPE), or with `linear_attention`
    Qwen3.5's hybrid: layer 0 a Gated DeltaNet, layer 1 full (gated) attention with partial
    rotary, as the released 3:1 pattern alternates them."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    if linear_attention:
        rope.update(partial_rotary_factor=0.5, mrope_section=[2, 1, 1])
        extra.update(
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            layer_types=["linear_attention", "full_attention"],
        )
    return _llama_text(
        tok,
        dict(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        head_dim=16,
        **extra,
        rope_parameters={**rope, "mrope_interleaved": True},
    )


def _build_qwen3(config_cls, model_cls, out_dir, seed: int, **text) -> Path:
    """A Qwen3-VL-style model: the Qwen3-VL tower (DeepStack at block 0 unless the text config
    is Qwen3.5's) and Qwen3VLProcessor; `text` goes to `_qwen3_text`."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tok = _qwen_tokenizer()
    ids = _ids(tok, QWEN_SPECIALS)
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=16,
    )
    if not text.get("linear_attention"):
        vision["deepstack_visual_indexes"] = [0]
    cfg = config_cls(
        text_config=_qwen3_text(tok, ids, **text),
        vision_config=vision,
        tie_word_embeddings=False,
        **_qwen_tokens(ids),
    )
    torch.manual_seed(seed)
    model = model_cls._from_config(cfg, dtype=torch.float32)
    _finish(model, ids["<|im_end|>"], ids["<|endoftext|>"])
    proc = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=16, merge_size=2, min_pixels=32 * 32, max_pixels=32 * 32 * 64
        ),
        tokenizer=tok,
        video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return _save(model, proc, out_dir)


def build_tiny_qwen3_5(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Qwen3.5 (dense): the Qwen3-VL vision tower (no DeepStack) and processor in front of a
    hybrid decoder: layer 0 a Gated DeltaNet (linear attention), layer 1 full attention."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    return _build_qwen3(
        Qwen3_5Config, Qwen3_5ForConditionalGeneration, out_dir, seed, linear_attention=True
    )


# Tiny MoE blocks: 4 experts, 2 active. moe_intermediate 16 (2 x 16 != hidden 64), so that
# the (experts, out, in) and (experts, in, out) layouts of a fused expert weight differ.
_TINY_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


def build_tiny_qwen3_vl_moe(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Qwen3-VL-MoE: Qwen3-VL with every decoder MLP a sparse MoE block (router + fused
    experts, no shared expert), as in Qwen3-VL-30B-A3B. transformers 5 saves the experts in the
    model's (experts, out, in) layout; the hub checkpoints have (experts, in, out), which it
    transposes on load (tests/unit/test_moe.py merges into both)."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    return _build_qwen3(
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
        out_dir,
        seed,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        **_TINY_MOE,
    )


def build_tiny_qwen3_5_moe(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Qwen3.5-MoE: the Qwen3.5 hybrid decoder with a sparse MoE block (router, fused experts,
    a gated shared expert) in both layers, as in Qwen3.5-35B-A3B. Saved, like the hub
    checkpoints, with one tensor per expert, which transformers fuses on load."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    return _build_qwen3(
        Qwen3_5MoeConfig,
        Qwen3_5MoeForConditionalGeneration,
        out_dir,
        seed,
        linear_attention=True,
        shared_expert_intermediate_size=32,
        **_TINY_MOE,
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


def build_tiny_mllama(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Llama 3.2 Vision: a 3-layer decoder whose layer 1 is a gated cross-attention layer."""
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessor,
        MllamaProcessor,
    )

    tok = _fast_tokenizer(
        LLAMA3_SPECIALS,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
    )
    ids = _ids(tok, LLAMA3_SPECIALS)
    text = _llama_text(
        tok,
        dict(
            bos_token_id=ids["<|begin_of_text|>"],
            eos_token_id=ids["<|eot_id|>"],
            pad_token_id=ids["<|finetune_right_pad_id|>"],
        ),
        num_hidden_layers=3,
        cross_attention_layers=[1],
    )
    vision = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        intermediate_size=64,
        vision_output_dim=64,  # hidden_size * (1 + len(intermediate_layers_indices))
        intermediate_layers_indices=[0],
        image_size=28,
        patch_size=14,
        max_num_tiles=2,
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
    )
    cfg = MllamaConfig(text_config=text, vision_config=vision, image_token_index=ids["<|image|>"])
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # the gates start at zero: images would get no gradient
        for name, p in model.named_parameters():
            if "gate" in name and p.ndim <= 1 and not p.any():
                p.uniform_(0.5, 1.0)
    _finish(model, ids["<|eot_id|>"], ids["<|finetune_right_pad_id|>"], ids["<|begin_of_text|>"])
    proc = MllamaProcessor(
        image_processor=MllamaImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=2),
        tokenizer=tok,
        chat_template=LLAMA3_CHAT_TEMPLATE,
    )
    return _save(model, proc, out_dir)


MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]"]


def _pixtral_parts():
    """The Mistral tokenizer, its special-token ids, the Mistral decoder config and the Pixtral
    encoder config shared by the Pixtral and Mistral 3 tiny models."""
    specials = [*MISTRAL_SPECIALS, "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tok = _fast_tokenizer(specials, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    ids = _ids(tok, specials)
    text = _llama_text(
        tok,
        dict(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]),
        model_type="mistral",
        head_dim=16,
        sliding_window=None,
    )
    vision = dict(
        model_type="pixtral",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=64,
        patch_size=8,
        head_dim=16,
    )
    return tok, ids, text, vision


def build_tiny_pixtral(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Pixtral: LlavaForConditionalGeneration with a Pixtral vision encoder (2D RoPE, variable
    image sizes, [IMG_BREAK] after each row of patches)."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        PixtralImageProcessor,
        PixtralProcessor,
    )

    tok, ids, text, vision = _pixtral_parts()
    cfg = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=ids["[IMG]"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    _finish(model, ids["</s>"], ids["<pad>"], ids["<s>"])
    proc = PixtralProcessor(
        image_processor=PixtralImageProcessor(size={"longest_edge": 32}, patch_size=8),
        tokenizer=tok,
        patch_size=8,
        spatial_merge_size=1,
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )
    return _save(model, proc, out_dir)


def build_tiny_mistral3(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Mistral Small 3.1 / 3.2 vision (model_type mistral3): a Pixtral encoder, a projector that
    merges 2x2 patches (`patch_merger`) before its MLP, and a Mistral decoder; PixtralProcessor
    with spatial_merge_size 2."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PixtralImageProcessor,
        PixtralProcessor,
    )

    tok, ids, text, vision = _pixtral_parts()
    cfg = Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_index=ids["[IMG]"],
        vision_feature_layer=-1,
        spatial_merge_size=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    _finish(model, ids["</s>"], ids["<pad>"], ids["<s>"])
    proc = PixtralProcessor(
        image_processor=PixtralImageProcessor(size={"longest_edge": 64}, patch_size=8),
        tokenizer=tok,
        patch_size=8,
        spatial_merge_size=2,
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )
    return _save(model, proc, out_dir)


def _clip_vision() -> dict:
    return dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )


def build_tiny_llava(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """LLaVA-1.5: CLIP vision tower (penultimate layer, CLS dropped) + MLP projector + Llama."""
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = _fast_tokenizer(specials, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    ids = _ids(tok, specials)
    text = _llama_text(
        tok,
        dict(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]),
        model_type="llama",
    )
    cfg = LlavaConfig(
        text_config=text,
        vision_config=_clip_vision(),
        image_token_index=ids["<image>"],
        image_seq_length=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    _finish(model, ids["</s>"], ids["<pad>"], ids["<s>"])
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_HF_CHAT_TEMPLATE,
    )
    return _save(model, proc, out_dir)


def build_tiny_llava_next(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """LLaVA-NeXT (1.6): CLIP tower over a base view + high-resolution tiles (any-res grid)."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    specials = [*MISTRAL_SPECIALS, "<image>"]
    tok = _fast_tokenizer(specials, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    ids = _ids(tok, specials)
    text = _llama_text(
        tok,
        dict(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]),
        model_type="mistral",
        head_dim=16,
        sliding_window=None,
    )
    grid = [[32, 32], [32, 64], [64, 32]]
    cfg = LlavaNextConfig(
        text_config=text,
        vision_config=_clip_vision(),
        image_token_index=ids["<image>"],
        image_grid_pinpoints=grid,
        image_seq_length=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    _finish(model, ids["</s>"], ids["<pad>"], ids["<s>"])
    proc = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": 32},
            crop_size={"height": 32, "width": 32},
            image_grid_pinpoints=grid,
        ),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
    )
    return _save(model, proc, out_dir)


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


def build_tiny_gemma3(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Gemma 3: SigLIP tower + pooled projector (4 tokens per image) + Gemma 3 decoder."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    tok = _fast_tokenizer(
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
    ids = _ids(tok, GEMMA3_SPECIALS)
    text = _llama_text(
        tok,
        dict(
            bos_token_id=ids["<bos>"],
            eos_token_id=ids["<end_of_turn>"],
            pad_token_id=ids["<pad>"],
        ),
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=True,
    )
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        vision_use_head=False,
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
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # the projector starts at zero: images would get no gradient
        w = model.model.multi_modal_projector.mm_input_projection_weight
        if not w.any():
            w.normal_(0.0, 0.05)
    _finish(model, ids["<end_of_turn>"], ids["<pad>"], ids["<bos>"])
    proc = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tok,
        image_seq_length=4,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    return _save(model, proc, out_dir)


# Gemma 4: <bos><|turn>user\n...<turn|>\n<|turn>model\nanswer<turn|>\n; an image is the
# placeholder <|image|>, which the processor expands to <|image> + soft tokens + <image|>.
GEMMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    + _TEXT_PARTS
    + "<turn|>{% endgeneration %}\n"
    "{% else %}" + _user_parts("<|image|>") + "<turn|>\n{% endif %}"
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


def _gemma4_tokenizer():
    """Gemma 4's named special tokens (the processor reads them off the tokenizer)."""
    return _fast_tokenizer(
        GEMMA4_SPECIALS,
        bos_token="<bos>",
        eos_token="<turn|>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={
            "boi_token": "<|image>",
            "eoi_token": "<image|>",
            "image_token": "<|image|>",
            "boa_token": "<|audio>",
            "eoa_token": "<audio|>",
            "audio_token": "<|audio|>",
        },
    )


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

    tok = _gemma4_tokenizer()
    ids = _ids(tok, GEMMA4_SPECIALS)
    text = _llama_text(
        tok,
        dict(bos_token_id=ids["<bos>"], eos_token_id=ids["<turn|>"], pad_token_id=ids["<pad>"]),
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
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=4,
        pooling_kernel_size=2,
        position_embedding_size=64,
    )
    cfg = Gemma4Config(
        text_config=text,
        vision_config=vision,
        boi_token_id=ids["<|image>"],
        eoi_token_id=ids["<image|>"],
        image_token_id=ids["<|image|>"],
        boa_token_id=ids["<|audio>"],
        eoa_token_index=ids["<audio|>"],
        audio_token_id=ids["<|audio|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    _finish(model, ids["<turn|>"], ids["<pad>"], ids["<bos>"])
    proc = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(
            patch_size=4, pooling_kernel_size=2, max_soft_tokens=70
        ),
        tokenizer=tok,
        video_processor=Gemma4VideoProcessor(
            patch_size=4, pooling_kernel_size=2, max_soft_tokens=70
        ),
        image_seq_length=70,
        chat_template=GEMMA4_CHAT_TEMPLATE,
    )
    return _save(model, proc, out_dir)


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
    specials = [
        "<|begin_of_text|>",
        "<end_of_utterance>",
        "<fake_token_around_image>",
        "<image>",
        "<global-img>",
        *[f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)],
    ]
    tok = _fast_tokenizer(
        specials,
        bos_token="<|begin_of_text|>",
        eos_token="<end_of_utterance>",
        pad_token="<end_of_utterance>",
    )
    ids = _ids(tok, specials)
    eou = ids["<end_of_utterance>"]
    text = _llama_text(
        tok,
        dict(bos_token_id=ids["<|begin_of_text|>"], eos_token_id=eou, pad_token_id=eou),
        model_type="llama",
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    cfg = getattr(tr, f"{prefix}Config")(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<image>"],
        scale_factor=2,
        pad_token_id=eou,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = getattr(tr, f"{prefix}ForConditionalGeneration")._from_config(cfg, dtype=torch.float32)
    _finish(model, eou, eou, ids["<|begin_of_text|>"])
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
    return _save(model, proc, out_dir)


def _save(model, processor, out_dir) -> Path:
    from .io import atomic_dir

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)


BUILDERS: dict[str, Callable[..., Path]] = {
    "qwen2_vl": build_tiny_qwen2_vl,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
    "qwen3_vl": build_tiny_qwen3_vl,
    "qwen3_5": build_tiny_qwen3_5,
    "qwen3_vl_moe": build_tiny_qwen3_vl_moe,
    "qwen3_5_moe": build_tiny_qwen3_5_moe,
    "mllama": build_tiny_mllama,
    "pixtral": build_tiny_pixtral,
    "mistral3": build_tiny_mistral3,
    "llava": build_tiny_llava,
    "llava_next": build_tiny_llava_next,
    "gemma3": build_tiny_gemma3,
    "gemma4": build_tiny_gemma4,
    "idefics3": build_tiny_idefics3,
    "smolvlm": build_tiny_smolvlm,
}


def build_tiny(family: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    if family not in BUILDERS:
        raise KeyError(f"no tiny builder for family '{family}' (known: {', '.join(BUILDERS)})")
    return BUILDERS[family](out_dir, seed=seed)
