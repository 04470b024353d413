"""4-bit NF4 (bitsandbytes): the one quantization config that QLoRA training
(`vlmflow.modeling.load_model`) and the 4-bit export build, and the export's re-quantization of a
16-bit merge (`requantize_4bit`)."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from .families import Family


def nf4_config(compute_dtype: torch.dtype, skip_modules: list[str], *, quant_storage=None):
    """NF4 with double quantization, computing in `compute_dtype`; `skip_modules` stay 16-bit.
    `quant_storage`: the dtype the packed weights are stored in (None: bitsandbytes' default)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
        llm_int8_skip_modules=skip_modules,
    )


def requantize_4bit(
    src: Path, out_dir: Path, family: Family, model_cfg: dict, export_dtype: torch.dtype
) -> None:
    """Load the 16-bit merge in `src` in NF4 (as QLoRA training does: the vision tower, projector
    and lm_head stay 16-bit) and save it quantized to `out_dir`."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        src,
        dtype=export_dtype,
        quantization_config=nf4_config(
            export_dtype, family.unquantized_modules(quantize_vision=False)
        ),
        device_map={"": 0} if torch.cuda.is_available() else {"": "cpu"},
        trust_remote_code=model_cfg["trust_remote_code"],
    )
    model.save_pretrained(out_dir)
    del model
    gc.collect()
