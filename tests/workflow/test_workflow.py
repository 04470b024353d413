"""Runs the real `snakemake` on the small .test config in a copy of the repository."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import BIN, snakemake_env
from PIL import Image

pytestmark = pytest.mark.workflow


def snakemake(workdir, *args, check=True, timeout=900):
    res = subprocess.run(
        [
            str(BIN / "snakemake"),
            "--cores",
            "2",
            "--configfile",
            ".test/config.yaml",
            *args,
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=snakemake_env(),
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


def budget_dir(work, dataset="digits", model=None) -> Path:
    """The one token-budget folder of `dataset` (its name: the model and a settings hash), or
    the one of `model` (the last part of its name) where several models have one."""
    folders = (work / "results/data" / dataset / "budget").iterdir()
    (folder,) = [f for f in folders if model in (None, f.name.rsplit("-", 1)[0])]
    return folder


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
    run_data = budget_dir(w)
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
    check = json.loads((w / "results/runs/test/merge_check.json").read_text())
    assert check["passed"] and check["max_abs_diff"] <= check["tolerance"]
    metrics = json.loads((w / "results/runs/test/eval/metrics.json").read_text())
    assert metrics["n"] == run_splits["test"]
    from huggingface_hub import ModelCard

    for kind in ("adapter", "merged"):  # final cards, written after evaluation
        card = ModelCard.load(w / f"results/runs/test/publish/{kind}/README.md").data
        scores = {r.metric_type: r.metric_value for r in card.eval_results}
        assert scores["exact_match"] == pytest.approx(metrics["tuned"]["exact_match"], abs=1e-6)
    assert set(metrics) >= {"base", "tuned", "delta", "n", "settings"}
    preds = pq.read_table(w / "results/runs/test/eval/predictions.parquet").to_pandas()
    assert len(preds) == run_splits["test"]
    assert {"id", "image", "question", "reference", "base_answer", "tuned_answer"} <= set(preds)
    assert metrics["metrics"] == [
        "exact_match",
        "accuracy",
        "anls",
        "cer",
        "wer",
        "bleu",
        "rouge_l",
    ]
    for m in metrics["metrics"]:
        assert {f"base_{m}", f"tuned_{m}"} <= set(preds)
        if m not in ("cer", "wer", "bleu"):  # corpus-level scores, not sample means
            assert metrics["tuned"][m] == pytest.approx(preds[f"tuned_{m}"].mean())
    for step in (
        "validate_images/digits",
        "format_conversations/digits",
        "train/test",
        "merge/test",
        "evaluate/test",
        "report_data/test",
        "report_training/test",
        "report_evaluation/test",
        "report_summary/test",
        "resolved_config/test",
        "archive/test",
        "publish/test",
    ):
        assert (w / f"logs/{step}.log").exists(), step
        assert (w / f"benchmarks/{step}.tsv").exists(), step
    for step in ("token_budget", "evaluate_base"):  # shared by runs: one folder per setting
        assert len(list((w / "logs" / step / "digits").glob("*.log"))) == 1, step
        assert len(list((w / "benchmarks" / step / "digits").glob("*.tsv"))) == 1, step


def test_second_run_is_a_no_op(workflow_run):
    assert planned_jobs(snakemake(workflow_run, "-n")) == {}


def test_learning_rate_change_reruns_only_training_and_downstream(workflow_run):
    cfg = (workflow_run / ".test/config.yaml").read_text()
    assert "learning_rate: 0.002" in cfg
    (workflow_run / ".test/lr.yaml").write_text(
        cfg.replace("learning_rate: 0.002", "learning_rate: 0.001")
    )
    res = snakemake(workflow_run, "-n", "--configfile", ".test/lr.yaml")
    assert planned_jobs(res) == {
        "resolved_config": 1,  # results/runs/test/config.yaml records the new value
        "train": 1,
        "merge": 1,
        "evaluate": 1,
        "report_training": 1,
        "report_evaluation": 1,
        "report_summary": 1,
        "archive": 1,
        "publish": 1,
        "all": 1,
    }


def test_editing_one_image_reruns_only_the_stages_downstream(workflow_run):
    img = workflow_run / "resources/demo/digits-test/images/00007.png"
    original = img.read_bytes()
    try:
        im = Image.open(img)
        im.putpixel((0, 0), (0, 0, 0))
        im.save(img)
        res = snakemake(workflow_run, "-n")
    finally:  # later tests check the data against the run's archive
        img.write_bytes(original)
    assert planned_jobs(res) == {
        "validate_images": 1,
        "format_conversations": 1,
        "token_budget": 1,
        "train": 1,
        "merge": 1,
        "evaluate_base": 1,
        "evaluate": 1,
        "report_data": 1,
        "report_training": 1,
        "report_evaluation": 1,
        "report_summary": 1,
        "archive": 1,
        "publish": 1,
        "all": 1,
    }


def test_unknown_config_key_fails_at_start_naming_it(workflow_run):
    cfg = (workflow_run / ".test/config.yaml").read_text()
    (workflow_run / ".test/typo.yaml").write_text(cfg.replace("learning_rate:", "learnig_rate:"))
    res = snakemake(workflow_run, "-n", "--configfile", ".test/typo.yaml", check=False)
    assert res.returncode != 0
    assert "train.learnig_rate" in res.stdout + res.stderr
    assert "did you mean 'learning_rate'" in res.stdout + res.stderr


# ------------------------------------------------------------------ report, archive, determinism
def test_report_renders_in_headless_chromium(workflow_run, tmp_path):
    """`snakemake --report` builds the report; in Chromium its plots load and the gallery and the
    metrics table render (screenshots in $VLMFLOW_TEST_ARTIFACTS when set)."""
    from headless_chromium import Chromium, ensure_chromium

    exe = ensure_chromium()  # apt-get installs it when missing and running as root
    assert exe, "chromium is not installed: apt-get install chromium (as root, the test does)"
    snakemake(workflow_run, "--report", "report.html")
    shots = Path(os.environ.get("VLMFLOW_TEST_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    n_test = pq.read_table(workflow_run / "results/runs/test/eval/predictions.parquet").num_rows
    with Chromium(exe) as br:
        br.open(
            (workflow_run / "report.html").as_uri(),
            "typeof app !== 'undefined' && document.querySelector('#app').childElementCount > 0",
        )
        items = br.evaluate(
            "Object.fromEntries(Object.entries(results).map(([p, r]) => [r.name, [p, r.mime_type]]))"
        )
        assert {
            "data_qc.html",
            "data_qc.png",
            "token_lengths.png",  # the run's token-length histogram reaches the report
            "training.png",
            "metrics.html",
            "metrics.png",
            "gallery.html",
            "summary.html",
        } <= set(items), items
        # The landing page shows the results without a click: base vs tuned, the curves.
        home = br.evaluate("document.body.innerText")
        assert "vlmflow run" in home and "Base vs tuned" in home, home
        metrics = json.loads((workflow_run / "results/runs/test/eval/metrics.json").read_text())
        table = br.evaluate(
            "Array.from(document.querySelectorAll('table.vlmflow-metrics tr'))"
            ".map(r => Array.from(r.cells).map(c => c.innerText))"
        )
        assert [r[0] for r in table[1:]] == [
            m + ("" if metrics["higher_is_better"][m] else " (lower is better)")
            for m in metrics["metrics"]
        ], table
        assert table[1][1] == f"{metrics['base']['exact_match']:.4g}", table
        curve = "document.querySelector('img.vlmflow-training')"
        br.wait_for(f"{curve} && {curve}.complete")
        assert br.evaluate(f"{curve}.naturalWidth") >= 500
        br.screenshot(shots / "report_home.png")

        def show(name: str, kind: str):
            path = json.dumps(items[name][0])
            br.evaluate(
                f"app.setView({{content: '{kind}', contentPath: results[{path}].data_uri, "
                f"resultPath: {path}}})"
            )

        for name in ("data_qc.png", "training.png", "metrics.png"):
            assert items[name][1] == "image/png"
            show(name, "img")
            loaded = "Array.from(document.images).filter(i => i.src.startsWith('data:image/png'))"
            br.wait_for(f"{loaded}.length > 0 && {loaded}.every(i => i.complete)")
            widths = br.evaluate(f"{loaded}.map(i => i.naturalWidth)")
            assert max(widths) >= 500, (name, widths)  # the figure, not an icon
            br.screenshot(shots / f"report_{name.replace('.', '_')}.png")

        def frame_titled(title: str) -> int:
            for _ in range(100):
                try:
                    ctx = br.child_frame_context()
                    if br.evaluate("document.title", ctx) == title:
                        return ctx
                except RuntimeError:  # the previous frame went away meanwhile
                    pass
                time.sleep(0.1)
            raise AssertionError(f"no frame titled {title!r}")

        show("gallery.html", "html")
        ctx = frame_titled("Test samples: base vs tuned")
        br.wait_for("Array.from(document.images).every(i => i.complete)", context=ctx)
        cards = br.evaluate("document.querySelectorAll('.card').length", ctx)
        loaded = br.evaluate(
            "Array.from(document.images).filter(i => i.naturalWidth > 0).length", ctx
        )
        assert cards == min(n_test, 24) and loaded == cards, (cards, loaded)
        text = br.evaluate("document.body.innerText", ctx)
        for word in ("question", "reference", "base", "tuned", "Which digit"):
            assert word in text
        br.screenshot(shots / "report_gallery.png")

        show("metrics.html", "html")
        ctx = frame_titled("Base vs tuned")
        text = br.evaluate("document.body.innerText", ctx)
        for word in ("exact_match", "anls", "rouge_l", "tokens / s", "Merge check"):
            assert word in text
        br.screenshot(shots / "report_metrics.png")

        show("data_qc.html", "html")
        text = br.evaluate("document.body.innerText", frame_titled("Data quality"))
        assert "path_escape" in text and "not_an_image" in text and "missing" in text


def _archive_members(path):
    with tarfile.open(path) as tar:
        return tar.getmembers(), {
            m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()
        }


def test_archive_holds_the_run_and_verify_archive_finds_tampering(workflow_run, tmp_path):
    w = workflow_run
    archive = w / "results/runs/test/archive.tar.gz"
    infos, files = _archive_members(archive)
    names = [m.name for m in infos]
    assert names == sorted(names) and {m.mtime for m in infos} == {315532800}
    for member in (
        "REPRODUCE.md",
        "SHA256SUMS",
        "config/config.yaml",
        "config/seeds.json",
        "data/manifest.json",
        "env/requirements.lock",
        "env/pip-freeze.txt",
        "env/platform.json",
        "env/git.json",
        "model/base_model.json",
        "adapter/adapter_model.safetensors",
        "adapter/train_log.jsonl",
        "eval/metrics.json",
        "export/merge_check.json",
        "export/README.md",
        "logs/train/test.log",
        "benchmarks/train/test.tsv",
        "report/gallery.html",
    ):
        assert f"test/{member}" in files, member
    for step in ("token_budget", "evaluate_base"):  # the shared jobs this run used
        assert any(n.startswith(f"test/logs/{step}/digits/") for n in names), step
    # The adapter, not the base weights: those are named by their file hashes.
    assert [n for n in names if n.endswith(".safetensors")] == [
        "test/adapter/adapter_model.safetensors"
    ]
    base = json.loads(files["test/model/base_model.json"])
    assert (
        base["name"] == "resources/models/tiny-qwen2_5_vl" and "model.safetensors" in base["files"]
    )
    assert (
        files["test/adapter/train_log.jsonl"]
        == (w / "results/runs/test/adapter/train_log.jsonl").read_bytes()
    )
    config = yaml.safe_load(files["test/config/config.yaml"])
    assert config["train"]["max_steps"] == 6 and config["export"]["check_samples"] == 4
    reproduce = files["test/REPRODUCE.md"].decode()
    assert "scripts/verify_archive.py" in reproduce
    assert "snakemake --cores all --configfile test/config/config.yaml" in reproduce

    manifest = json.loads(files["test/data/manifest.json"])
    images = pq.read_table(w / "results/data/digits/images.parquet").to_pandas()
    readable = set(images.loc[images["sha256"] != "", "resolved"])
    listed = {e["path"]: e for e in manifest["files"]}
    assert {p for p, e in listed.items() if e["kind"] == "image"} == readable
    for split in ("train", "val", "test", "rejected", "images"):
        assert f"results/data/digits/{split}.parquet" in listed
    assert listed[".test/data/messy/data.jsonl"]["kind"] == "source"

    verify = [sys.executable, str(w / "scripts/verify_archive.py"), str(archive)]
    res = subprocess.run([*verify, "--root", str(w)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"OK: {len(listed)} of {len(listed)}" in res.stdout

    # A copy of the data with one image changed and one Parquet file gone.
    root = tmp_path / "data"
    for p in listed:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(w / p, root / p)
    tampered = sorted(p for p in listed if p.endswith("00011.png"))[0]
    with open(root / tampered, "ab") as f:
        f.write(b"\0")
    (root / "results/data/digits/val.parquet").unlink()
    res = subprocess.run([*verify, "--root", str(root)], capture_output=True, text=True)
    assert res.returncode == 1
    assert f"CHANGED  {tampered}" in res.stdout
    assert "MISSING  results/data/digits/val.parquet" in res.stdout
    assert f"DIFFERENT: {len(listed) - 2} of {len(listed)}" in res.stdout


def test_archive_quotes_a_dataset_path_with_a_space_quotes_and_dollar(workflow_run, tmp_path):
    """A source folder named `messy "data" $(touch PWNED) 'x'`: the archive rule (whose command
    names every source file) runs it as a path, neither breaking on the space nor running the
    command substitution. A copy of the finished run is reused: `--rerun-triggers mtime` keeps
    the other steps (inputs copied with their mtimes, not modified) from running again."""
    work = tmp_path / "wf"
    shutil.copytree(workflow_run, work, symlinks=True)
    weird = """.test/data/messy "data" $(touch PWNED) 'x'"""
    shutil.copytree(work / ".test/data/messy", work / weird)  # mtimes kept
    cfg = yaml.safe_load((work / ".test/config.yaml").read_text())
    for s in cfg["datasets"]["digits"]["sources"]:
        if s["path"].startswith(".test/data/messy/"):
            s["path"] = s["path"].replace(".test/data/messy", weird)
            s["image_root"] = weird
    (work / ".test/weird.yaml").write_text(yaml.safe_dump(cfg))
    args = ["--configfile", ".test/weird.yaml", "--rerun-triggers", "mtime"]
    assert planned_jobs(snakemake(work, "-n", *args, "--forcerun", "archive")) == {
        "archive": 1,
        "all": 1,
    }
    res = snakemake(work, *args, "--forcerun", "archive", check=False)
    log = work / "logs/archive/test.log"
    assert res.returncode == 0, res.stderr[-3000:] + (log.read_text() if log.is_file() else "")
    assert not list(work.rglob("PWNED")) and not list(Path.cwd().glob("PWNED"))
    _, files = _archive_members(work / "results/runs/test/archive.tar.gz")
    listed = {e["path"] for e in json.loads(files["test/data/manifest.json"])["files"]}
    assert f"{weird}/data.jsonl" in listed
    # And the command Snakemake prints for it is one a shell runs as written.
    res = snakemake(work, "-n", "-p", *args, "--forcerun", "archive")
    assert shlex.quote(f"{weird}/data.jsonl") in res.stdout


def test_a_second_run_on_the_same_config_and_data_has_the_same_manifest(
    workflow_run, workflow_copy, tmp_path_factory, monkeypatch
):
    """A fresh checkout given the same data folder runs the data stage again; the manifest of its
    images, sources and Parquet files equals the archived one."""
    from vlmflow.archive import data_manifest

    other = workflow_copy(tmp_path_factory.mktemp("wf_again"))
    data = "resources/demo/digits-test"
    shutil.copytree(workflow_run / data, other / data)
    res = snakemake(other, "--rerun-incomplete", "results/data/digits/summary.json")
    assert "validate_images" in res.stdout + res.stderr
    _, files = _archive_members(workflow_run / "results/runs/test/archive.tar.gz")
    archived = json.loads(files["test/data/manifest.json"])
    monkeypatch.chdir(other)
    sources = yaml.safe_load((other / ".test/config.yaml").read_text())["datasets"]["digits"]
    data = [s["path"] for s in sources["sources"]] + [
        f"results/data/digits/{s}.parquet" for s in ("train", "val", "test", "rejected")
    ]
    again = data_manifest("results/data/digits/images.parquet", data)
    assert again == archived


def test_training_from_the_archived_config_repeats_the_losses_on_cpu(workflow_run, tmp_path):
    """Same seeds, same data, CPU: a second training run gives the same per-step losses."""
    _, files = _archive_members(workflow_run / "results/runs/test/archive.tar.gz")
    config = yaml.safe_load(files["test/config/config.yaml"])
    sections = json.dumps({k: config[k] for k in ("model", "lora", "train")})
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run(
        [
            sys.executable,
            "scripts/train.py",
            "--config",
            sections,
            "--train",
            str(budget_dir(workflow_run) / "train.parquet"),  # what the train rule reads
            "--out",
            str(tmp_path / "adapter"),
            "--work-dir",
            str(tmp_path / "work"),
            "--threads",
            str(config["train"]["threads"]),
        ],
        cwd=workflow_run,
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    first = [json.loads(x) for x in files["test/adapter/train_log.jsonl"].decode().splitlines()]
    second = [
        json.loads(x) for x in (tmp_path / "adapter/train_log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in second] == [r["step"] for r in first] == list(range(1, 7))
    assert [r["loss"] for r in second] == [r["loss"] for r in first]
    assert [r["grad_norm"] for r in second] == [r["grad_norm"] for r in first]


# Families added after the seed, run through the workflow together, one run of an experiment on
# a small copy of the .test config each: the tiny model is built by the workflow's own rule,
# trained, merged (with the merge check), and evaluated base vs tuned. One data stage and one
# snakemake for all, whose jobs of different runs fill both cores.
NEW_FAMILIES = [
    "qwen3_5",
    "gemma4",
    "mistral3",
    "internvl",
    "llava_onevision",
    "qwen3_vl_moe",
    "qwen3_5_moe",
]
# The tiny Gemma 4's fp32 weights rounded to the bf16 export move its logits by up to ~4% of
# max |logit| (measured on the base alone: 0.024 of 0.645), above the float32 check's default
# rtol of 0.02; a wrong merge is off by far more.
FAMILY_EXPORT = {"gemma4": {"check_rtol": 0.05}}


@pytest.fixture(scope="module")
def families_run(workflow_copy, tmp_path_factory):
    """(checkout, snakemake's result) of the families' experiment. `--keep-going`: a family that
    fails leaves the others' outputs, and fails its own test only."""
    work = workflow_copy(tmp_path_factory.mktemp("families"))
    cfg_path = work / ".test/config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["runs"] = {
        family: {"model": {"name": f"resources/models/tiny-{family}"}} for family in NEW_FAMILIES
    }
    for family, export in FAMILY_EXPORT.items():
        cfg["runs"][family]["export"] = export
    cfg["demo"]["digits_limit"] = 40
    cfg["datasets"]["digits"]["sources"] = cfg["datasets"]["digits"]["sources"][:1]
    cfg["train"].update(max_steps=4, save_steps=2)
    cfg_path.write_text(yaml.safe_dump(cfg))
    targets = [
        f"results/runs/{family}/{name}"
        for family in NEW_FAMILIES
        for name in ("merge_check.json", "eval/metrics.json")
    ]
    # (-p ends --configfile's list of files: the targets follow it)
    res = snakemake(work, "-p", "--keep-going", *targets, check=False, timeout=2300)
    return work, res


