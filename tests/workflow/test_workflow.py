"""Runs the real `snakemake` on the small .test config in a copy of the repository."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

pytestmark = pytest.mark.workflow


def snakemake(workdir, *args, check=True, timeout=900):
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    )
    res = subprocess.run(
        [
            str(Path(sys.executable).parent / "snakemake"),
            "--cores",
            "2",
            "--configfile",
            ".test/config.yaml",
            *args,
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if check and res.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
        )
    return res


def planned_jobs(res) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}; {} when nothing is to be done."""
    text = res.stdout + res.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


@pytest.fixture(scope="module")
def workflow_run(local_test_run):
    """The .test run (tests/conftest.py), shared with the SLURM test."""
    return local_test_run


def test_every_output_is_there_and_consistent(workflow_run):
    w = workflow_run
    data = w / "results/data/digits"
    images = pq.read_table(data / "images.parquet").to_pandas()
    # 120 digit files, 3 bad references, 4 embedded images of the ShareGPT source.
    assert len(images) == 127 and images["ok"].sum() == 124
    assert (images["kind"] == "bytes").sum() == 4
    reasons = sorted(r.split(":")[0] for r in images.loc[~images["ok"], "reason"])
    assert reasons == ["missing", "not_an_image", "path_escape"]
    assert len((data / "images_rejected.tsv").read_text().splitlines()) == 4
    rejected = pq.read_table(data / "rejected.parquet").to_pandas()
    splits = {s: pq.read_table(data / f"{s}.parquet").num_rows for s in ("train", "val", "test")}
    assert sum(splits.values()) + len(rejected) == 126  # nothing silently dropped
    assert len(rejected) == 3 and all(rejected["reason"].str.startswith("bad_image"))
    assert min(splits.values()) > 0
    # Embedded images became files in the dataset's blob store, and reach training from there.
    conv = [
        r
        for s in ("train", "val", "test")
        for r in pq.read_table(data / f"{s}.parquet").to_pylist()
    ]
    multi = [r for r in conv if len(r["images"]) == 2]
    assert len(multi) == 1 and all("/cache/blobs/" in p for p in multi[0]["images"])

    # The run's token budget: the long ShareGPT sample is dropped, the rest kept.
    run_data = w / "results/runs/test/data"
    too_long = pq.read_table(run_data / "rejected.parquet").to_pandas()
    assert list(too_long["kind"]) == ["too_long"]
    run_splits = {
        s: pq.read_table(run_data / f"{s}.parquet").num_rows for s in ("train", "val", "test")
    }
    assert sum(run_splits.values()) == sum(splits.values()) - 1
    lengths = pq.read_table(run_data / "token_lengths.parquet").to_pandas()
    assert len(lengths) == sum(splits.values()) and lengths["total"].max() > 256
    assert (run_data / "token_lengths.png").stat().st_size > 0
    assert "max_seq_length 256" in (run_data / "token_lengths.tsv").read_text()

    adapter = w / "results/runs/test/adapter"
    for f in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "train_log.jsonl",
        "loss.png",
        "vlmflow_train_config.json",
        "tokenizer.json",
        "processor_config.json",
    ):
        assert (adapter / f).exists(), f
    log = [json.loads(x) for x in (adapter / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in log)

    merged = w / "results/runs/test/merged"
    assert (merged / "model.safetensors").exists() and (merged / "config.json").exists()
    metrics = json.loads((w / "results/runs/test/eval/metrics.json").read_text())
    assert metrics["n"] == run_splits["test"]
    assert set(metrics) >= {"base", "tuned", "delta", "n", "settings"}
    preds = pq.read_table(w / "results/runs/test/eval/predictions.parquet").to_pandas()
    assert len(preds) == run_splits["test"]
    assert {"id", "image", "question", "reference", "base_answer", "tuned_answer"} <= set(preds)
    for step in (
        "validate_images/digits",
        "format_conversations/digits",
        "token_budget/test",
        "train/test",
        "merge/test",
        "evaluate/test",
    ):
        assert (w / f"logs/{step}.log").exists(), step
        assert (w / f"benchmarks/{step}.tsv").exists(), step


def test_second_run_is_a_no_op(workflow_run):
    assert planned_jobs(snakemake(workflow_run, "-n")) == {}


def test_learning_rate_change_reruns_only_training_and_downstream(workflow_run):
    cfg = (workflow_run / ".test/config.yaml").read_text()
    assert "learning_rate: 0.002" in cfg
    (workflow_run / ".test/lr.yaml").write_text(
        cfg.replace("learning_rate: 0.002", "learning_rate: 0.001")
    )
    res = snakemake(workflow_run, "-n", "--configfile", ".test/lr.yaml")
    assert planned_jobs(res) == {"train": 1, "merge": 1, "evaluate": 1, "all": 1}


def test_editing_one_image_reruns_only_the_stages_downstream(workflow_run):
    img = workflow_run / "resources/demo/digits-test/images/00007.png"
    im = Image.open(img)
    im.putpixel((0, 0), (0, 0, 0))
    im.save(img)
    res = snakemake(workflow_run, "-n")
    assert planned_jobs(res) == {
        "validate_images": 1,
        "format_conversations": 1,
        "token_budget": 1,
        "train": 1,
        "merge": 1,
        "evaluate": 1,
        "all": 1,
    }


def test_unknown_config_key_fails_at_start_naming_it(workflow_run):
    cfg = (workflow_run / ".test/config.yaml").read_text()
    (workflow_run / ".test/typo.yaml").write_text(cfg.replace("learning_rate:", "learnig_rate:"))
    res = snakemake(workflow_run, "-n", "--configfile", ".test/typo.yaml", check=False)
    assert res.returncode != 0
    assert "train.learnig_rate" in res.stdout + res.stderr
    assert "did you mean 'learning_rate'" in res.stdout + res.stderr
