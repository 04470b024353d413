import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vlmflow.config import resolve_sections
from vlmflow.export import export_model
from vlmflow.merge import MergeError, merge_weights
from vlmflow.merge_check import MergeCheckError


def _cfg(model: str, **export) -> dict:
    return resolve_sections(
        {"model": {"name": model, "max_seq_length": 256}, "export": export}, ["model", "export"]
    )


def _checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118
    return out


@pytest.fixture(scope="module")
def sharded_base(tiny_qwen, tmp_path_factory):
    """The tiny base saved in many small shards (as a 7B checkpoint is)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path_factory.mktemp("sharded") / "base"
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen)
    model.save_pretrained(out, max_shard_size="100KB")
    AutoProcessor.from_pretrained(tiny_qwen).save_pretrained(out)
    return out


def test_streaming_merge_of_a_sharded_base_equals_peft_and_loads_without_vlmflow(
    sharded_base, trained_adapter, digits_rows, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base_shards = sorted(sharded_base.glob("*.safetensors"))
    assert len(base_shards) > 3
    cfg = _cfg(str(sharded_base), max_shard_size="150KB")
    out, check_path = tmp_path / "merged", tmp_path / "merge_check.json"
    train = [r for r in digits_rows if r["split"] == "train"]
    summary = export_model(
        cfg["model"],
        trained_adapter,
        out,
        cfg["export"],
        check_rows=train,
        check_path=check_path,
        data_summary={"rows_in": 200, "splits": {"train": len(train)}},
    )
    assert summary["lora_merged"] == 2 * 7 + 2 * 5  # 7 per decoder layer, 5 per vision block
    assert summary["replaced"] == 6  # lm_head + the projector's 5 tensors (modules_to_save)

    # Shards + index, with the base checkpoint's own key names.
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    base = _checkpoint(sharded_base)
    merged = _checkpoint(out)
    assert set(merged) == set(base) == set(index["weight_map"])
    assert any(k.startswith("model.layers.") for k in merged)  # checkpoint names, not the model's
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}

    # Reference: the adapter on the base (PEFT, unmerged: logits), and PEFT's own merge (fp32).
    from PIL import Image
    from transformers import AutoProcessor

    image = digits_rows[0]["images"][0]
    p = AutoProcessor.from_pretrained(out)
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit?"}]}
    ]
    text = p.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    batch = p(text=[text], images=[[Image.open(image).convert("RGB")]], return_tensors="pt")
    ref = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(sharded_base), trained_adapter
    )
    with torch.no_grad():
        want_logits = ref(**batch).logits[0, -1]
    ref.merge_and_unload().save_pretrained(tmp_path / "peft_merged")
    want = _checkpoint(tmp_path / "peft_merged")
    changed = 0
    for k, t in merged.items():
        assert torch.equal(t, want[k].to(torch.bfloat16)), k
        changed += not torch.equal(t, base[k].to(torch.bfloat16))
    assert changed >= 2 * 7 + 2 * 5 + 6

    check = json.loads(check_path.read_text())
    assert check["passed"] and check["check_dtype"] == "float32"
    assert (
        check["max_abs_diff"]
        <= check["tolerance"]
        == pytest.approx(0.02 * check["max_abs_reference_logit"])
    )
    card = (out / "README.md").read_text()
    assert f"base_model: {sharded_base}" in card
    assert '"lora_alpha": 16' in card and '"rows_in": 200' in card and "merge check" in card
    for f in ("config.json", "generation_config.json", "chat_template.jinja", "tokenizer.json"):
        assert (out / f).exists(), f

    # A fresh interpreter that never imports vlmflow loads it with plain transformers and
    # generates; its logits match the adapter on the base to bf16 precision.
    code = textwrap.dedent(f"""
        import json, sys, torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor
        m = AutoModelForImageTextToText.from_pretrained({str(out)!r})
        p = AutoProcessor.from_pretrained({str(out)!r})
        msgs = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Which digit?"}}]}}]
        text = p.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        batch = p(text=[text], images=[[Image.open({image!r}).convert("RGB")]], return_tensors="pt")
        with torch.no_grad():
            logits = m(**batch).logits[0, -1].float()
            gen = m.generate(**batch, max_new_tokens=2, do_sample=False)
        assert "vlmflow" not in sys.modules
        print(json.dumps({{"dtype": str(m.dtype), "logits": logits.tolist(), "new": gen.shape[1] - batch["input_ids"].shape[1]}}))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["dtype"] == "torch.bfloat16" and got["new"] >= 1
    assert (torch.tensor(got["logits"]) - want_logits).abs().max().item() < 0.05


