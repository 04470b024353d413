"""Merge a LoRA adapter into the original 16-bit base weights and save a plain transformers model.

The base is always loaded fresh from its checkpoint in 16/32-bit (never the 4-bit weights the
adapter may have been trained against), merged in fp32 and cast to the export dtype.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .io import atomic_dir, write_json

log = logging.getLogger(__name__)


def merge_adapter(
    model_cfg: dict, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, export_cfg: dict
) -> dict:
    """Write the merged model + processor to `out_dir`. Returns a summary dict."""
    from peft import PeftModel

    from .modeling import load_model, load_processor

    merge_cfg = dict(model_cfg, dtype="float32", load_in_4bit=False)
    base, family = load_model(merge_cfg, torch.device("cpu"), quantize=False)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model = model.merge_and_unload()
    dtype = getattr(torch, export_cfg["dtype"])
    model = model.to(dtype)
    processor = load_processor(model_cfg)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        summary = {
            "base_model": model_cfg["name"],
            "base_revision": model_cfg["revision"],
            "adapter": str(adapter_dir),
            "save_method": export_cfg["save_method"],
            "dtype": export_cfg["dtype"],
            "family": family.name,
        }
        write_json(tmp / "vlmflow_merge.json", summary)
        (tmp / "README.md").write_text(model_card(summary, Path(adapter_dir)))
    return summary


def model_card(summary: dict, adapter_dir: Path) -> str:
    cfg_path = adapter_dir / "vlmflow_train_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        f"base_model: {summary['base_model']}",
        "tags: [vlmflow, lora, merged]",
        "---",
        "",
        f"# Fine-tuned {summary['base_model']}",
        "",
        f"LoRA adapter merged into the {summary['dtype']} base weights by vlmflow "
        f"(`save_method: {summary['save_method']}`). Loads with plain transformers:",
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        'model = AutoModelForImageTextToText.from_pretrained("<this folder>")',
        'processor = AutoProcessor.from_pretrained("<this folder>")',
        "```",
        "",
        "## Training settings",
        "",
        "```json",
        json.dumps({k: cfg.get(k) for k in ("lora", "train")}, indent=2),
        "```",
    ]
    return "\n".join(lines) + "\n"
