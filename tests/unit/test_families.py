import itertools

import pytest
import torch

from vlmflow.families import FAMILIES, lora_target_names

FLAGS = ("vision", "language", "attention", "mlp")


@pytest.fixture(scope="module")
def qwen_modules(tiny_qwen):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen)
    return [(n, m) for n, m in model.named_modules()]


def expected_qwen2_5_vl(vision, language, attention, mlp):
    names = []
    for b in range(2):
        if vision and attention:
            names += [f"model.visual.blocks.{b}.attn.{p}" for p in ("qkv", "proj")]
        if vision and mlp:
            names += [
                f"model.visual.blocks.{b}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")
            ]
    for lyr in range(2):
        if language and attention:
            names += [
                f"model.language_model.layers.{lyr}.self_attn.{p}"
                for p in ("q_proj", "k_proj", "v_proj", "o_proj")
            ]
        if language and mlp:
            names += [
                f"model.language_model.layers.{lyr}.mlp.{p}"
                for p in ("gate_proj", "up_proj", "down_proj")
            ]
    return sorted(names)


@pytest.mark.parametrize("flags", list(itertools.product([True, False], repeat=4)))
def test_qwen2_5_vl_targets_exact_set(qwen_modules, flags):
    kw = dict(zip(FLAGS, flags))
    regex = FAMILIES["qwen2_5_vl"].lora_target_regex(**kw)
    got = sorted(lora_target_names(qwen_modules, regex))
    assert got == expected_qwen2_5_vl(**kw)
    # never the projector or the head: those are modules_to_save material
    assert not any("merger" in n or n == "lm_head" for n in got)


def test_peft_wraps_exactly_the_registry_selection(tiny_qwen):
    from transformers import AutoModelForImageTextToText

    from vlmflow.modeling import lora_config

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen)
    fam = FAMILIES["qwen2_5_vl"]
    cfg = {
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "finetune_vision_layers": False,
        "finetune_language_layers": True,
        "finetune_attention_modules": True,
        "finetune_mlp_modules": False,
        "modules_to_save": ["projector"],
    }
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(fam, cfg))
    wrapped = sorted(
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict)
    )
    assert wrapped == expected_qwen2_5_vl(False, True, True, False)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("visual.merger.modules_to_save" in n for n in trainable)


def test_flags_selecting_nothing_fail_clearly():
    from vlmflow.modeling import lora_config

    cfg = {
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "finetune_vision_layers": False,
        "finetune_language_layers": False,
        "finetune_attention_modules": True,
        "finetune_mlp_modules": True,
        "modules_to_save": [],
    }
    with pytest.raises(ValueError, match="select no module"):
        lora_config(FAMILIES["qwen2_5_vl"], cfg)
