"""GGUF export with llama.cpp's own converter, for each family the tiny builders make, and the
serve check in llama.cpp (llama-mtmd-cli). The tests fetch llama-cpp-python's source
distribution from PyPI and build llama.cpp's two tools from it once (cached under
~/.cache/vlmflow, like the SLURM and browser tests install their packages)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from vlmflow.config import resolve_sections
from vlmflow.export import export_model
from vlmflow.export_files import clean_export
from vlmflow.families import FAMILIES
from vlmflow.gguf import (
    BUILD_TYPE_ENV,
    GGUF_FAMILIES,
    GGUFError,
    build_type,
    check_gguf_source,
    converter_dir,
    export_gguf,
    fetch_source,
    llama_cpp_tools,
    read_gguf,
)


@pytest.fixture(scope="module", autouse=True)
def fast_build():
    """The tests build llama.cpp's tools without optimisation (CMake build type None: no -O,
    no -g): 823 CPU-seconds instead of Release's ~1200 on this project's machine; the tiny
    model runs as fast. Users get Release (vlmflow.gguf.build_type)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(BUILD_TYPE_ENV, os.environ.get(BUILD_TYPE_ENV) or "None")
        yield


@pytest.fixture(scope="module", autouse=True)
def source(fast_build):
    """llama.cpp's source in the cache (what the local rule llama_cpp_source does)."""
    return fetch_source()


@pytest.fixture(scope="module")
def tools(source):
    """llama-mtmd-cli and llama-quantize, built once (minutes on 2 cores; see build.json)."""
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("no cmake / C++ compiler here: llama.cpp's tools cannot be built")
    out = llama_cpp_tools()
    print("llama.cpp build:", (out / "build.json").read_text())
    return out


def deepen(src: str, out: Path, layers: int = 4) -> Path:
    """The tiny model with a `layers`-block vision tower: llama.cpp's tensor map names Qwen's
    projector `merger.mlp.{i}` through the block index, so the usual 2-block tower cannot be
    converted; released models have 24 to 32."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    c = AutoConfig.from_pretrained(src)
    v = c.vision_config
    for key in ("depth", "num_hidden_layers"):
        if hasattr(v, key):
            setattr(v, key, layers)
    if hasattr(v, "fullatt_block_indexes"):
        v.fullatt_block_indexes = [1, 3]
    if hasattr(v, "deepstack_visual_indexes"):
        v.deepstack_visual_indexes = [1, 2]
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(c).to(torch.bfloat16).save_pretrained(out)
    AutoProcessor.from_pretrained(src).save_pretrained(out)
    for f in Path(src).glob("*.jinja"):
        shutil.copy(f, out / f.name)
    # the processor files a merged export carries (preprocessor_config.json for the converter)
    clean_export(out, processor=AutoProcessor.from_pretrained(out))
    return out


@pytest.fixture(scope="module")
def deep_base(tiny_qwen, tmp_path_factory):
    return deepen(tiny_qwen, tmp_path_factory.mktemp("gguf") / "tiny-deep")


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


def test_the_converter_is_never_fetched_by_a_job(tmp_path):
    """Compute nodes have no internet: without the local rule's fetch, the export says so."""
    with pytest.raises(GGUFError, match="llama_cpp_source"):
        converter_dir(tmp_path / "empty-cache")


def test_the_build_type_names_the_tools_folder_and_build_json(tools, monkeypatch):
    info = json.loads((tools / "build.json").read_text())
    assert (
        info["build_type"] == build_type() == "None"
        and "-DCMAKE_BUILD_TYPE=None" in (info["cmake_flags"])
    )
    assert tools.name.endswith("-none") and info["cpu_seconds"] > 0
    monkeypatch.setenv(BUILD_TYPE_ENV, "Release")
    assert build_type() == "Release"
    monkeypatch.setenv(BUILD_TYPE_ENV, "Release -DX=1")
    with pytest.raises(GGUFError, match=BUILD_TYPE_ENV):
        llama_cpp_tools()


def test_q4_k_m_is_quantized_by_llama_cpp(merged, tools, tmp_path):
    summary = export_gguf(merged, tmp_path / "q4", "gguf_q4_k_m", pretokenizer="qwen2")
    assert summary["model"] == "model-q4_k_m.gguf" and summary["mmproj"] == "mmproj-bf16.gguf"
    assert sorted(p.name for p in (tmp_path / "q4").glob("*.gguf")) == [
        "mmproj-bf16.gguf",
        "model-q4_k_m.gguf",
    ]
    lm = read_gguf(tmp_path / "q4" / "model-q4_k_m.gguf")
    # llama-quantize's own rule: a tensor whose rows are not a multiple of 256 (every tensor of
    # the tiny model) falls back from Q4_K to Q5_0 / Q8_0; Q5_0 appears only in Q4_K_M's mix
    assert "Q5_0" in lm["types"] and lm["arch"] == "qwen2vl"
    modelfile = (tmp_path / "q4" / "Modelfile").read_text()
    assert "FROM ./model-q4_k_m.gguf" in modelfile


