"""Exported folders load where users serve them: a serving chat template, every processor file,
no run-time flags, a config that transformers 4.57 reads as transformers 5 does."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vlmflow.config import resolve_sections
from vlmflow.export import export_model
from vlmflow.export_files import (
    PROCESSOR_CONFIGS,
    RUNTIME_KEYS,
    clean_export,
    has_generation_tags,
    legacy_config_keys,
    serving_template,
)

MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "7"}]},
    {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
]


def _cfg(model: str, **export) -> dict:
    return resolve_sections(
        {"model": {"name": model, "max_seq_length": 256}, "export": export}, ["model", "export"]
    )


def _all_json(folder: Path) -> dict:
    """The configs that loaders read (not vlmflow's own records)."""
    names = [*PROCESSOR_CONFIGS, "config.json", "generation_config.json"]
    return {n: json.loads((folder / n).read_text()) for n in names if (folder / n).is_file()}


def _keys(obj) -> set:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _keys(v)}
    return set()


def _sandbox_render(template: str, messages, add_generation_prompt: bool) -> str:
    """Render as jinja2-based servers do (llama-cpp-python's chat handler: a sandboxed
    environment with no transformers extensions)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, eos_token="</s>"
    )


def test_serving_template_drops_generation_tags_and_renders_the_same():
    from jinja2 import TemplateSyntaxError

    train = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}A: "
        "{{ m['content'] }}{%- endgeneration %}\n{%- generation -%}  x  {%- endgeneration -%}"
        "{% else %}U: {{ m['content'] }}\n{% endif %}{% endfor %}"
    )
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(TemplateSyntaxError, match="generation"):
        _sandbox_render(train, msgs, False)
    serve = serving_template(train)
    assert not has_generation_tags(serve)
    # transformers renders the tags as no-ops: the serving template gives the same text
    from transformers.utils.chat_template_utils import render_jinja_template

    want = render_jinja_template(conversations=[msgs], chat_template=train)[0][0]
    assert _sandbox_render(serve, msgs, False) == want == "U: hi\nA: yox"


def test_legacy_config_keys_match_the_v5_parameters():
    cfg = {
        "model_type": "qwen2_5_vl",
        "dtype": "bfloat16",
        "text_config": {
            "model_type": "qwen2_5_vl_text",
            "dtype": "float32",
            "rope_parameters": {
                "mrope_section": [2, 3, 3],
                "rope_theta": 1e6,
                "rope_type": "default",
                "type": "mrope",
            },
        },
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "rope_parameters": {"rope_theta": 1e4, "rope_type": "axial"},
        },
    }
    out = legacy_config_keys(cfg)
    assert out["torch_dtype"] == "bfloat16" and out["text_config"]["torch_dtype"] == "float32"
    t = out["text_config"]
    assert t["rope_theta"] == 1e6
    assert t["rope_scaling"] == {
        "mrope_section": [2, 3, 3],
        "rope_type": "default",
        "type": "mrope",
    }
    assert "rope_scaling" not in out["vision_config"]  # v4 vision towers had none
    gemma = legacy_config_keys(
        {
            "model_type": "gemma3_text",
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        }
    )
    assert gemma["rope_theta"] == 1e6 and gemma["rope_local_base_freq"] == 1e4
    assert gemma["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}


def test_merged_export_is_clean_for_servers(tiny_qwen, trained_adapter, digits_rows, tmp_path):
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

    cfg = _cfg(tiny_qwen)
    out = tmp_path / "merged"
    train = [r for r in digits_rows if r["split"] == "train"]
    export_model(cfg["model"], trained_adapter, out, cfg["export"], check_rows=train[:2])
    trained = AutoProcessor.from_pretrained(trained_adapter)
    assert has_generation_tags(trained.chat_template)  # what training saved

    template = (out / "chat_template.jinja").read_text()
    assert not has_generation_tags(template)
    for prompt in (False, True):
        msgs = MESSAGES if not prompt else MESSAGES[:1]
        want = trained.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
        assert _sandbox_render(template, msgs, prompt) == want

    # every processor file, the v4 names included, and no run-time flags
    for f in ("preprocessor_config.json", "video_preprocessor_config.json"):
        assert (out / f).is_file(), f
    image_proc = AutoImageProcessor.from_pretrained(out)
    assert image_proc.to_dict()["patch_size"] == trained.image_processor.patch_size
    found = _keys(_all_json(out)) & set(RUNTIME_KEYS)
    assert not found, found

    # the v4 spellings of the config say what the v5 ones say
    saved = json.loads((out / "config.json").read_text())
    text = saved["text_config"]
    assert text["rope_scaling"]["mrope_section"] == text["rope_parameters"]["mrope_section"]
    assert saved["torch_dtype"] == saved["dtype"] == "bfloat16"
    v5 = AutoConfig.from_pretrained(out).to_dict()
    base = AutoConfig.from_pretrained(tiny_qwen).to_dict()
    assert v5["text_config"]["rope_parameters"] == base["text_config"]["rope_parameters"]


def test_lora_export_names_its_base_absolutely(tiny_qwen, trained_adapter, tmp_path, monkeypatch):
    rel = os.path.relpath(tiny_qwen, tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(rel, save_method="lora")
    export_model(cfg["model"], trained_adapter, tmp_path / "out", cfg["export"])
    adapter_cfg = json.loads((tmp_path / "out/adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(Path(tiny_qwen).resolve())
    assert not has_generation_tags((tmp_path / "out/chat_template.jinja").read_text())
    assert (tmp_path / "out/preprocessor_config.json").is_file()
    assert not _keys(_all_json(tmp_path / "out")) & set(RUNTIME_KEYS)


# ------------------------------------------------------------------------ transformers 4.57
OLDEST_TRANSFORMERS = "4.57.6"
_PROBE = textwrap.dedent("""
    import json, sys, torch
    import transformers
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    out = {}
    for path in sys.argv[1:]:
        try:
            m = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
            p = AutoProcessor.from_pretrained(path)
            msgs = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": "Which digit?"}]}]
            text = p.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            b = p(text=[text], images=[[Image.new("RGB", (64, 64), (200, 10, 10))]],
                  return_tensors="pt")
            with torch.no_grad():
                gen = m.generate(**b, max_new_tokens=4, do_sample=False)
                logits = m(**b).logits[0, -1]
            out[path] = {"gen": gen[0, b["input_ids"].shape[1]:].tolist(),
                         "logits": logits.tolist()}
        except Exception as e:
            out[path] = {"error": f"{type(e).__name__}: {e}"}
    print("RESULT " + json.dumps({"version": transformers.__version__, "out": out}))
