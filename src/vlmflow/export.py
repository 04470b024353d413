"""Export a trained LoRA adapter as `export.save_method` (`lora`, `merged_16bit` or
`merged_4bit`, Unsloth's names): a short pipeline of named steps, each in the module named for it.

- `lora`: `copy_adapter` (the adapter folder, cleaned for servers);
- `merged_16bit`: `merge_16bit` (`vlmflow.merge`: the LoRA streamed into the ORIGINAL 16-bit
  base weights, plus the processor), then `check_merge` (`vlmflow.merge_check`: its logits vs the
  adapter on the fresh base; the export fails above the tolerance);
- `merged_4bit`: the same into a scratch folder, then `requantize_4bit` (`vlmflow.quantization`:
  NF4, double quantization; vision tower, projector and lm_head stay 16-bit) and its quantization
  error measured (reported, not gated). It is about 3.5x smaller than 16-bit, but the rounding of
  every language-model weight to 4 bits costs accuracy, and the 4-bit model cannot be merged into
  or trained further in 16-bit: keep the adapter (and the 16-bit merge, if you can afford the
  disk) when quality matters;
- then `vlmflow_export.json` (the summary) and, for a merge, the model card (`export_card`,
  written with `huggingface_hub.ModelCard`).

The output folder appears complete or not at all; `merge_check.json` is written either way.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from huggingface_hub import ModelCardData

from .artifacts import MergeCheck, Metrics, TrainSummary
from .export_files import clean_export, fix_adapter_config
from .io import atomic_dir, write_json
from .merge import merge_weights, read_base, save_processor
from .merge_check import check_merge, quantization_error
from .modeling import model_family
from .publish import metric_rows, render_card
from .quantization import requantize_4bit


def export_model(
    model_cfg: dict,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    export_cfg: dict,
    *,
    check_rows: list[dict] | None = None,
    check_path: str | os.PathLike | None = None,
    data_summary: dict | None = None,
    metrics: dict | None = None,
) -> dict:
    """Export the adapter as `export_cfg["save_method"]` into `out_dir`, check it, write the
    model card. Returns the summary (also written as vlmflow_export.json).

    Raises MergeCheckError (after writing `check_path`) when the check fails; `out_dir` is then
    left untouched.
    """
    method = export_cfg["save_method"]
    if method.startswith("gguf"):  # GGUF is converted from the 16-bit merge (rule gguf)
        method = "merged_16bit"
    adapter_dir = Path(adapter_dir)
    summary: dict = {"save_method": method, "dtype": export_cfg["dtype"]}
    with atomic_dir(out_dir) as tmp:
        if method == "lora":
            summary["base"] = copy_adapter(model_cfg, adapter_dir, tmp)
            check = MergeCheck(method, skipped="save_method lora: nothing is merged")
        else:
            stats, check = merge_and_check(
                model_cfg, adapter_dir, tmp, export_cfg, method, check_rows, check_path
            )
            summary.update(stats)
        summary["check"] = {k: v for k, v in check.to_json().items() if k != "save_method"}
        summary["adapter"] = str(adapter_dir)
        summary["family"] = model_family(str(tmp)).name if method != "lora" else None
        write_json(tmp / "vlmflow_export.json", summary)
        if method != "lora":
            card = export_card(
                summary, adapter_dir=adapter_dir, data_summary=data_summary, metrics=metrics
            )
            (tmp / "README.md").write_text(card)
    if check_path is not None:
        check.write(check_path)
    return summary


def merge_and_check(
    model_cfg: dict,
    adapter_dir: Path,
    out: Path,
    export_cfg: dict,
    method: str,
    rows: list[dict] | None,
    check_path: str | os.PathLike | None,
) -> tuple[dict, MergeCheck]:
    """`merged_16bit` / `merged_4bit` into `out`: `merge_16bit`, `check_merge`, then for 4-bit
    `requantize_4bit` and its quantization error. Returns the merge's stats and the check."""
    merged = out if method == "merged_16bit" else out / ".merged_16bit"
    stats = merge_16bit(model_cfg, adapter_dir, merged, export_cfg)
    family = model_family(str(merged))
    sample = None
    if rows is None or export_cfg["check_samples"] <= 0:
        skipped = "no sample rows were given (--train)"
        if rows is not None:
            skipped = "export.check_samples is 0"
        check = MergeCheck(method, skipped=skipped)
    else:
        check, sample = check_merge(
            model_cfg, adapter_dir, merged, export_cfg, rows,
            n_params=stats["parameters"], family=family, save_method=method,
            check_path=check_path,
        )  # fmt: skip
    if method == "merged_4bit":
        requantize_4bit(merged, out, family, model_cfg, getattr(torch, export_cfg["dtype"]))
        save_processor(model_cfg, adapter_dir, out)
        if sample is not None:
            check.quantized = quantization_error(out, *sample, model_cfg["trust_remote_code"])
        shutil.rmtree(merged)
    return stats, check


