"""Model family registry: one entry per VLM architecture.

An entry says where the vision blocks, language layers, attention and MLP projections and the
vision-to-language projector live (as regular expressions over `model.named_modules()` names of
transformers 5.x), how the chat template marks user and assistant turns, and how the
processor's image tensors are batched. LoRA targeting, label masking, 4-bit loading, the
collator and the tiny test builders all read this registry; adding a family = one entry here +
one tiny builder in `vlmflow.tiny`.

The module names were read off the real `named_modules()` of each tiny model (same classes as
the released checkpoints) and are pinned by tests/unit/test_families.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    """`config.model_type` values that belong to this family."""
    vision_layers: str
    """Regex of a vision block's module name (the prefix LoRA names start with)."""
    language_layers: str
    """Regex of a language decoder layer's module name."""
    vision_attention: str
    """Regex (relative to a vision block) of its attention linears."""
    vision_mlp: str
    language_attention: str
    """Regex (relative to a decoder layer) of attention linears, cross-attention included."""
    language_mlp: str
    vision_tower: tuple[str, ...]
    """Module names of the vision encoder: kept unquantized in 4/8-bit (model.quantize_vision)."""
    projector: tuple[str, ...]
    """Module names of the vision-to-language projector (the `projector` alias of
    lora.modules_to_save; kept unquantized like the tower)."""
    response_part: str
    """Text that opens an assistant turn in the rendered chat template (Unsloth's
    `train_on_responses_only(response_part=...)`)."""
    instruction_part: str
    """Text that opens a user turn (ends an unterminated assistant span)."""
    end_of_turn: str
    """Token that closes an assistant turn (trained on, and where generation stops)."""
    image_tokens: tuple[str, ...]
    """Tokens the processor puts in place of an image (never trained on); the first one is the
    placeholder the model replaces with image features."""
    lm_head: str = "lm_head"
    chat_template: str | None = None
    """Template used instead of the checkpoint's own when the latter does not close assistant
    turns with `end_of_turn` (a model trained on it would never learn to stop)."""
    batch_layout: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """How `collate` batches processor outputs other than the default ones (see
    `vlmflow.collate.collate`): 'token' (one entry per token), 'cat' (images concatenated along
    dim 0) or 'sample' (one entry per sample, padded)."""
    supports_packing: bool = False
    """Whether `train.packing` works: the model takes per-sample position ids for a packed row
    (Qwen-VL's `(4, B, T)` text + M-RoPE position ids, from which transformers builds the
    block-diagonal causal mask) and its processor returns image tensors concatenated along dim 0
    (see `vlmflow.collate.collate_packed`)."""
    packing_refusal: str = ""
    """Why `train.packing` is refused for this family, when there is more to say than that it is
    not supported (the error message carries it)."""
    expert_parameters: str = ""
    """Regex (relative to a decoder layer) of the fused MoE expert weights: 3-D nn.Parameters
    (experts, out, in), not nn.Linear, which get LoRA through PEFT's `target_parameters`
    (`lora.ParamWrapper`) when language layers and MLP modules are selected."""
    router_modules: tuple[str, ...] = ()
    """Name suffixes of the MoE routers: never LoRA'd, frozen, and kept in 16-bit in 4/8-bit."""

    @property
    def image_token(self) -> str:
        return self.image_tokens[0]

    def lora_target_regex(
        self,
        *,
        vision: bool,
        language: bool,
        attention: bool,
        mlp: bool,
    ) -> str | None:
        """A regex for PEFT's `target_modules` (matched with re.fullmatch on module names):
        FastVisionModel's finetune_{vision,language}_layers x finetune_{attention,mlp}_modules.

        Returns None when the flags select nothing.
        """
        parts = []
        for enabled, prefix, attn, ffn in (
            (vision, self.vision_layers, self.vision_attention, self.vision_mlp),
            (language, self.language_layers, self.language_attention, self.language_mlp),
        ):
            if not enabled:
                continue
            kinds = [k for on, k in ((attention, attn), (mlp, ffn)) if on]
            if kinds:
                parts.append(rf"{prefix}\.(?:{'|'.join(kinds)})")
        if not parts:
            return None
        return "|".join(f"(?:{p})" for p in parts)

    def expert_regex(self) -> str | None:
        """Regex of the full names of the fused expert parameters (None: a dense family)."""
        if not self.expert_parameters:
            return None
        return rf"{self.language_layers}\.(?:{self.expert_parameters})"

    def layers_regex(self, *, vision: bool, language: bool) -> str | None:
        """Regex of every module inside the selected vision blocks / decoder layers."""
        parts = [
            p for on, p in ((vision, self.vision_layers), (language, self.language_layers)) if on
        ]
        return "|".join(rf"(?:{p}\..+)" for p in parts) if parts else None

    def resolve_module_name(self, name: str) -> list[str]:
        """Map the aliases `projector` and `lm_head` to this family's module names."""
        if name == "projector":
            return list(self.projector)
        if name == "lm_head":
            return [self.lm_head]
        return [name]

    def unquantized_modules(self, *, quantize_vision: bool) -> list[str]:
        """Modules bitsandbytes leaves in 16-bit: the head and the MoE routers always, the vision
        tower and the projector unless `quantize_vision`. (bitsandbytes quantizes nn.Linear
        only: fused MoE experts, 3-D parameters, stay 16-bit anyway.)"""
        keep = [self.lm_head, *self.router_modules]
        if not quantize_vision:
            keep = [*self.vision_tower, *self.projector, *keep]
        return keep


