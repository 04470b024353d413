"""MoE families (Qwen3-VL-MoE, Qwen3.5-MoE): LoRA on the fused expert parameters (PEFT's
target_parameters), routers frozen and 16-bit, 4-bit loading, and the streaming merge of expert
updates into checkpoints that store the experts transposed (Qwen3-VL-MoE) or one tensor per
expert (Qwen3.5-MoE)."""

import pytest
import torch
from safetensors import safe_open

from vlmflow.config import resolve_sections
from vlmflow.families import FAMILIES

pytestmark = pytest.mark.usefixtures("single_thread")

MOE = ["qwen3_vl_moe", "qwen3_5_moe"]
ROUTERS = {"qwen3_vl_moe": ["mlp.gate"], "qwen3_5_moe": ["mlp.gate", "mlp.shared_expert_gate"]}


def _cfg(model: str, **lora) -> dict:
    return resolve_sections(
        {"model": {"name": model, "max_seq_length": 256}, "lora": {"r": 2, **lora}},
        ["model", "lora", "export"],
    )


def _checkpoint(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118
    return out


def _lora_model(family, tiny_model, **lora):
    from transformers import AutoModelForImageTextToText

    from vlmflow.modeling import apply_lora

    base = AutoModelForImageTextToText.from_pretrained(tiny_model(family))
    return apply_lora(base, FAMILIES[family], _cfg(tiny_model(family), **lora)["lora"])


@pytest.mark.parametrize("family", MOE)
def test_expert_lora_is_two_param_wrappers_per_layer_and_routers_stay_frozen(family, tiny_model):
    model = _lora_model(family, tiny_model)
    wrappers = {
        n.removeprefix("base_model.model.").replace(".base_layer", "") + "." + m.parameter_name
        for n, m in model.named_modules()
        if type(m).__name__ == "ParamWrapper"
    }
    assert wrappers == {
        f"model.language_model.layers.{i}.mlp.experts.{p}"
        for i in range(2)
        for p in ("gate_up_proj", "down_proj")
    }
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for suffix in ROUTERS[family]:
        routers = [m for n, m in model.named_modules() if n.endswith(suffix)]
        assert len(routers) == 2 and all(type(m).__name__ != "ParamWrapper" for m in routers)
        assert not any(p.requires_grad for m in routers for p in m.parameters())
        assert not any(hasattr(m, "lora_A") for m in routers)
    # the fused experts: (experts, 2 x moe_intermediate, hidden) and (experts, hidden, inter.)
    experts = model.base_model.model.model.language_model.layers[0].mlp.experts
    down = experts.get_param()
    gate_up = experts.base_layer.get_param()
    assert (experts.parameter_name, experts.base_layer.parameter_name) == (
        "down_proj",
        "gate_up_proj",
    )
    assert tuple(gate_up.shape) == (4, 32, 64) and tuple(down.shape) == (4, 64, 16)
    assert not gate_up.requires_grad and not down.requires_grad


def test_expert_lora_refuses_dropout_with_the_setting_to_change(tiny_model):
    with pytest.raises(ValueError, match=r"lora.lora_dropout is 0.1.*fused MoE experts.*: 0"):
        _lora_model("qwen3_vl_moe", tiny_model, lora_dropout=0.1)
    # without the experts, dropout is fine
    model = _lora_model("qwen3_vl_moe", tiny_model, lora_dropout=0.1, finetune_mlp_modules=False)
    assert not any(type(m).__name__ == "ParamWrapper" for m in model.modules())


@pytest.mark.parametrize("family", MOE)
def test_4bit_quantizes_the_linears_and_keeps_experts_and_routers_16bit(family, tiny_model):
    pytest.importorskip("bitsandbytes")
    from vlmflow.modeling import load_model

    cfg = resolve_sections(
        {"model": {"name": tiny_model(family), "load_in_4bit": True}}, ["model"]
    )["model"]
    model, fam = load_model(cfg, torch.device("cpu"))
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    layer = "model.language_model.layers.1"
    assert kinds[f"{layer}.self_attn.q_proj"] == "Linear4bit"
    for suffix in ROUTERS[family]:
        assert kinds[f"{layer}.{suffix}"] != "Linear4bit"
        assert model.get_submodule(f"{layer}.{suffix}").weight.dtype == torch.float32
    if family == "qwen3_5_moe":
        assert kinds[f"{layer}.mlp.shared_expert.down_proj"] == "Linear4bit"
        assert kinds["model.language_model.layers.0.linear_attn.in_proj_qkv"] == "Linear4bit"
    experts = model.get_submodule(f"{layer}.mlp.experts")
    assert experts.gate_up_proj.dtype == experts.down_proj.dtype == torch.float32
    assert experts.gate_up_proj.ndim == 3


def _hub_layout(folder, out):
    """A copy of a Qwen3-VL-MoE folder with the experts stored (experts, in, out), as the hub
    checkpoints (Qwen/Qwen3-VL-30B-A3B-Instruct) ship them; transformers transposes on load.
    (transformers 5 itself saves them in the model's (experts, out, in) layout.)"""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(folder, out)
    tensors = _checkpoint(out)
    for k in [k for k in tensors if ".mlp.experts." in k]:
        tensors[k] = tensors[k].transpose(1, 2).contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(
    ("family", "layout"),
    [("qwen3_vl_moe", "hub"), ("qwen3_vl_moe", "model"), ("qwen3_5_moe", "per expert")],
)
def test_streaming_merge_of_expert_lora_equals_the_adapter(family, layout, tiny_model, tmp_path):
    """The checkpoints store the experts in another layout than the model (transposed, or one
    tensor per expert): the merged checkpoint keeps the base's keys and layout, and loads to the
    adapter's logits; the expert tensors are those PEFT's own merge writes."""
    from pathlib import Path

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from vlmflow.merge import merge_weights

    model = _lora_model(family, tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # B starts at zero: make the update visible
    model.save_pretrained(tmp_path / "adapter")
    base_dir = Path(tiny_model(family))
    if layout == "hub":
        base_dir = _hub_layout(base_dir, tmp_path / "hub")
    out = tmp_path / "merged"
    out.mkdir()
    cfg = _cfg(str(base_dir))
    stats = merge_weights(cfg["model"], tmp_path / "adapter", out, torch.float32, "1GB")

    base = _checkpoint(base_dir)
    merged = _checkpoint(out)
    assert set(merged) == set(base)
    assert all(merged[k].shape == base[k].shape for k in base)
    expert_keys = sorted(k for k in base if ".mlp.experts." in k)
    if family == "qwen3_vl_moe":  # fused; the hub's (experts, in, out) is transposed on load
        shape = base["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape
        assert shape == ((4, 64, 32) if layout == "hub" else (4, 32, 64))
        assert len(expert_keys) == 4
    else:  # one tensor per expert and projection, fused on load
        assert "model.language_model.layers.0.mlp.experts.3.up_proj.weight" in base
        assert len(expert_keys) == 2 * 4 * 3
    assert all(not torch.equal(merged[k], base[k]) for k in expert_keys)
    router_keys = [k for k in base if k.endswith(tuple(f"{r}.weight" for r in ROUTERS[family]))]
    assert router_keys and all(torch.equal(merged[k], base[k]) for k in router_keys)
    n_attn = 4 + 5 if family == "qwen3_5_moe" else 2 * 4  # layer 0: GDN, layer 1: attention
    n_shared = 2 * 3 if family == "qwen3_5_moe" else 0
    n_vision = 2 * 4
    assert stats["lora_merged"] == len(expert_keys) + n_attn + n_shared + n_vision

    ids = torch.randint(0, 200, (2, 16))
    reloaded = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(base_dir), tmp_path / "adapter"
    ).eval()
    plain = AutoModelForImageTextToText.from_pretrained(out).eval()
    with torch.no_grad():
        want = reloaded(input_ids=ids).logits
        got = plain(input_ids=ids).logits
        base_logits = AutoModelForImageTextToText.from_pretrained(base_dir)(input_ids=ids).logits
    assert (want - base_logits).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)

    # PEFT's merge_and_unload, saved by transformers (in the model's layout): the same tensors
    reloaded.merge_and_unload().save_pretrained(tmp_path / "peft_merged")
    peft_merged = _checkpoint(tmp_path / "peft_merged")
    for k in expert_keys:
        mine = merged[k].transpose(1, 2) if layout == "hub" else merged[k]
        torch.testing.assert_close(mine, peft_merged[k], rtol=0, atol=1e-6)
