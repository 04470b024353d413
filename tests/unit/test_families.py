"""The family registry itself: lookup by config, the regexes it builds, quantization skips.
Per-family module sets against real models are in test_family_matrix.py."""

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path

import pytest

from vlmflow.families import FAMILIES, family_for_config, family_for_model_type

pytestmark = pytest.mark.usefixtures("single_thread")


class Cfg:
    def __init__(self, model_type, vision=None):
        self.model_type = model_type
        if vision:
            self.vision_config = Cfg(vision)


def test_lookup_by_config_tells_pixtral_from_llava():
    assert family_for_config(Cfg("llava", "clip_vision_model")).name == "llava"
    assert family_for_config(Cfg("llava", "pixtral")).name == "pixtral"
    assert family_for_config(Cfg("smolvlm")).name == "smolvlm"
    assert family_for_config(Cfg("idefics3")).name == "idefics3"
    assert family_for_config(Cfg("qwen3_vl")).name == "qwen3_vl"
    with pytest.raises(KeyError, match="'blip2' is not in the family registry"):
        family_for_model_type("blip2")


def test_target_regex_combines_layers_and_kinds():
    fam = FAMILIES["mllama"]
    rx = re.compile(fam.lora_target_regex(vision=False, language=True, attention=True, mlp=False))
    assert rx.fullmatch("model.language_model.layers.3.cross_attn.k_proj")
    assert rx.fullmatch("model.language_model.layers.0.self_attn.o_proj")
    assert not rx.fullmatch("model.language_model.layers.0.mlp.up_proj")
    assert not rx.fullmatch("model.vision_model.transformer.layers.0.self_attn.q_proj")
    assert not rx.fullmatch("model.language_model.layers.0.self_attn.q_proj.lora_A")
    assert fam.lora_target_regex(vision=True, language=True, attention=False, mlp=False) is None


def test_aliases_and_quantization_skips():
    fam = FAMILIES["qwen3_vl"]
    assert fam.resolve_module_name("projector") == [
        "model.visual.merger",
        "model.visual.deepstack_merger_list",
    ]
    assert fam.resolve_module_name("lm_head") == ["lm_head"]
    assert fam.resolve_module_name("model.foo") == ["model.foo"]
    gemma = FAMILIES["gemma3"]
    assert gemma.unquantized_modules(quantize_vision=False) == [
        "model.vision_tower",
        "model.multi_modal_projector",
        "lm_head",
    ]
    assert gemma.unquantized_modules(quantize_vision=True) == ["lm_head"]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_entry_is_complete(name):
    fam = FAMILIES[name]
    assert callable(fam.build_tiny)  # adding a family = one module: its entry + tiny builder
    for rx in (fam.vision_layers, fam.language_layers, fam.vision_attention, fam.vision_mlp):
        re.compile(rx)
    assert fam.response_part and fam.end_of_turn and fam.image_tokens
    assert set(fam.batch_layout.values()) <= {"token", "cat", "sample"}


def entry_as_json(fam) -> dict:
    """Every field of a registry entry as JSON values (the tiny builder by its qualified name)."""
    out = {}
    for f in dataclasses.fields(fam):
        value = getattr(fam, f.name)
        if f.name == "build_tiny":
            value = value and f"{value.__module__}.{value.__qualname__}"
        elif isinstance(value, Mapping):
            value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def test_every_field_of_every_entry_is_as_declared():
    """The entries against tests/unit/registry.json, written from the family declarations as
    they were before the shared parts became `Family` defaults and shared dicts: a changed
    default (decoder, tower, projector, model_types) or shared piece (CLIP_TOWER, CHATML, QWEN_VL)
    shows as the family and field it changed. A deliberate change to an entry updates the file;
    a new family need not be added (test_family_matrix.py checks it on its tiny model)."""
    expected = json.loads((Path(__file__).parent / "registry.json").read_text())
    assert set(expected) <= set(FAMILIES)
    for name in expected:
        got = entry_as_json(FAMILIES[name])
        assert set(got) == set(expected[name]), name
        changed = {k: (got[k], v) for k, v in expected[name].items() if got[k] != v}
        assert not changed, f"{name}: (now, declared) {changed}"