_QWEN_CHAT = dict(
    response_part="<|im_start|>assistant\n",
    instruction_part="<|im_start|>user\n",
    end_of_turn="<|im_end|>",
    image_tokens=("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"),
)
_LANG = r"model\.language_model\.layers\.\d+"
_LANG_ATTN = r"self_attn\.(?:q_proj|k_proj|v_proj|o_proj)"
_LANG_MLP = r"mlp\.(?:gate_proj|up_proj|down_proj)"
_CLIP_ATTN = r"self_attn\.(?:q_proj|k_proj|v_proj|out_proj)"
_CLIP_MLP = r"mlp\.(?:fc1|fc2)"

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

# What the Qwen-VL families share: vision blocks `model.visual.blocks.N` with a fused qkv, the
# merger as projector, Qwen's chat markers, padding-free packing (3-D M-RoPE position ids).
_QWEN_VL = dict(
    vision_layers=r"model\.visual\.blocks\.\d+",
    language_layers=_LANG,
    vision_attention=r"attn\.(?:qkv|proj)",
    language_attention=_LANG_ATTN,
    language_mlp=_LANG_MLP,
    vision_tower=("model.visual",),
    projector=("model.visual.merger",),
    supports_packing=True,
    **_QWEN_CHAT,
)
# LLaVA-style models around a CLIP/SigLIP encoder: `model.vision_tower.encoder.layers.N` and a
# `multi_modal_projector`.
_CLIP_TOWER = dict(
    vision_layers=r"model\.vision_tower\.encoder\.layers\.\d+",
    language_layers=_LANG,
    vision_attention=_CLIP_ATTN,
    vision_mlp=_CLIP_MLP,
    language_attention=_LANG_ATTN,
    language_mlp=_LANG_MLP,
    vision_tower=("model.vision_tower",),
    projector=("model.multi_modal_projector",),
)

# Qwen3.5's hybrid decoder: full (gated) attention layers and Gated DeltaNet (linear attention)
# layers, whose five projections count as attention too.
_QWEN3_5_ATTN = (
    r"(?:self_attn\.(?:q_proj|k_proj|v_proj|o_proj)"
    r"|linear_attn\.(?:in_proj_qkv|in_proj_z|in_proj_b|in_proj_a|out_proj))"
)
LINEAR_ATTENTION_PACKING = (
    "its Gated DeltaNet (linear-attention) layers carry a recurrent state and a causal "
    "convolution along the whole row: position ids do not reset them, so packed samples would "
    "read each other's tokens (the varlen cu_seqlens path of flash-linear-attention is not "
    "wired in)"
)