""")


# Families newer than OLDEST_TRANSFORMERS (their folders need transformers 5).
NEWER_THAN_OLDEST = ("qwen3_5", "gemma4", "qwen3_5_moe")
# Saved by transformers 5 in its fused-expert layout, which 4.57 cannot load; a merged export of
# a hub checkpoint keeps the checkpoint's own (per-expert / transposed) layout (vlmflow.merge).
V5_LAYOUT_ONLY = ("qwen3_vl_moe",)


def _oldest_transformers() -> Path:
    """transformers 4.57 (with its tokenizers and huggingface_hub) in a --target folder of the
    user cache, installed once from the package index; torch is the venv's."""
    target = Path.home() / ".cache" / "vlmflow-tests" / f"transformers-{OLDEST_TRANSFORMERS}"
    if not (target / "google" / "protobuf").is_dir():
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--target",
                str(target),
                f"transformers=={OLDEST_TRANSFORMERS}",
                "tokenizers>=0.22,<0.23",
                "huggingface_hub>=0.34,<1.0",
                "protobuf",  # Gemma's tokenizer in v4
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if res.returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            pytest.skip(f"cannot install transformers {OLDEST_TRANSFORMERS}: {res.stderr[-500:]}")
    return target


def _probe(paths, pythonpath: str | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    res = subprocess.run(
        [sys.executable, "-c", _PROBE, *map(str, paths)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, res.stderr[-3000:]
    return json.loads(line[-1].removeprefix("RESULT "))


def test_transformers_4_57_generates_what_transformers_5_does(tmp_path):
    """Every family's folder as transformers 5 saves it, cleaned: transformers 4.57 loads it and
    gives the same greedy tokens and logits. Without the cleaning it fails (Qwen2.5-VL's
    `rope_scaling` is gone, the tokenizer class has a v5-only name, ...)."""
    from transformers import AutoProcessor

    from vlmflow.families import FAMILIES
    from vlmflow.tiny import build_tiny

    old = _oldest_transformers()
    clean, raw = [], []
    for family in FAMILIES:
        folder = build_tiny(family, tmp_path / f"tiny-{family}")
        raw.append(folder)
        c = tmp_path / f"clean-{family}"
        shutil.copytree(folder, c)
        clean_export(c, processor=AutoProcessor.from_pretrained(c))
        clean.append(c)
    v4 = _probe([*clean, raw[list(FAMILIES).index("qwen2_5_vl")]], str(old))
    v5 = _probe(clean, None)
    assert v4["version"] == OLDEST_TRANSFORMERS and v5["version"].startswith("5.")
    failed = {p: r["error"] for p, r in v4["out"].items() if "error" in r}
    raw_qwen = str(raw[list(FAMILIES).index("qwen2_5_vl")])
    # the uncleaned folder does not run: v4 reads rope_scaling["mrope_section"], gone in v5 form
    assert "NoneType" in failed.pop(raw_qwen, "")
    # families transformers 4.57 does not have: their exports need transformers 5
    for family in NEWER_THAN_OLDEST:
        assert "does not recognize this architecture" in failed.pop(
            str(clean[list(FAMILIES).index(family)]), ""
        ), family
    for family in V5_LAYOUT_ONLY:
        assert "Error(s) in loading state_dict" in failed.pop(
            str(clean[list(FAMILIES).index(family)]), ""
        ), family
    assert not failed, failed
    differ = []
    for family, path in zip(FAMILIES, map(str, clean)):
        if family in NEWER_THAN_OLDEST + V5_LAYOUT_ONLY:
            continue
        a, b = v4["out"][path], v5["out"][path]
        diff = max(abs(x - y) for x, y in zip(a["logits"], b["logits"]))
        if a["gen"] != b["gen"] or diff > 1e-4:
            differ.append(family)
    # Compared: the Qwen-VL families, Mllama, Pixtral, InternVL. Not comparable here: the tiny
    # LLaVA, LLaVA-NeXT, LLaVA-OneVision and Gemma 3 checkpoints are saved by transformers 5,
    # which names the CLIP / SigLIP tower's weights its own way (`vision_tower.embeddings`, v4
    # reads `vision_tower.vision_model.embeddings`); a merged export keeps the base checkpoint's
    # names, which for hub checkpoints are v4's. Idefics3/SmolVLM differ by ~0.03 in the logits
    # (v4's image processing; not investigated). All of them load and generate in 4.57.
    assert set(differ) <= {
        "llava",
        "llava_next",
        "llava_onevision",
        "gemma3",
        "idefics3",
        "smolvlm",
    }, differ
    assert {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "mllama", "pixtral", "internvl"} <= set(
        FAMILIES
    ) - set(differ)


def test_no_transformers_4_keys_for_model_types_4_never_had():
    """Gemma 4 / Qwen3.5 exist only in transformers 5, which reads `rope_scaling` first: a v4
    copy of Gemma 4's proportional RoPE without its rope_theta stopped the merged folder from
    loading. Such configs are left as they are; older types still get the v4 keys."""
    from vlmflow.export_files import legacy_config_keys

    rope = {
        "full_attention": {"rope_type": "proportional", "rope_theta": 1e6, "factor": 0.25},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    }
    gemma4 = {
        "model_type": "gemma4",
        "text_config": {"model_type": "gemma4_text", "rope_parameters": rope},
    }
    assert legacy_config_keys(gemma4) == gemma4
    gemma3 = {
        "model_type": "gemma3",
        "text_config": {"model_type": "gemma3_text", "rope_parameters": rope},
    }
    text = legacy_config_keys(gemma3)["text_config"]
    assert text["rope_theta"] == 1e6 and text["rope_local_base_freq"] == 1e4
    assert text["rope_scaling"]["rope_type"] == "proportional"
