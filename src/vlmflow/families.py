"""The model family registry: one `Family` entry per VLM architecture, assembled from the family
modules in `vlmflow.models` (one module per family or close group).

An entry says where the vision blocks, language layers, attention and MLP projections and the
vision-to-language projector live (as regular expressions over `model.named_modules()` names of
transformers 5.x), how the chat template marks user and assistant turns, how the processor's
image tensors are batched, which fast paths apply, and how to build a tiny model of it. LoRA
targeting, label masking, 4-bit loading, the collator, the patches and the tiny test models all
read this registry; adding a family = one module in `vlmflow.models`, listed in
`FAMILY_MODULES` below (and its row in tests/unit/test_family_matrix.py).

The module names were read off the real `named_modules()` of each tiny model (same classes as
the released checkpoints) and are pinned by tests/unit/test_family_matrix.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .models import (
    gemma3,
    gemma4,
    idefics3,
    internvl,
    llava,
    llava_onevision,
    mistral,
    mllama,
    qwen3_5,
    qwen_moe,
    qwen_vl,
)
from .models.base import Family

# The family modules, in registry order; each has a `FAMILIES` list of its entries.
FAMILY_MODULES = (
    qwen_vl,
    qwen3_5,
    qwen_moe,
    mllama,
    mistral,
    llava,
    gemma3,
    gemma4,
    idefics3,
    internvl,
    llava_onevision,
)

FAMILIES: dict[str, Family] = {f.name: f for m in FAMILY_MODULES for f in m.FAMILIES}


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
