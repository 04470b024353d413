"""The publish step: folders ready to push, with final model cards.

It runs after evaluation, so the cards carry the metrics. For the adapter and (when there is a
merge) the merged model, `results/runs/{run}/publish/{adapter,merged}/` gets every file of the
exported folder, hard-linked where the filesystem allows (no second copy of a 7B model) and
copied otherwise, cleaned for serving (`vlmflow.export_files`), and a `README.md` written with
`huggingface_hub.ModelCard`:

- `license` (and `license_name` / `license_link`) from the base model's own card; `base_model`
  is the hub id (a local base that lives in the Hugging Face cache is named by its id; another
  local folder has no hub id and is named in the text only);
- `datasets`: the run's dataset name; `model-index`: the tuned model's scores on the test split
  (`eval/metrics.json`), one entry per metric; the body has base vs tuned, the merge check and
  the training settings.

Nothing is uploaded: pushing stays the user's command (`hf upload ...`, see README "Deploying").
The card is validated offline (`validate_card`): huggingface_hub parses its metadata (model-index
included) as the Hub does, `base_model` must be a valid repo id, the license a Hub license id.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .artifacts import MergeCheck, Metrics, TrainSummary
from .errors import VlmflowError
from .export_files import base_reference, clean_export, fix_adapter_config
from .io import atomic_dir

# Pretty names of eval.metrics (the model-index wants an id and may take a name).
METRIC_NAMES = {
    "exact_match": "Exact match",
    "accuracy": "Accuracy",
    "relaxed_accuracy": "Relaxed accuracy",
    "anls": "ANLS",
    "cer": "Character error rate",
    "wer": "Word error rate",
    "bleu": "BLEU",
    "rouge_l": "ROUGE-L",
}
_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")


class CardError(VlmflowError, ValueError):
    """A model card that the Hub would not accept."""


# ------------------------------------------------------------------------------------- the base
def hub_id_of(model_cfg: dict) -> str | None:
    """The base's hub id: the configured id, or the id of a local folder inside a Hugging Face
    cache (`.../models--org--name/snapshots/<commit>`); None for another local folder."""
    from .hub import is_hub_id

    name = model_cfg["name"]
    p = Path(name)
    if not p.is_dir():
        return name if is_hub_id(name) else None
    parts = p.resolve().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/")
    return None


def base_card_data(base_folder: str | os.PathLike) -> dict:
    """The metadata of the base model's README.md ({} when it has none)."""
    from huggingface_hub import ModelCard

    readme = Path(base_folder) / "README.md"
    if not readme.is_file():
        return {}
    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # a README without metadata
        return {}


def license_of(base_meta: dict) -> dict:
    return {
        k: base_meta[k] for k in ("license", "license_name", "license_link") if base_meta.get(k)
    }


# -------------------------------------------------------------------------------------- the card
def eval_results(metrics: Metrics | None, dataset: str):
    from huggingface_hub import EvalResult

    if not metrics:
        return []
    out = []
    for name in metrics.names:
        value = metrics.tuned.get(name)
        if value is None:
            continue
        out.append(
            EvalResult(
                task_type="image-text-to-text",
                task_name="Image-text-to-text",
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_split="test",
                metric_type=name,
                metric_name=METRIC_NAMES.get(name, name),
                metric_value=round(float(value), 6),
            )
        )
    return out