def test_the_supported_families_are_the_converters(source):
    """GGUF_FAMILIES = the registry families whose architecture llama.cpp's converter registers
    both as a text model and as an mmproj (its own tables, conversion/__init__.py)."""
    import ast

    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from vlmflow.families import FAMILIES

    tree = ast.parse((converter_dir() / "conversion" / "__init__.py").read_text())
    tables = {
        node.target.id: {k.value for k in node.value.keys}
        for node in tree.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Dict)
    }
    text, mmproj = tables["TEXT_MODEL_MAP"], tables["MMPROJ_MODEL_MAP"]
    both = set()
    for family in FAMILIES:
        model_type = FAMILIES[family].model_types[0].split(":")[0]
        arch = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type]
        if arch in text and arch in mmproj:
            both.add(family)
    # LlavaForConditionalGeneration is registered for Pixtral towers only: the converter stops
    # on LLaVA 1.5's CLIP tower ("Unsupported model type: clip_vision_model").
    # The MoE families are registered by the converter but their conversion (fused experts) was
    # not tried here: they are refused at config time until it is.
    assert both - {"llava"} - {"qwen3_vl_moe", "qwen3_5_moe"} == GGUF_FAMILIES
    assert {"llava", "llava_next", "mllama", "idefics3", "smolvlm"}.isdisjoint(GGUF_FAMILIES)


# Families the converter registers whose TINY models it cannot convert (measured; the released
# checkpoints differ in exactly these respects).
TINY_CONVERTER_FAILURES = {
    "gemma3": "Can not map tensor 'vision_tower.embeddings.patch_embedding.bias'",
    "gemma4": "Cannot find Llama BPE tokenizer",  # the tiny tokenizer is not Gemma's
    "qwen3_5": "opt_num_mtp_layers",  # the converter asserts MTP layers; the tiny model has none
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_converts_or_is_refused_at_config_time(family, tiny_model, tmp_path):
    """Every family the tiny builders make: converted to GGUF + mmproj (read back with
    llama.cpp's reader), or refused when the config is read, naming the family."""
    base = tiny_model(family)
    cfg = {"name": base, "revision": None}
    if family not in GGUF_FAMILIES:
        with pytest.raises(GGUFError, match=f"model family '{family}'.*not one llama.cpp"):
            check_gguf_source(cfg)
        with pytest.raises(GGUFError, match=f"'{family}'"):
            check_gguf_source(
                {"name": f"resources/models/tiny-{family}", "revision": None},
                built_by_rule="resources/models/tiny-",
            )
        return
    check_gguf_source(cfg)
    deep = deepen(base, tmp_path / "deep")
    if family in TINY_CONVERTER_FAILURES:  # the converter's own message, not a traceback of ours
        with pytest.raises(GGUFError, match=TINY_CONVERTER_FAILURES[family]):
            export_gguf(deep, tmp_path / "gguf", "gguf", pretokenizer="qwen2")
        assert not (tmp_path / "gguf").exists()
        return
    summary = export_gguf(deep, tmp_path / "gguf", "gguf", pretokenizer="qwen2")
    lm = read_gguf(tmp_path / "gguf" / summary["model"])
    assert lm["arch"] not in (None, "clip") and any(n.startswith("blk.1.") for n in lm["names"])
    assert lm["chat_template"] and "{% generation" not in lm["chat_template"]
    mm = read_gguf(tmp_path / "gguf" / summary["mmproj"])
    assert mm["arch"] == "clip" and any(n.startswith("v.blk.") for n in mm["names"])


def _serve_cfg(merged, method: str, samples: int = 2, **export) -> dict:
    return resolve_sections(
        {
            "model": {"name": str(merged), "max_seq_length": 256},
            "export": {"save_method": method, "check_samples": samples, **export},
        },
        ["model", "export"],
    )


@pytest.mark.parametrize("method", ["gguf", "gguf_q8_0", "gguf_q4_k_m"])
def test_serve_check_in_llama_cpp(method, merged, tools, digits_rows, tmp_path):
    """llama.cpp (a fresh llama-mtmd-cli per prompt, image through the mmproj) answers the merge
    check's prompts as the merged model does in transformers: every served token within the gap
    tolerance for bf16 (the exact greedy prefix may part at a near tie: reported, not gated);
    the quantized ones gated by serve_check_min_agreement."""
    from vlmflow.serve_check import serve_check_gguf

    export_gguf(merged, tmp_path / "gguf", method, pretokenizer="qwen2")
    cfg = _serve_cfg(merged, method)
    result = serve_check_gguf(merged, tmp_path / "gguf", digits_rows, cfg["export"], cfg["model"])
    print(method, json.dumps(result, indent=2))
    assert len(result["samples"]) == 2
    for s in result["samples"]:
        assert s["reference_tokens"] > 0 and s["served_tokens"] > 0 and not s["unscored"]
        assert len(s["gaps"]) == s["served_tokens"] and s["max_gap"] == max(s["gaps"])
    assert result["passed"] and 0 <= result["prefix_agreement"] <= 1
    if method == "gguf":
        assert result["required_agreement"] == 1.0 and result["token_agreement"] == 1.0
        assert result["max_gap"] <= cfg["export"]["serve_check_gap_tolerance"]
    else:
        assert result["token_agreement"] >= cfg["export"]["serve_check_min_agreement"] > 0


def test_serve_check_fails_on_another_models_gguf(merged, deep_base, tools, digits_rows, tmp_path):
    """The check can fail: the base's GGUF (without the LoRA) does not answer as the merge; at
    its first token no top-50 token of the merged model continues its answer."""
    from vlmflow.serve_check import ServeCheckError, serve_check_gguf

    export_gguf(deep_base, tmp_path / "gguf", "gguf", pretokenizer="qwen2")
    cfg = _serve_cfg(merged, "gguf")
    with pytest.raises(ServeCheckError, match=r"are within [0-9.]+ std of the merged model") as e:
        serve_check_gguf(merged, tmp_path / "gguf", digits_rows, cfg["export"], cfg["model"])
    result = e.value.result
    assert result["token_agreement"] < 0.5 and result["max_gap"] is None
    assert all(s["unscored"] for s in result["samples"])
