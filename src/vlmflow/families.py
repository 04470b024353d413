"""Model family registry: one entry per VLM architecture.

An entry says where the vision blocks, language layers, attention and MLP projections and the
vision-to-language projector live (as regular expressions over `model.named_modules()` names),
and how the chat template marks user and assistant turns. LoRA targeting, label masking and the
tiny test builders all read this registry; adding a family = one entry + one tiny builder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    """`config.model_type` values that belong to this family."""
    vision_layers: str
    """Regex of a vision block's module name prefix."""
    language_layers: str
    """Regex of a language decoder layer's module name prefix."""
    vision_attention: str
    """Regex (relative to a vision block) of attention linears."""
    vision_mlp: str
    language_attention: str
    language_mlp: str
    vision_tower: str
    """Module name of the whole vision encoder (kept unquantized in 4-bit)."""
    projector: str
    """Module name of the vision-to-language projector (for modules_to_save)."""
    lm_head: str
    response_part: str
    """Text that opens an assistant turn in the rendered chat template."""
    instruction_part: str
    """Text that opens a user turn."""
    end_of_turn: str
    """Token that closes a turn (trained on, and where generation stops)."""
    image_token: str
    """Placeholder token that the processor expands into the image's tokens."""

    def lora_target_regex(
        self,
        *,
        vision: bool,
        language: bool,
        attention: bool,
        mlp: bool,
    ) -> str | None:
        """A regex for PEFT's `target_modules` (matched with re.fullmatch on module names).

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

    def resolve_module_name(self, name: str) -> str:
        """Map the aliases `projector` and `lm_head` to this family's module names."""
        return {"projector": self.projector, "lm_head": self.lm_head}.get(name, name)


_QWEN_CHAT = dict(
    response_part="<|im_start|>assistant\n",
    instruction_part="<|im_start|>user\n",
    end_of_turn="<|im_end|>",
    image_token="<|image_pad|>",
    lm_head="lm_head",
)

FAMILIES: dict[str, Family] = {
    "qwen2_5_vl": Family(
        name="qwen2_5_vl",
        model_types=("qwen2_5_vl",),
        vision_layers=r"model\.visual\.blocks\.\d+",
        language_layers=r"model\.language_model\.layers\.\d+",
        vision_attention=r"attn\.(?:qkv|proj)",
        vision_mlp=r"mlp\.(?:gate_proj|up_proj|down_proj)",
        language_attention=r"self_attn\.(?:q_proj|k_proj|v_proj|o_proj)",
        language_mlp=r"mlp\.(?:gate_proj|up_proj|down_proj)",
        vision_tower="model.visual",
        projector="model.visual.merger",
        **_QWEN_CHAT,
    ),
}


def family_for_model_type(model_type: str) -> Family:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    raise KeyError(
        f"model_type '{model_type}' is not in the family registry "
        f"(known: {', '.join(sorted(t for f in FAMILIES.values() for t in f.model_types))})"
    )


def lora_target_names(module_names_and_types, regex: str | None) -> list[str]:
    """Names of the `nn.Linear`-like modules a target regex selects (what PEFT will wrap).

    `module_names_and_types` is an iterable of (name, module) as from `model.named_modules()`.
    """
    if regex is None:
        return []
    pattern = re.compile(regex)
    out = []
    for name, module in module_names_and_types:
        if pattern.fullmatch(name) and _is_linear(module):
            out.append(name)
    return out


def _is_linear(module) -> bool:
    import torch

    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ in {"Linear4bit", "Linear8bitLt"}