def test_the_check_fails_a_wrong_merge_and_writes_nothing(
    tiny_qwen, trained_adapter, digits_rows, tmp_path, monkeypatch
):
    """A merge that applies half of each LoRA update must fail the check."""
    import vlmflow.merge as M

    full = M.LoraDelta.delta
    monkeypatch.setattr(M.LoraDelta, "delta", lambda self: 0.5 * full(self))
    cfg = _cfg(tiny_qwen)
    out, check_path = tmp_path / "merged", tmp_path / "merge_check.json"
    with pytest.raises(MergeCheckError, match="merge check failed"):
        export_model(
            cfg["model"],
            trained_adapter,
            out,
            cfg["export"],
            check_rows=digits_rows[:8],
            check_path=check_path,
        )
    check = json.loads(check_path.read_text())
    assert not check["passed"] and check["max_abs_diff"] > check["tolerance"]
    assert not out.exists() and not list(tmp_path.glob(".merged*"))


def test_adapter_weights_that_match_no_base_tensor_stop_the_merge(
    tiny_qwen, trained_adapter, tmp_path
):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "adapter"
    shutil.copytree(trained_adapter, bad)
    weights = load_file(bad / "adapter_model.safetensors")
    weights = {k.replace("layers.1.", "layers.7."): v for k, v in weights.items()}
    save_file(weights, bad / "adapter_model.safetensors")
    (tmp_path / "out").mkdir()
    with pytest.raises(MergeError, match=r"match no tensor.*layers\.7\.mlp"):
        merge_weights(_cfg(tiny_qwen)["model"], bad, tmp_path / "out", torch.bfloat16, "5GB")


def test_a_quantized_or_pickle_only_base_is_refused(tiny_qwen, trained_adapter, tmp_path):
    import shutil

    q = tmp_path / "prequantized"
    shutil.copytree(tiny_qwen, q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match="already quantized.*original"):
        merge_weights(_cfg(str(q))["model"], trained_adapter, tmp_path, torch.bfloat16, "5GB")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(Path(tiny_qwen) / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(MergeError, match="only pickle files"):
        merge_weights(_cfg(str(pickled))["model"], trained_adapter, tmp_path, torch.bfloat16, "5GB")


def test_tied_lm_head_trained_in_full_is_written_untied(tiny_qwen, digits_rows, tmp_path):
    """Bases that tie lm_head to the input embeddings (Qwen2.5-VL-3B) store no lm_head; a trained
    lm_head (modules_to_save) becomes its own tensor and the config unties them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    config = AutoConfig.from_pretrained(tiny_qwen)
    config.tie_word_embeddings = True
    config.get_text_config().tie_word_embeddings = True
    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_config(config)
    base.save_pretrained(tmp_path / "tied")
    AutoProcessor.from_pretrained(tiny_qwen).save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in _checkpoint(tmp_path / "tied")
    peft = get_peft_model(
        base,
        LoraConfig(
            r=4,
            target_modules=[r"model.language_model.layers.0.self_attn.q_proj"],
            modules_to_save=["lm_head"],
            init_lora_weights=False,
        ),
    )
    with torch.no_grad():
        peft.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    peft.save_pretrained(tmp_path / "adapter")
    cfg = _cfg(str(tmp_path / "tied"))
    out = tmp_path / "merged"
    summary = export_model(
        cfg["model"], tmp_path / "adapter", out, cfg["export"], check_rows=digits_rows[:4]
    )
    assert summary["untied_embeddings"] and summary["check"]["passed"]
    merged = _checkpoint(out)
    assert "lm_head.weight" in merged
    assert not torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False


def test_merged_4bit_is_quantized_and_reports_its_error(
    tiny_qwen, trained_adapter, digits_rows, tmp_path
):
    from transformers import AutoModelForImageTextToText

    cfg = _cfg(tiny_qwen, save_method="merged_4bit")
    out = tmp_path / "merged"
    summary = export_model(
        cfg["model"], trained_adapter, out, cfg["export"], check_rows=digits_rows[:4]
    )
    check = summary["check"]
    assert check["passed"]  # the 16-bit merge it was quantized from is right
    q = check["quantized"]
    assert q["max_abs_diff"] > check["max_abs_diff"] and 0 < q["top1_agreement"] <= 1
    saved = json.loads((out / "config.json").read_text())
    assert saved["quantization_config"]["load_in_4bit"] is True
    assert not (out / ".merged_16bit").exists()
    model = AutoModelForImageTextToText.from_pretrained(out)
    layer = model.model.language_model.layers[0].mlp.up_proj
    assert type(layer).__name__ == "Linear4bit"
    assert type(model.lm_head).__name__ == "Linear"  # kept 16-bit, as in QLoRA training
    assert "4-bit NF4" in (out / "README.md").read_text()


def test_save_method_lora_keeps_the_adapter(tiny_qwen, trained_adapter, tmp_path):
    cfg = _cfg(tiny_qwen, save_method="lora")
    check = tmp_path / "merge_check.json"
    export_model(cfg["model"], trained_adapter, tmp_path / "out", cfg["export"], check_path=check)
    assert (tmp_path / "out/adapter_model.safetensors").read_bytes() == (
        Path(trained_adapter) / "adapter_model.safetensors"
    ).read_bytes()
    assert not list((tmp_path / "out").glob("model*.safetensors"))
    assert "skipped" in json.loads(check.read_text())