# Fused MoE experts of transformers 5 (Qwen3-VL-MoE, Qwen3.5-MoE): (experts, 2 x moe_intermediate,
# hidden) and (experts, hidden, moe_intermediate).
_EXPERTS = r"mlp\.experts\.(?:gate_up_proj|down_proj)"

_FAMILIES = [
    Family(
        name="qwen2_vl",
        model_types=("qwen2_vl",),
        vision_mlp=r"mlp\.(?:fc1|fc2)",
        **_QWEN_VL,
    ),
    Family(
        name="qwen2_5_vl",
        model_types=("qwen2_5_vl",),
        vision_mlp=r"mlp\.(?:gate_proj|up_proj|down_proj)",
        **_QWEN_VL,
    ),
    Family(
        name="qwen3_vl",
        model_types=("qwen3_vl",),
        vision_mlp=r"mlp\.(?:linear_fc1|linear_fc2)",
        # the final merger and the DeepStack mergers that feed early decoder layers
        **{**_QWEN_VL, "projector": ("model.visual.merger", "model.visual.deepstack_merger_list")},
    ),
    Family(
        # Qwen3.5 (dense, natively multimodal): the Qwen3-VL tower without DeepStack in front of
        # a 3:1 hybrid of Gated DeltaNet and full attention layers.
        name="qwen3_5",
        model_types=("qwen3_5",),
        vision_mlp=r"mlp\.(?:linear_fc1|linear_fc2)",
        **{
            **_QWEN_VL,
            "language_attention": _QWEN3_5_ATTN,
            "supports_packing": False,
            "packing_refusal": LINEAR_ATTENTION_PACKING,
        },
    ),
    Family(
        # Qwen3-VL-MoE (30B-A3B, 235B-A22B): the Qwen3-VL tower and DeepStack mergers in front of
        # a decoder whose MLPs are sparse MoE blocks: a router `mlp.gate` (frozen, 16-bit) and
        # the experts fused into two 3-D parameters (LoRA through PEFT's target_parameters).
        # Layers listed in mlp_only_layers keep a dense MLP (none in the released checkpoints).
        name="qwen3_vl_moe",
        model_types=("qwen3_vl_moe",),
        vision_mlp=r"mlp\.(?:linear_fc1|linear_fc2)",
        expert_parameters=_EXPERTS,
        router_modules=("mlp.gate",),
        **{**_QWEN_VL, "projector": ("model.visual.merger", "model.visual.deepstack_merger_list")},
    ),
    Family(
        # Qwen3.5-MoE (35B-A3B, 122B-A10B, 397B-A17B): the Qwen3.5 hybrid decoder (Gated DeltaNet
        # and gated full attention) with a sparse MoE block in every layer: router `mlp.gate`,
        # fused experts, and a dense shared expert (nn.Linear, LoRA'd as the MLP) whose output
        # is scaled by a sigmoid gate `mlp.shared_expert_gate` (a router: frozen, 16-bit).
        name="qwen3_5_moe",
        model_types=("qwen3_5_moe",),
        vision_mlp=r"mlp\.(?:linear_fc1|linear_fc2)",
        expert_parameters=_EXPERTS,
        router_modules=("mlp.gate", "mlp.shared_expert_gate"),
        **{
            **_QWEN_VL,
            "language_attention": _QWEN3_5_ATTN,
            "language_mlp": r"mlp\.shared_expert\.(?:gate_proj|up_proj|down_proj)",
            "supports_packing": False,
            "packing_refusal": LINEAR_ATTENTION_PACKING,
        },
    ),
    Family(
        # Llama 3.2 Vision: a tile-based ViT (local + global transformer) feeding gated
        # cross-attention decoder layers (`cross_attn`), which count as language attention.
        name="mllama",
        model_types=("mllama",),
        vision_layers=r"model\.vision_model\.(?:transformer|global_transformer)\.layers\.\d+",
        language_layers=_LANG,
        vision_attention=r"self_attn\.(?:q_proj|k_proj|v_proj|o_proj)",
        vision_mlp=_CLIP_MLP,
        language_attention=r"(?:self_attn|cross_attn)\.(?:q_proj|k_proj|v_proj|o_proj)",
        language_mlp=_LANG_MLP,
        vision_tower=("model.vision_model",),
        projector=("model.multi_modal_projector",),
        response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
        instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
        end_of_turn="<|eot_id|>",
        image_tokens=("<|image|>",),
        # pixel_values (1, images, tiles, C, H, W) and the aspect-ratio tensors are per sample
        batch_layout=MappingProxyType(
            {"pixel_values": "sample", "aspect_ratio_ids": "sample", "aspect_ratio_mask": "sample"}
        ),
    ),
    Family(
        # Pixtral: LlavaForConditionalGeneration around a Pixtral vision encoder, whose blocks
        # name their parts `attention` and `feed_forward`.
        name="pixtral",
        model_types=("llava:pixtral",),
        vision_layers=r"model\.vision_tower\.transformer\.layers\.\d+",
        language_layers=_LANG,
        vision_attention=r"attention\.(?:q_proj|k_proj|v_proj|o_proj)",
        vision_mlp=r"feed_forward\.(?:gate_proj|up_proj|down_proj)",
        language_attention=_LANG_ATTN,
        language_mlp=_LANG_MLP,
        vision_tower=("model.vision_tower",),
        projector=("model.multi_modal_projector",),
        response_part="[/INST]",
        instruction_part="[INST]",
        end_of_turn="</s>",
        image_tokens=("[IMG]", "[IMG_BREAK]", "[IMG_END]"),
    ),
    Family(
        # Mistral Small 3.1 / 3.2 (model_type mistral3): the Pixtral encoder and Mistral chat
        # format of `pixtral`, a projector that merges 2x2 patches before its MLP.
        name="mistral3",
        model_types=("mistral3",),
        vision_layers=r"model\.vision_tower\.transformer\.layers\.\d+",
        language_layers=_LANG,
        vision_attention=r"attention\.(?:q_proj|k_proj|v_proj|o_proj)",
        vision_mlp=r"feed_forward\.(?:gate_proj|up_proj|down_proj)",
        language_attention=_LANG_ATTN,
        language_mlp=_LANG_MLP,
        vision_tower=("model.vision_tower",),
        projector=("model.multi_modal_projector",),
        response_part="[/INST]",
        instruction_part="[INST]",
        end_of_turn="</s>",
        image_tokens=("[IMG]", "[IMG_BREAK]", "[IMG_END]"),
    ),
    Family(
        name="llava",
        model_types=("llava",),
        **_CLIP_TOWER,
        response_part=" ASSISTANT:",
        instruction_part="USER:",
        end_of_turn="</s>",
        image_tokens=("<image>",),
        chat_template=LLAVA_CHAT_TEMPLATE,
    ),
    Family(
        name="llava_next",
        model_types=("llava_next",),
        **_CLIP_TOWER,
        response_part="[/INST]",
        instruction_part="[INST]",
        end_of_turn="</s>",
        image_tokens=("<image>",),
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
    ),
    Family(
        # Gemma 3: SigLIP tower + average-pooled projector (a bare weight, no nn.Linear).
        name="gemma3",
        model_types=("gemma3",),
        **_CLIP_TOWER,
        response_part="<start_of_turn>model\n",
        instruction_part="<start_of_turn>user\n",
        end_of_turn="<end_of_turn>",
        image_tokens=("<image_soft_token>", "<start_of_image>", "<end_of_image>"),
    ),
    Family(
        # Gemma 4 (dense: E2B/E4B/12B/31B): a ViT with 2-D RoPE whose linears are wrapped in
        # `Gemma4ClippableLinear` (LoRA goes on the inner `.linear`), pooled soft tokens
        # projected by `embed_vision`. The per-layer-embedding linears of E2B/E4B
        # (per_layer_input_gate, per_layer_projection) are neither attention nor MLP: not targeted.
        name="gemma4",
        model_types=("gemma4",),
        vision_layers=r"model\.vision_tower\.encoder\.layers\.\d+",
        language_layers=_LANG,
        vision_attention=r"self_attn\.(?:q_proj|k_proj|v_proj|o_proj)\.linear",
        vision_mlp=r"mlp\.(?:gate_proj|up_proj|down_proj)\.linear",
        language_attention=_LANG_ATTN,
        language_mlp=_LANG_MLP,
        vision_tower=("model.vision_tower",),
        projector=("model.embed_vision",),
        response_part="<|turn>model\n",
        instruction_part="<|turn>user\n",
        end_of_turn="<turn|>",
        image_tokens=("<|image|>", "<|image>", "<image|>"),
    ),
    Family(
        # Idefics3 and SmolVLM v1 (model_type idefics3): SigLIP-like tower + pixel-shuffle
        # connector + Llama-style text model named `text_model`.
        name="idefics3",
        model_types=("idefics3",),
        vision_layers=r"model\.vision_model\.encoder\.layers\.\d+",
        language_layers=r"model\.text_model\.layers\.\d+",
        vision_attention=_CLIP_ATTN,
        vision_mlp=_CLIP_MLP,
        language_attention=_LANG_ATTN,
        language_mlp=_LANG_MLP,
        vision_tower=("model.vision_model",),
        projector=("model.connector",),
        response_part="\nAssistant:",
        instruction_part="User:",
        end_of_turn="<end_of_utterance>",
        image_tokens=("<image>", "<fake_token_around_image>", "<global-img>"),
        # pixel_values (1, images x crops, C, H, W); all-zero images are padding to the model
        batch_layout=MappingProxyType({"pixel_values": "sample", "pixel_attention_mask": "sample"}),
    ),
]

