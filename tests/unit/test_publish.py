"""The publish step: final model cards (license, base id, datasets, model-index) for the adapter
and the merged model, validated offline; folders that load."""

import json
import shutil
from pathlib import Path

import pytest

from vlmflow.config import resolve_sections
from vlmflow.export import export_model
from vlmflow.publish import CardError, hub_id_of, publish, validate_card

METRICS = {
    "n": 40,
    "metrics": ["exact_match", "cer"],
    "base": {"exact_match": 0.0, "cer": 0.95},
    "tuned": {"exact_match": 0.925, "cer": 0.05},
    "delta": {"exact_match": 0.925, "cer": -0.9},
}


def _cfg(model: str, **export) -> dict:
    return resolve_sections(
        {
            "run": {"name": "digits-run", "dataset": "digits"},
            "model": {"name": model, "max_seq_length": 256},
            "export": export,
        },
        ["run", "model", "export"],
    )


@pytest.fixture(scope="module")
def licensed_base(tiny_qwen, tmp_path_factory):
    """The tiny base as a hub snapshot in a Hugging Face cache, with the base's model card."""
    snap = tmp_path_factory.mktemp("hf") / "models--acme--tiny-vl" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_qwen, snap)
    (snap / "README.md").write_text(
        "---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# tiny\n"
    )
    return snap


def test_publish_writes_final_cards_for_adapter_and_merged(
    licensed_base, trained_adapter, digits_rows, tmp_path
):
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    cfg = _cfg(str(licensed_base))
    merged = tmp_path / "merged"
    summary = export_model(
        cfg["model"], trained_adapter, merged, cfg["export"], check_rows=digits_rows[:2]
    )
    out = tmp_path / "publish"
    publish(
        model_cfg=cfg["model"],
        export_cfg=cfg["export"],
        adapter_dir=trained_adapter,
        merged_dir=merged,
        out_dir=out,
        run="digits-run",
        dataset="digits",
        metrics=METRICS,
        merge_check=summary["check"] | {"samples": 2},
    )
    for kind, library in (("adapter", "peft"), ("merged", "transformers")):
        text = (out / kind / "README.md").read_text()
        validate_card(text)
        data = ModelCard(text).data
        assert data.license == "apache-2.0"  # the base's
        assert data.base_model == "acme/tiny-vl"  # its hub id, from the cache folder
        assert data.library_name == library and data.pipeline_tag == "image-text-to-text"
        assert data.datasets == ["digits"]
        results = {r.metric_type: r.metric_value for r in data.eval_results}
        assert results == {"exact_match": 0.925, "cer": 0.05}
        assert {r.dataset_split for r in data.eval_results} == {"test"}
        assert '"lora_alpha": 16' in text and "| exact_match | 0.0000 | 0.9250 | +0.9250 |" in text
        assert "[More Information Needed]" not in text
    assert "base_model:adapter:acme/tiny-vl" in ModelCard.load(out / "adapter/README.md").data.tags
    assert "Merge check" in (out / "merged/README.md").read_text()

    # adapter names its base absolutely; both folders load; big files are links, not copies
    adapter_cfg = json.loads((out / "adapter/adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(licensed_base.resolve())
    assert (out / "merged/model.safetensors").stat().st_ino == (
        merged / "model.safetensors"
    ).stat().st_ino
    assert (merged / "README.md").read_text() != (out / "merged/README.md").read_text()
    AutoModelForImageTextToText.from_pretrained(out / "merged")
    PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(licensed_base), out / "adapter"
    )
    # what training wrote is left as it was
    assert "[More Information Needed]" in (Path(trained_adapter) / "README.md").read_text()


def test_local_base_without_hub_id_has_no_base_model_and_no_invented_license(
    tiny_qwen, trained_adapter, tmp_path
):
    from huggingface_hub import ModelCard

    cfg = _cfg(tiny_qwen, save_method="lora")
    assert hub_id_of(cfg["model"]) is None
    publish(
        model_cfg=cfg["model"],
        export_cfg=cfg["export"],
        adapter_dir=trained_adapter,
        out_dir=tmp_path / "publish",
        run="r",
        dataset="digits",
    )
    assert sorted(p.name for p in (tmp_path / "publish").iterdir()) == ["adapter"]
    text = (tmp_path / "publish/adapter/README.md").read_text()
    validate_card(text)
    data = ModelCard(text).data
    assert data.base_model is None and data.license is None and not data.eval_results
    assert "set `license` before publishing" in text and str(Path(tiny_qwen).resolve()) in text


def test_validate_card_rejects_what_the_hub_rejects():
    ok = "---\nbase_model: acme/tiny-vl\nlicense: mit\npipeline_tag: image-text-to-text\n---\n"
    validate_card(ok)
    with pytest.raises(CardError, match="not a hub repo id"):
        validate_card(ok.replace("acme/tiny-vl", "/tmp/models/tiny"))
    with pytest.raises(CardError, match="license_name"):
        validate_card(ok.replace("license: mit", "license: other"))
    with pytest.raises(CardError, match="does not parse"):
        validate_card(ok.replace("license: mit", "model-index: [{results: [{task: 3}]}]"))