def _json_block(obj) -> str:
    return "```json\n" + json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n```"


def card_text(
    kind: str,
    *,
    model_cfg: dict,
    base_meta: dict,
    dataset: str,
    run: str,
    metrics: Metrics | None,
    merge_check: MergeCheck | None,
    train_cfg: dict,
    train_summary: TrainSummary | None,
    data_summary: dict | None,
    export: dict | None,
) -> str:
    """The README.md of the published `kind` ("adapter" or "merged") folder."""
    from huggingface_hub import ModelCardData

    hub_id = hub_id_of(model_cfg)
    base_name = hub_id or base_reference(model_cfg["name"])
    tags = ["vlmflow", "lora", "vision-language"]
    if kind == "adapter":
        tags += [f"base_model:adapter:{hub_id}"] if hub_id else []
    else:
        tags += ["merged"]
    data = ModelCardData(
        base_model=hub_id,
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="image-text-to-text",
        datasets=[dataset],
        tags=tags,
        model_name=f"{run}-{kind}",
        eval_results=eval_results(metrics, dataset) or None,
        **license_of(base_meta),
    )
    method = (export or {}).get("save_method", "merged_16bit")
    lines = [f"# {run}: {base_name} fine-tuned with LoRA ({kind})", ""]
    if kind == "adapter":
        lines += [
            "A PEFT LoRA adapter trained with vlmflow. Load it on its base model:",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            f'base = AutoModelForImageTextToText.from_pretrained("{base_name}")',
            'model = PeftModel.from_pretrained(base, "<this folder or repo>")',
            'processor = AutoProcessor.from_pretrained("<this folder or repo>")',
            "```",
        ]
    else:
        lines += [
            f"The LoRA adapter merged into the base weights (`save_method: {method}`, "
            f"{(export or {}).get('dtype', 'bfloat16')}); loads without PEFT:",
            "",
            "```python",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            'model = AutoModelForImageTextToText.from_pretrained("<this folder or repo>")',
            'processor = AutoProcessor.from_pretrained("<this folder or repo>")',
            "```",
            "",
            "Serve it with vLLM: `vllm serve <this folder or repo>`.",
        ]
    lic = license_of(base_meta)
    lines += [
        "",
        "## Base model",
        "",
        f"- `{base_name}`, revision `{model_cfg.get('revision') or 'default branch'}`",
        "- license: "
        + (
            f"`{lic['license']}` (the base model's)"
            if lic
            else "that of the base model (its card names none; set `license` before publishing)"
        ),
        "",
        "## Evaluation",
        "",
    ]
    if metrics:
        lines += [
            f"Test split of `{dataset}`: {metrics.n} samples, greedy decoding.",
            "",
            "| metric | base | tuned | delta |",
            "|---|---:|---:|---:|",
        ]
        lines += metric_rows(metrics)
    else:
        lines += ["(no evaluation was given to the publish step)"]
    if merge_check and merge_check.ran:
        c = merge_check
        lines += [
            "",
            f"Merge check ({c.samples} samples, {c.tokens} tokens, {c.check_dtype}): "
            f"max |logit diff| vs the adapter on the base {c.max_abs_diff:.4g} "
            f"(tolerance {c.tolerance:.4g}), top-1 agreement {c.top1_agreement:.4f}.",
        ]
    lines += ["", "## Training", ""]
    if train_summary:
        ts = train_summary
        lines += [
            f"{ts.steps} optimizer steps on {ts.train_samples} samples; "
            f"{ts.trainable_parameters} trainable of {ts.total_parameters} parameters"
            + (f"; final loss {ts.final_loss:.4f}." if isinstance(ts.final_loss, float) else "."),
            "",
        ]
    lines += [
        _json_block({k: train_cfg[k] for k in ("model", "lora", "train") if k in train_cfg}),
        "",
        "## Data",
        "",
        _json_block(data_summary) if data_summary else "(no data summary was given)",
        "",
        "## Publishing",
        "",
        "Nothing was uploaded. To push this folder: "
        "`hf upload <your-namespace>/<repo-name> <this folder>`.",
    ]
    return render_card(data, lines)


def metric_rows(metrics: Metrics) -> list[str]:
    """`| name | base | tuned | delta |` for each metric."""
    out = []
    for name in metrics.names:
        b, t, d = metrics.base[name], metrics.tuned[name], metrics.delta[name]
        out.append(f"| {name} | {b:.4f} | {t:.4f} | {d:+.4f} |")
    return out