def family_logs(work, res, family) -> str:
    """What a failed family's test shows: the end of snakemake's output and of the family's logs."""
    logs = sorted(work.glob(f"logs/*/{family}.log")) + sorted(
        work.glob(f"logs/*/digits/tiny-{family}-*.log")
    )
    return "\n".join(
        [res.stderr[-3000:], *(f"--- {p.relative_to(work)}\n{p.read_text()[-2000:]}" for p in logs)]
    )


@pytest.mark.timeout(2400)  # the first one waits for the families' run
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_family_trains_merges_and_evaluates_through_the_workflow(family, families_run):
    work, res = families_run
    run = work / "results/runs" / family
    for target in (run / "merge_check.json", run / "eval/metrics.json"):
        assert target.is_file(), f"{family}: no {target.name}\n{family_logs(work, res, family)}"

    assert (
        json.loads((work / f"resources/models/tiny-{family}/config.json").read_text())["model_type"]
        == family
    )
    log = [json.loads(x) for x in (run / "adapter/train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    check = json.loads((run / "merge_check.json").read_text())
    assert check["passed"] and check["max_abs_diff"] <= check["tolerance"]
    # The run's own export override, and only that run's (unset: 0.02 for a float32 check).
    assert check["rtol"] == FAMILY_EXPORT.get(family, {}).get("check_rtol", 0.02)
    assert (run / "merged/config.json").exists()
    metrics = json.loads((run / "eval/metrics.json").read_text())
    n_test = pq.read_table(budget_dir(work, model=f"tiny-{family}") / "test.parquet").num_rows
    assert metrics["n"] == n_test > 0
    preds = pq.read_table(run / "eval/predictions.parquet").to_pandas()
    assert len(preds) == n_test
    assert preds["tuned_answer"].notna().all() and preds["base_answer"].notna().all()
