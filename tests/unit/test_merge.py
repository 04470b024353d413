import json
import subprocess
import sys
import textwrap

import torch

from vlmflow.config import resolve_sections
from vlmflow.merge import merge_adapter


def test_merged_model_loads_without_vlmflow_and_matches_adapter(
    tiny_qwen, trained_adapter, digits_rows, tmp_path
):
    cfg = resolve_sections(
        {"model": {"name": tiny_qwen}, "export": {"dtype": "bfloat16"}}, ["model", "export"]
    )
    out = tmp_path / "merged"
    summary = merge_adapter(cfg["model"], trained_adapter, out, cfg["export"])
    assert summary["save_method"] == "merged_16bit"
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    assert "base_model:" in (out / "README.md").read_text()

    # A fresh interpreter that never imports vlmflow loads it with plain transformers.
    image = digits_rows[0]["images"][0]
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
        assert "vlmflow" not in sys.modules
        print(json.dumps({{"dtype": str(m.dtype), "logits": logits.tolist()}}))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    merged = json.loads(res.stdout.strip().splitlines()[-1])
    assert merged["dtype"] == "torch.bfloat16"

    # Same prompt through base + adapter (PEFT, unmerged, fp32): logits agree to bf16 precision.
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    p = AutoProcessor.from_pretrained(tiny_qwen)
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit?"}]}
    ]
    text = p.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    batch = p(text=[text], images=[[Image.open(image).convert("RGB")]], return_tensors="pt")
    ref = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(tiny_qwen), trained_adapter
    )
    with torch.no_grad():
        want = ref(**batch).logits[0, -1]
    diff = (torch.tensor(merged["logits"]) - want).abs().max().item()
    assert diff < 0.05, diff
