"""GGUF export with llama.cpp's own converter (fetched from llama-cpp-python's source
distribution by the export itself, like the SLURM tests install their packages)."""

import json

import pytest
import torch

from vlmflow.config import resolve_sections
from vlmflow.export import export_model
from vlmflow.gguf import GGUFError, export_gguf, read_gguf


@pytest.fixture(scope="module")
def deep_base(tiny_qwen, tmp_path_factory):
    """The tiny Qwen2.5-VL with 4 vision blocks: llama.cpp's tensor map names the projector's
    `merger.mlp.{i}` through the block index, so a 2-block tower (the usual tiny one) cannot be
    converted; released models have 32."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    out = tmp_path_factory.mktemp("gguf") / "tiny-deep"
    c = AutoConfig.from_pretrained(tiny_qwen)
    c.vision_config.depth, c.vision_config.fullatt_block_indexes = 4, [1, 3]
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(c).to(torch.bfloat16).save_pretrained(out)
    AutoProcessor.from_pretrained(tiny_qwen).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def merged(deep_base, digits_rows, tmp_path_factory):
    """A random LoRA on every language attention linear, merged (save_method gguf)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    root = tmp_path_factory.mktemp("gguf-run")
    torch.manual_seed(1)
    peft = get_peft_model(
        AutoModelForImageTextToText.from_pretrained(deep_base),
        LoraConfig(
            r=4,
            target_modules=r".*language_model.*\.(q_proj|v_proj)",
            init_lora_weights=False,
        ),
    )
    peft.save_pretrained(root / "adapter")
    cfg = resolve_sections(
        {
            "model": {"name": str(deep_base), "max_seq_length": 256},
            "export": {"save_method": "gguf"},
        },
        ["model", "export"],
    )
    export_model(
        cfg["model"], root / "adapter", root / "merged", cfg["export"], check_rows=digits_rows[:2]
    )
    return root / "merged"


def test_gguf_export_writes_the_language_model_mmproj_and_modelfile(merged, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "gguf"
    summary = export_gguf(merged, out, "gguf", pretokenizer="qwen2")
    assert summary["model"] == "model-bf16.gguf" and summary["mmproj"] == "mmproj-bf16.gguf"
    lm = read_gguf(out / "model-bf16.gguf", tensors=["blk.0.attn_q.weight"])
    assert lm["arch"] == "qwen2vl" and "BF16" in lm["types"]
    # the serving chat template (no {% generation %}) is the one in the GGUF
    assert lm["chat_template"] == (merged / "chat_template.jinja").read_text()
    assert "{% generation" not in lm["chat_template"]
    # the merged weights, not the base's: llama.cpp's reader gives back the merged tensor
    with safe_open(merged / "model.safetensors", "pt") as f:
        key = next(k for k in f.keys() if k.endswith("layers.0.self_attn.q_proj.weight"))  # noqa: SIM118
        want = f.get_tensor(key).float().ravel()
    got = torch.tensor(lm["values"]["blk.0.attn_q.weight"])
    assert torch.equal(got, want)
    mm = read_gguf(out / "mmproj-bf16.gguf")
    assert mm["arch"] == "clip"
    assert any(n.startswith("v.blk.3.") for n in mm["names"])  # all 4 vision blocks
    assert any(n.startswith("mm.") for n in mm["names"])  # the projector
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-bf16.gguf" in modelfile and "FROM ./mmproj-bf16.gguf" in modelfile
    assert json.loads((out / "gguf_export.json").read_text())["quantization"] == "bf16"


def test_an_unknown_tokenizer_is_named_by_the_converters_error(merged, tmp_path):
    with pytest.raises(GGUFError, match="pre-tokenizer was not recognized"):
        export_gguf(merged, tmp_path / "gguf", "gguf")
    assert not (tmp_path / "gguf").exists()


def test_q4_k_m_without_llama_cpp_says_what_it_needs(merged, tmp_path):
    pytest.importorskip("torch")
    try:
        import llama_cpp  # noqa: F401

        pytest.skip("llama-cpp-python is installed: the quantizer is there")
    except ImportError:
        pass
    with pytest.raises(GGUFError, match="needs llama-cpp-python"):
        export_gguf(merged, tmp_path / "gguf", "gguf_q4_k_m", pretokenizer="qwen2")