def render_card(data, lines: list[str]) -> str:
    """A README.md: `data` (a `huggingface_hub.ModelCardData`) as its YAML metadata, then the
    body `lines`."""
    from huggingface_hub import ModelCard

    return ModelCard.from_template(
        data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}\n", body="\n".join(lines)
    ).content


def validate_card(text: str) -> None:
    """Offline checks of what the Hub's validator checks: the metadata parses (model-index
    included, as huggingface_hub reads it), `base_model` ids are valid repo ids, the license is a
    license id (or `other` with a name). Raises CardError."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        card = ModelCard(text)
    except Exception as e:
        raise CardError(f"model card metadata does not parse: {e}") from e
    data = card.data
    bases = data.base_model if isinstance(data.base_model, list) else [data.base_model]
    for b in filter(None, bases):
        try:
            validate_repo_id(b)
        except HFValidationError as e:
            raise CardError(f"base_model {b!r} is not a hub repo id: {e}") from e
    if data.license is not None:
        if not isinstance(data.license, str) or not _LICENSE_ID.match(data.license):
            raise CardError(f"license {data.license!r} is not a license id")
        if data.license == "other" and not data.get("license_name"):
            raise CardError("license 'other' needs license_name (and license_link)")
    for r in data.eval_results or []:
        if not isinstance(r.metric_value, (int, float)):
            raise CardError(f"model-index: metric {r.metric_type} has no numeric value")
    if data.pipeline_tag != "image-text-to-text":
        raise CardError(f"pipeline_tag {data.pipeline_tag!r}, expected image-text-to-text")


# ----------------------------------------------------------------------------------- the folders
def link_or_copy(src: Path, dst: Path) -> None:
    """Every file of `src` into `dst` (hard links where possible), README.md left out."""
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if rel.parts[0].startswith(".") or rel == Path("README.md"):
            continue
        target = dst / rel
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def publish(
    *,
    model_cfg: dict,
    export_cfg: dict,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    run: str,
    dataset: str,
    merged_dir: str | os.PathLike | None = None,
    metrics: dict | None = None,
    merge_check: dict | None = None,
    data_summary: dict | None = None,
) -> dict:
    """Write `out_dir/adapter` (and `out_dir/merged`) with final, validated model cards.
    Returns {kind: card metadata}."""
    from transformers import AutoProcessor

    from .merge import locate_base

    adapter_dir = Path(adapter_dir)
    base_folder, _ = locate_base(model_cfg)
    base_meta = base_card_data(base_folder)
    summary_path = adapter_dir / "train_summary.json"
    common = dict(
        model_cfg=model_cfg,
        base_meta=base_meta,
        dataset=dataset,
        run=run,
        metrics=Metrics.from_json(metrics) if metrics else None,
        train_cfg=_read(adapter_dir / "vlmflow_train_config.json"),
        train_summary=TrainSummary.read(summary_path) if summary_path.is_file() else None,
        data_summary=data_summary,
    )
    sources = {"adapter": adapter_dir}
    if merged_dir is not None:
        sources["merged"] = Path(merged_dir)
    result = {}
    with atomic_dir(out_dir) as tmp:
        for kind, src in sources.items():
            dst = tmp / kind
            dst.mkdir()
            link_or_copy(src, dst)
            processor = None
            if (dst / "tokenizer_config.json").exists():
                processor = AutoProcessor.from_pretrained(
                    dst, trust_remote_code=model_cfg["trust_remote_code"]
                )
            clean_export(dst, processor=processor)
            if kind == "adapter":
                fix_adapter_config(dst, model_cfg["name"])
            text = card_text(
                kind,
                merge_check=MergeCheck.from_json(merge_check)
                if merge_check and kind == "merged"
                else None,
                export=export_cfg if kind == "merged" else None,
                **common,
            )
            validate_card(text)
            (dst / "README.md").write_text(text)
            from huggingface_hub import ModelCard

            result[kind] = ModelCard(text).data.to_dict()
    return result