def copy_adapter(model_cfg: dict, adapter_dir: Path, out: Path) -> dict:
    """`lora`: the adapter's files, cleaned for servers, its base named for loading. Returns the
    base's info (name, revision, commit)."""
    for f in adapter_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    processor = None
    if (out / "tokenizer_config.json").exists():
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(
            out, trust_remote_code=model_cfg["trust_remote_code"]
        )
    clean_export(out, processor=processor)
    fix_adapter_config(out, model_cfg["name"])
    return read_base(model_cfg).info


def merge_16bit(model_cfg: dict, adapter_dir: Path, out: Path, export_cfg: dict) -> dict:
    """The streaming merge into the original 16-bit base weights, plus the processor, in `out`.
    Returns the merge's stats (with the base's info under "base")."""
    out.mkdir(exist_ok=True)
    dtype = getattr(torch, export_cfg["dtype"])
    stats = merge_weights(model_cfg, adapter_dir, out, dtype, export_cfg["max_shard_size"])
    save_processor(model_cfg, adapter_dir, out)
    return stats


# ------------------------------------------------------------------------------------ model card
def _json_block(obj) -> list[str]:
    return ["```json", json.dumps(obj, indent=2, sort_keys=True, default=str), "```"]


def export_card(
    summary: dict,
    *,
    adapter_dir: Path,
    data_summary: dict | None = None,
    metrics: dict | None = None,
) -> str:
    """The merged model's README.md: what it is, how to load it, how it was made."""
    cfg_path = adapter_dir / "vlmflow_train_config.json"
    train_cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    summary_path = adapter_dir / "train_summary.json"
    ts = TrainSummary.read(summary_path) if summary_path.exists() else None
    base = summary["base"]
    base_id = base["name"]
    method = summary["save_method"]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_id,
        tags=["vlmflow", "lora", "merged"],
    )
    lines = [
        f"# Fine-tuned {base_id}",
        "",
        f"A LoRA adapter trained with vlmflow and merged into the base weights "
        f"(`save_method: {method}`, {summary['dtype']}).",
    ]
    if method == "merged_4bit":
        lines += [
            "The weights of the language model are stored in 4-bit NF4 (bitsandbytes, double "
            "quantization); the vision tower, projector and lm_head stay 16-bit. This is about "
            "3.5x smaller than 16-bit, at the cost of a quantization error on every language "
            "weight (see the check below); it needs `bitsandbytes` to load.",
        ]
    lines += [
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        'model = AutoModelForImageTextToText.from_pretrained("<this folder>")',
        'processor = AutoProcessor.from_pretrained("<this folder>")',
        "```",
        "",
        "## Base model",
        "",
        f"- id: `{base_id}`",
        f"- revision: `{base.get('revision') or 'default branch'}`"
        + (f", commit `{base['commit']}`" if base.get("commit") else ""),
        "",
        "## Data",
        "",
    ]
    if data_summary:
        lines += _json_block(data_summary)
    else:
        lines += ["(no data summary was given to the export)"]
    lines += ["", "## LoRA and training settings", ""]
    lines += _json_block(
        {k: train_cfg.get(k) for k in ("model", "lora", "train") if k in train_cfg}
    )
    lines += ["", "## Metrics", ""]
    if ts:
        lines += [
            f"- training: {ts.steps} steps on {ts.train_samples} samples, final loss "
            f"{ts.final_loss:.4f}"
            if isinstance(ts.final_loss, float)
            else f"- training: {ts.to_json()}"
        ]
    check = MergeCheck.from_json(summary["check"])
    if check.ran:
        lines += [
            f"- merge check ({check.samples} samples, {check.tokens} tokens, "
            f"{check.check_dtype}): max |logit diff| vs the adapter on the base "
            f"{check.max_abs_diff:.4g} (tolerance {check.tolerance:.4g}), top-1 agreement "
            f"{check.top1_agreement:.4f}"
        ]
        if check.quantized:
            q = check.quantized
            lines += [
                f"- 4-bit quantization error: max |logit diff| {q['max_abs_diff']:.4g}, top-1 "
                f"agreement {q['top1_agreement']:.4f}"
            ]
    if metrics:
        m = Metrics.from_json(metrics)
        lines += ["", "| metric | base | tuned | delta |", "|---|---|---|---|", *metric_rows(m)]
        lines.append(f"\nTest split: {m.n} samples.")
    else:
        lines += [
            "- evaluation: base vs tuned on the held-out test split is written by the evaluate "
            "step (`eval/metrics.json` of the run)"
        ]
    return render_card(data, lines)
