"""An experiment through the real `snakemake`: a 2x2 sweep (learning rate x LoRA rank) on the
tiny Qwen2.5-VL plus a comparison of two tiny families (.test/experiment.yaml on top of
.test/config.yaml), in one job graph."""

import json
import re
import subprocess
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import BIN, snakemake_env
from test_workflow import planned_jobs  # the "Job stats" table of a run, as {rule: count}

# six trainings: more than the suite's 900 s per test on a loaded machine
pytestmark = [pytest.mark.workflow, pytest.mark.timeout(1800)]

CONFIGS = [".test/config.yaml", ".test/experiment.yaml"]
SWEEP = ["lr0.002-r4", "lr0.002-r8", "lr0.02-r4", "lr0.02-r8"]
RUNS = ["qwen2_5_vl", "qwen2_vl", *SWEEP]  # runs: first, then the sweep's points
TARGET = "results/experiments/test/archive.tar.gz"


def snakemake(work, *args, check=True):
    res = subprocess.run(
        [str(BIN / "snakemake"), "--cores", "2", "--configfile", *CONFIGS, *args],
        cwd=work,
        capture_output=True,
        text=True,
        env=snakemake_env(),
        timeout=1200,
    )
    if check and res.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


@pytest.fixture(scope="module")
def experiment(workflow_copy, tmp_path_factory):
    work = workflow_copy(tmp_path_factory.mktemp("experiment"))
    res = snakemake(work, "-p", TARGET)  # (-p ends --configfile's list of files)
    return work, res


def test_the_runs_share_the_data_stage_and_the_base_evaluations(experiment):
    work, res = experiment
    jobs = planned_jobs(res)
    assert {r: jobs[r] for r in ("validate_images", "format_conversations")} == {
        "validate_images": 1,
        "format_conversations": 1,
    }
    # one token budget and one base evaluation per base model, six trainings (4 + 2)
    assert jobs["token_budget"] == jobs["evaluate_base"] == jobs["build_tiny_model"] == 2
    assert jobs["train"] == jobs["merge"] == jobs["evaluate"] == jobs["resolved_config"] == 6
    assert sorted(p.stem for p in (work / "logs/train").iterdir()) == sorted(RUNS)
    # The sweep's runs and the qwen2_5_vl run got the same base answers; qwen2_vl its own.
    preds = {r: pd.read_parquet(work / f"results/runs/{r}/eval/predictions.parquet") for r in RUNS}
    for r in SWEEP:
        assert preds[r]["base_answer"].tolist() == preds["qwen2_5_vl"]["base_answer"].tolist()
    metrics = {
        r: json.loads((work / f"results/runs/{r}/eval/metrics.json").read_text()) for r in RUNS
    }
    assert metrics["qwen2_vl"]["base"] != metrics["qwen2_5_vl"]["base"]
    # Each run trained with its own settings, recorded next to its outputs.
    for r in RUNS:
        cfg = yaml.safe_load((work / f"results/runs/{r}/config.yaml").read_text())
        trained = json.loads((work / f"results/runs/{r}/adapter/adapter_config.json").read_text())
        assert cfg["run"]["name"] == r and trained["r"] == cfg["lora"]["r"]
        assert "runs" not in cfg and "sweep" not in cfg
    assert yaml.safe_load((work / "results/runs/lr0.02-r8/config.yaml").read_text())["train"][
        "learning_rate"
    ] == pytest.approx(0.02)


def test_the_comparison_has_every_run_and_the_best_by_the_selected_metric(experiment):
    work, _ = experiment
    out = work / "results/experiments/test"
    table = pd.read_csv(out / "table.tsv", sep="\t")
    assert table["run"].tolist() == RUNS
    by_run = table.set_index("run")
    assert by_run.loc["lr0.02-r4", "lora.r"] == 4
    assert by_run.loc["lr0.02-r4", "train.learning_rate"] == pytest.approx(0.02)
    assert by_run.loc["qwen2_vl", "model.name"] == "resources/models/tiny-qwen2_vl"
    cer = {
        r: json.loads((work / f"results/runs/{r}/eval/metrics.json").read_text())["tuned"]["cer"]
        for r in RUNS
    }
    assert by_run["tuned_cer"].to_dict() == pytest.approx(cer)
    best = json.loads((out / "best.json").read_text())
    lowest = min(RUNS, key=lambda r: cer[r])  # select: cer, lower is better; first on a tie
    assert (best["run"], best["metric"], best["higher_is_better"]) == (lowest, "cer", False)
    assert best["value"] == pytest.approx(cer[lowest])
    assert best["merged"] == f"results/runs/{lowest}/merged"
    assert (work / best["merged"] / "config.json").is_file()
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    gallery = (out / "gallery.html").read_text()
    assert all(r in gallery for r in RUNS) and "base: tiny-qwen2_vl" in gallery
    with tarfile.open(out / "archive.tar.gz") as tar:
        names = set(tar.getnames())
        recorded = json.load(tar.extractfile("test/runs.json"))
    assert sorted(recorded) == sorted(RUNS)
    assert {f"test/runs/{r}/config.yaml" for r in RUNS} <= names
    assert {"test/comparison/table.tsv", "test/comparison/best.json"} <= names


def test_editing_one_run_re_runs_that_run_only(experiment):
    work, _ = experiment
    path = work / ".test/experiment.yaml"
    original = path.read_text()
    cfg = yaml.safe_load(original)
    cfg["runs"]["qwen2_vl"]["train"] = {"learning_rate": 0.005}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))  # the grid order names the runs
    try:
        res = snakemake(work, "-n", TARGET)
    finally:
        path.write_text(original)
    jobs = planned_jobs(res)
    assert jobs == {
        "resolved_config": 1,
        "train": 1,
        "merge": 1,
        "evaluate": 1,
        "compare_runs": 1,
        "experiment_archive": 1,
    }, res.stdout[-3000:]
    text = res.stdout + res.stderr
    assert "wildcards: run=qwen2_vl" in text and "run=lr0.002" not in text
    # As it was: nothing to do.
    assert planned_jobs(snakemake(work, "-n", TARGET)) == {}
    # A run the config does not have is an error, not a run with the shared settings.
    res = snakemake(work, "-n", "results/runs/nosuch/adapter", check=False)
    assert res.returncode != 0
    assert "no run named 'nosuch' in this config" in res.stdout + res.stderr


def test_the_report_has_an_experiment_category(experiment):
    work, _ = experiment
    snakemake(work, "-p", TARGET, "--report", "report.html")
    page = (work / "report.html").read_text()
    listed = json.loads(re.search(r"var categories = (\{.*?\});", page)[1])["Experiment"]["Other"]
    assert sorted(Path(p).name for p in listed) == [
        "best.json",
        "gallery.html",
        "loss.png",
        "table.html",
    ]
    assert "vlmflow experiment <strong>test</strong>" in page  # an experiment's landing page