# SmolVLM2 (model_type smolvlm): the Idefics3 architecture under new class names.
_FAMILIES.append(replace(_FAMILIES[-1], name="smolvlm", model_types=("smolvlm",)))

FAMILIES: dict[str, Family] = {f.name: f for f in _FAMILIES}


def model_type_key(config) -> str:
    """The registry key of a transformers config: its model_type, or `llava:<vision type>` for
    LLaVA-style models with a non-CLIP vision tower (Pixtral is a `llava` model)."""
    model_type = config.model_type
    vision = getattr(config, "vision_config", None)
    if model_type == "llava" and vision is not None and vision.model_type == "pixtral":
        return "llava:pixtral"
    return model_type


def family_for_model_type(model_type: str) -> Family:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    raise KeyError(
        f"model_type '{model_type}' is not in the family registry "
        f"(known: {', '.join(sorted(t for f in FAMILIES.values() for t in f.model_types))})"
    )


def family_for_config(config) -> Family:
    return family_for_model_type(model_type_key(config))


def lora_target_names(module_names_and_types: Iterable, regex: str | None) -> list[str]:
    """Names of the `nn.Linear`-like modules a target regex selects (what PEFT will wrap).

    `module_names_and_types` is an iterable of (name, module) as from `model.named_modules()`.
    """
    if regex is None:
        return []
    pattern = re.compile(regex)
    return [n for n, m in module_names_and_types if pattern.fullmatch(n) and _is_linear(m)]


def parameter_names(module_names_and_types: Iterable, regex: str | None) -> list[str]:
    """Full names (`module.parameter`) of the parameters a regex selects, e.g. the fused MoE
    experts that PEFT's `target_parameters` wraps (read off the modules, so that the same
    `named_modules()` iterable serves both)."""
    if regex is None:
        return []
    pattern = re.compile(regex)
    return [
        f"{n}.{p}"
        for n, m in module_names_and_types
        for p, _ in m.named_parameters(recurse=False)
        if pattern.fullmatch(f"{n}.{p}")
    ]


def linear_names(module_names_and_types: Iterable) -> list[str]:
    return [n for n, m in module_names_and_types if _is_linear(m)]


def _is_linear(module) -> bool:
    import torch

    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ in {"Linear4bit", "Linear8bitLt"}
