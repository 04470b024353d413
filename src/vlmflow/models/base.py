"""What every family module shares: the `Family` entry and the pieces several entries reuse
(module-name regexes of Llama-style decoders and CLIP-like towers, chat-template fragments)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

# A Llama-style decoder: `model.language_model.layers.N` with q/k/v/o and gate/up/down linears
# (the default of `Family`).
LANG = r"model\.language_model\.layers\.\d+"
LANG_ATTN = r"self_attn\.(?:q_proj|k_proj|v_proj|o_proj)"
LANG_MLP = r"mlp\.(?:gate_proj|up_proj|down_proj)"
CLIP_ATTN = r"self_attn\.(?:q_proj|k_proj|v_proj|out_proj)"
CLIP_MLP = r"mlp\.(?:fc1|fc2)"


@dataclass(frozen=True)
class Family:
    name: str
    vision_layers: str
    """Regex of a vision block's module name (the prefix LoRA names start with)."""
    vision_attention: str
    """Regex (relative to a vision block) of its attention linears."""
    vision_mlp: str
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
    model_types: tuple[str, ...] = ()
    """`config.model_type` values that belong to this family (default: its name)."""
    language_layers: str = LANG
    """Regex of a language decoder layer's module name (default: a Llama-style decoder)."""
    language_attention: str = LANG_ATTN
    """Regex (relative to a decoder layer) of attention linears, cross-attention included."""
    language_mlp: str = LANG_MLP
    vision_tower: tuple[str, ...] = ("model.vision_tower",)
    """Module names of the vision encoder: kept unquantized in 4/8-bit (model.quantize_vision)."""
    projector: tuple[str, ...] = ("model.multi_modal_projector",)
    """Module names of the vision-to-language projector (the `projector` alias of
    lora.modules_to_save; kept unquantized like the tower)."""
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
    patches: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    """Family-specific fast paths (`vlmflow.patches`) this family takes: patch name (a key of
    `train.fast_paths`) -> the transformers class names it applies to. A declared patch that
    finds no module to patch is logged as a warning (a renamed class)."""
    compile_measured: bool = False
    """Whether `train.compile: auto` turns torch.compile on for this family (its compiled
    training step was measured faster on a GPU with the same loss, BENCHMARKS.md)."""
    offload_quantized: bool = False
    """Whether `train.use_gradient_checkpointing: auto` offloads the checkpointed layer inputs to
    host memory when the base is 4-bit / 8-bit on a GPU (measured on an H200: peak at or under
    Unsloth's, which offloads by default, for a small speed cost; BENCHMARKS.md)."""
    offload_16bit: bool = False
    """Whether `train.use_gradient_checkpointing: auto` offloads them in 16-bit too (on a GPU):
    measured on an H200 at full depth, where plain checkpointing kept the peak above Unsloth's
    and offloading took it under for a small speed cost (BENCHMARKS.md, 2026-12-04 evening)."""
    causal_text: bool = False
    """Whether the language model's self-attention is causal with nothing but padding in its 2-D
    attention mask (no bidirectional spans over image tokens, as Gemma's): a right-padded batch
    then trains the same without the mask (`train.fast_paths.padded_attention`: SDPA's causal
    kernel instead of a dense masked one). Declared where a CPU test compares the loss and the
    gradients with and without it (`tests/unit/test_padded_attention.py`)."""
    token_keys: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    """Processor outputs with one entry per token that only this family returns, and their
    padding value (`vlmflow.collate.TOKEN_KEYS` adds them to the common ones)."""
    expert_parameters: str = ""
    """Regex (relative to a decoder layer) of the fused MoE expert weights: 3-D nn.Parameters
    (experts, out, in), not nn.Linear, which get LoRA through PEFT's `target_parameters`
    (`lora.ParamWrapper`) when language layers and MLP modules are selected."""
    router_modules: tuple[str, ...] = ()
    """Name suffixes of the MoE routers: never LoRA'd, frozen, and kept in 16-bit in 4/8-bit."""
    build_tiny: Callable[..., Path] | None = field(default=None, compare=False, repr=False)
    """`build_tiny(out_dir, seed=0) -> out_dir`: saves a tiny random-weight model of the real
    architecture with its processor (`vlmflow.tiny`)."""

    def __post_init__(self):
        if not self.model_types:
            object.__setattr__(self, "model_types", (self.name,))

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


# LLaVA-style models around a CLIP/SigLIP encoder: `model.vision_tower.encoder.layers.N` (and the
# default tower, projector and decoder of `Family`).
CLIP_TOWER = dict(
    vision_layers=r"model\.vision_tower\.encoder\.layers\.\d+",
    vision_attention=CLIP_ATTN,
    vision_mlp=CLIP_MLP,
)
# ChatML turns (Qwen, InternVL, LLaVA-OneVision): <|im_start|>role\n...<|im_end|>
CHATML = dict(
    response_part="<|im_start|>assistant\n",
    instruction_part="<|im_start|>user\n",
    end_of_turn="<|im_end|>",
)

# Chat templates of the tiny models, in the format of each family's released checkpoints, with
# `{% generation %}` markers around assistant turns. Content is a string or a list of typed parts.
TEXT_PARTS = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
)


def user_parts(image: str) -> str:
    """Template of a user turn's content, with `image` in place of each image."""
    return (
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for c in message['content'] %}"
        f"{{% if c['type'] == 'image' %}}{image}"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    )
