"""The typed files between steps read back what they wrote: the same JSON as before (reports,
cards and the tests of the workflow read it)."""

import json

from vlmflow.artifacts import MergeCheck, Metrics, TrainSummary

SCORES = {"base": {"exact_match": 0.0, "cer": 1.0}, "tuned": {"exact_match": 1.0, "cer": 0.0}}
METRICS = {
    "n": 2,
    "metrics": ["exact_match", "cer"],
    **SCORES,
    "delta": {"exact_match": 1.0, "cer": -1.0},
    "higher_is_better": {"exact_match": True, "cer": False},
    "generation": {"base": {"generated_tokens": 4, "seconds": 1.0, "tokens_per_s": 4.0}},
    "settings": {"batch_size": 8},
}
CHECK = {
    "save_method": "merged_4bit",
    "max_abs_diff": 0.001,
    "max_abs_reference_logit": 9.5,
    "tolerance": 0.2,
    "top1_agreement": 1.0,
    "tokens": 40,
    "passed": True,
    "compared": "merged 16-bit weights vs adapter on the fresh base (PEFT)",
    "check_dtype": "float32",
    "export_dtype": "bfloat16",
    "samples": 2,
    "atol": 0.0,
    "rtol": 0.02,
    "quantized": {"max_abs_diff": 0.5, "top1_agreement": 0.9},
}


def test_files_round_trip(tmp_path):
    summary = {
        "steps": 6, "final_loss": 0.5, "resumed_from_step": 0, "trainable_parameters": 10,
        "total_parameters": 100, "family": "qwen2_5_vl", "device": "cpu", "world_size": 1,
        "train_samples": 40,
    }  # fmt: skip
    skipped = {"save_method": "lora", "skipped": "save_method lora: nothing is merged"}
    for cls, data in [
        (Metrics, METRICS), (TrainSummary, summary), (MergeCheck, CHECK), (MergeCheck, skipped),
    ]:  # fmt: skip
        cls.from_json(data).write(tmp_path / "f.json")
        assert json.loads((tmp_path / "f.json").read_text()) == data
    assert MergeCheck.from_json(CHECK).ran and not MergeCheck.from_json(skipped).ran


def test_metrics_written_without_the_optional_keys_read_as_before():
    m = Metrics.from_json({"n": 1, "base": {"wer": 0.5, "bleu": 1.0}, "tuned": {"wer": 0.1}})
    assert m.names == ["wer"] and m.higher("wer") and Metrics.from_json(METRICS).names[1] == "cer"
    assert not Metrics.from_json(METRICS).higher("cer")
