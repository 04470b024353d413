"""A config file stands alone, and the README's commands work as printed (real snakemake)."""

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import BIN, snakemake_env

from vlmflow.config import load_schema, validate_config

pytestmark = pytest.mark.workflow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = "config/examples/qwen2_5_vl_7b_qlora.yaml"


def run(workdir, *cmd, check=True, timeout=900):
    if cmd[0] in ("snakemake", "python"):
        cmd = (str(BIN / cmd[0]), *cmd[1:])
    res = subprocess.run(
        cmd, cwd=workdir, capture_output=True, text=True, env=snakemake_env(), timeout=timeout
    )
    if check and res.returncode != 0:
        raise AssertionError(
            f"{shlex.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
        )
    return res


def shell_config(res, script: str) -> dict:
    """The `--config` JSON of the printed (-p) shell command that runs scripts/<script>.py."""
    for line in (res.stdout + res.stderr).splitlines():
        if f"scripts/{script}.py" in line and "--config" in line:
            words = shlex.split(line.split("scripts/", 1)[1].split(">", 1)[0])
            return json.loads(words[words.index("--config") + 1])
    raise AssertionError(f"no {script} command in the dry run:\n{res.stdout[-3000:]}")


@pytest.fixture(scope="module")
def example_dir(workflow_copy, tmp_path_factory):
    """A checkout with the example's data folder filled (one row) and the profiles."""
    from vlmflow.demo import write_digits

    w = workflow_copy(tmp_path_factory.mktemp("wf_example"), extra=("profiles", "README.md"))
    write_digits(w / "data/mydata", limit=1)
    return w


def test_the_example_config_stands_alone(example_dir):
    """Every key the example leaves out takes the schema's default, not the demo's value."""
    res = run(example_dir, "snakemake", "-n", "-p", "--configfile", EXAMPLE)
    expected = validate_config(yaml.safe_load((example_dir / EXAMPLE).read_text()))
    train = shell_config(res, "train")
    for section in ("model", "lora", "train"):
        assert train[section] == expected[section], section
    # What the demo sets and the example does not.
    assert train["lora"]["modules_to_save"] == []
    assert train["train"]["cache_encoded"] is False
    assert (train["train"]["logging_steps"], train["train"]["save_steps"]) == (1, 0)
    evaluate = shell_config(res, "evaluate")
    assert evaluate["eval"] == expected["eval"] and evaluate["eval"]["batch_size"] == 8
    # The start block lists what the example sets, nothing the defaults give.
    block = res.stderr.split("Assuming", 1)[0] if "Assuming" in res.stderr else res.stderr
    assert f"vlmflow config ({EXAMPLE})" in block
    assert "load_in_4bit=true" in block and "gradient_accumulation_steps=8" in block
    assert "modules_to_save" not in block and "max_steps" not in block  # 30 is the default
    assert "cache_encoded" not in block and "logging_steps" not in block


def test_config_overrides_and_the_demo_without_a_config_file(example_dir):
    res = run(
        example_dir,
        "snakemake",
        "-n",
        "-p",
        "--configfile",
        EXAMPLE,
        "--config",
        "train={max_steps: 7, cache_encoded: true}",
    )
    train = shell_config(res, "train")["train"]
    assert (train["max_steps"], train["cache_encoded"]) == (7, True)
    assert train["per_device_train_batch_size"] == 1  # the rest of the file's section stays
    # No --configfile: the demo, as before.
    demo = shell_config(run(example_dir, "snakemake", "-n", "-p"), "train")
    assert demo["lora"]["modules_to_save"] == ["lm_head", "projector"]
    assert demo["train"]["max_steps"] == 600


def test_a_bad_value_and_a_duplicate_key_stop_the_run_at_start(example_dir):
    cfg = (example_dir / EXAMPLE).read_text()
    bad = example_dir / "bad.yaml"
    bad.write_text(
        cfg.replace("lora_alpha: 16", "lora_alpha: -16").replace(
            "learning_rate: 0.0002", "learning_rate: .nan"
        )
    )
    res = run(example_dir, "snakemake", "-n", "--configfile", "bad.yaml", check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "'lora.lora_alpha': -16" in out
    assert "'train.learning_rate': nan is not a finite number" in out
    dup = example_dir / "dup.yaml"
    dup.write_text(cfg.replace("  max_steps: 30\n", "  max_steps: 30\n  seed: 1\n"))
    lines = dup.read_text().splitlines()
    first, second = sorted(i + 1 for i, x in enumerate(lines) if x.startswith("  seed: "))
    res = run(example_dir, "snakemake", "-n", "--configfile", "dup.yaml", check=False)
    assert res.returncode != 0
    assert f"'train.seed' is given twice, on line {first} and on line {second}" in (
        res.stdout + res.stderr
    )


def test_the_resolved_config_is_written_next_to_the_run(local_test_run):
    resolved = yaml.safe_load((local_test_run / "results/runs/test/config.yaml").read_text())
    given = yaml.safe_load((local_test_run / ".test/config.yaml").read_text())
    assert resolved == validate_config(given)
    # every section (runs / sweep: an experiment's, not a run's)
    assert set(resolved) == set(load_schema()["properties"]) - {"runs", "sweep"}


def test_the_model_comparison_example_plans_one_job_per_shared_setting(example_dir):
    """config/examples/compare_three_models.yaml: three hub models on one dataset. Each is
    fetched, budgeted, evaluated as a base and trained once; the data stage runs once."""
    example = "config/examples/compare_three_models.yaml"
    res = run(example_dir, "snakemake", "-n", "--configfile", example)
    table = (res.stdout + res.stderr).split("Job stats:", 1)[1].split("total", 1)[0]
    jobs = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}
    assert {r: jobs[r] for r in ("validate_images", "format_conversations")} == {
        "validate_images": 1,
        "format_conversations": 1,
    }
    for rule in ("fetch_model", "token_budget", "evaluate_base", "train", "merge", "evaluate"):
        assert jobs[rule] == 3, (rule, jobs)
    assert jobs["compare_runs"] == jobs["experiment_archive"] == 1
    assert "vlmflow experiment: 3 runs: qwen2_5_vl_7b, qwen3_vl_8b, gemma3_4b" in res.stderr


# -------------------------------------------------------------------------------- README
def readme_commands() -> list[str]:
    """Every command line of the README's bash blocks and its inline `snakemake ...`."""
    text = (ROOT / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        block = block.replace("\\\n", " ")  # a command continued on the next line
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line:
                cmds.append(line)
    cmds += re.findall(r"`(snakemake [^`]+)`", text)
    return cmds


def test_every_readme_command_runs_as_printed(example_dir, local_test_run):
    """Each README command, or its dry run: snakemake with -n (--report and --unlock for real,
    without --cores), python scripts with --help, make with -n."""
    cmds = list(dict.fromkeys(readme_commands()))
    assert any("--report report.html" in c for c in cmds) and any("--unlock" in c for c in cmds)
    # The README's smallest config, as my.yaml and my_run.yaml, with a data folder for it.
    from vlmflow.demo import write_digits

    text = (ROOT / "README.md").read_text()
    minimal = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "run:" in b)
    for name in ("my.yaml", "my_run.yaml"):
        (example_dir / name).write_text(minimal)
    for ds in yaml.safe_load(minimal)["datasets"].values():
        write_digits(example_dir / Path(ds["sources"][0]["path"]).parent, limit=2)
    done = []
    for cmd in cmds:
        words = shlex.split(cmd)
        if words[0] == "export":
            continue
        if "--software-deployment-method" in words and not shutil.which("conda"):
            continue  # needs conda (its env file is checked in tests/unit/test_deploy.py)
        if "<" in cmd or "..." in cmd:  # a placeholder, not a command
            continue
        if words[0] == "make":
            res = run(ROOT, "make", "-n", *words[1:])
        elif words[0] == "python" and words[1] == "scripts/verify_archive.py":
            archive = local_test_run / "results/runs/test/archive.tar.gz"
            res = run(local_test_run, "python", words[1], str(archive), *words[3:])
        elif words[0] == "python":
            res = run(example_dir, "python", *words[1:], "--help")
        elif words[0] == "snakemake" and ("--report" in words or "--unlock" in words):
            # As printed (no --cores), on the finished .test run (its config file added).
            extra = [] if "--configfile" in words else ["--configfile", ".test/config.yaml"]
            res = run(local_test_run, *words, *extra)
        elif words[0] == "snakemake":
            res = run(example_dir, *words, "-n")
        else:
            continue
        done.append(cmd)
        assert res.returncode == 0, cmd
    assert len(done) >= 6, done


def test_the_configfile_order_the_readme_shows_keeps_a_target(example_dir):
    """`--configfile X TARGET` would read TARGET as a second config file: the README puts the
    target first."""
    target = "results/data/mydata/summary.json"
    res = run(example_dir, "snakemake", "-n", target, "--configfile", EXAMPLE)
    table = (res.stdout + res.stderr).split("Job stats:", 1)[1].split("total", 1)[0]
    jobs = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}
    assert jobs == {"validate_images": 1, "format_conversations": 1}
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"snakemake [^`\n]*results/\S+ --configfile", readme)


def test_a_failed_job_shows_its_log(example_dir):
    """The workflow profile (profiles/default) shows a failed job's log, not just its command."""
    cfg = yaml.safe_load((example_dir / EXAMPLE).read_text())
    (example_dir / "data/bad").mkdir(parents=True, exist_ok=True)
    (example_dir / "data/bad/data.jsonl").write_text(
        '{"image": "missing.png", "instruction": "q", "response": "a"}\n'
    )
    cfg["datasets"]["mydata"]["sources"] = [{"path": "data/bad/data.jsonl"}]
    (example_dir / "failing.yaml").write_text(yaml.safe_dump(cfg))
    res = run(
        example_dir,
        "snakemake",
        "--cores",
        "1",
        "results/data/mydata/summary.json",
        "--configfile",
        "failing.yaml",
        check=False,
    )
    assert res.returncode != 0
    log = (example_dir / "logs/format_conversations/mydata.log").read_text()
    last = [x for x in log.splitlines() if x.strip()][-1]
    assert last in res.stdout + res.stderr  # the log itself, printed


@pytest.mark.timeout(1800)
def test_a_minimal_config_from_the_readme_runs_the_whole_workflow(workflow_copy, tmp_path_factory):
    """The README's smallest config (one dataset, a model, max_steps), the tiny model in it: one
    `snakemake --cores all --configfile my.yaml` runs everything, and ends with the summary."""
    from vlmflow.demo import write_digits

    w = workflow_copy(tmp_path_factory.mktemp("wf_minimal"), extra=("profiles",))
    text = (ROOT / "README.md").read_text()
    cfg = yaml.safe_load(
        next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "run:" in b)
    )
    cfg["model"]["name"] = "resources/models/tiny-qwen2_5_vl"
    cfg["train"]["max_steps"] = 2
    assert set(cfg) == {"run", "datasets", "model", "train"} and len(cfg["train"]) == 1
    (w / "my.yaml").write_text(yaml.safe_dump(cfg))
    write_digits(w / Path(cfg["datasets"]["mine"]["sources"][0]["path"]).parent, limit=40)
    res = run(w, "snakemake", "--cores", "all", "--configfile", "my.yaml", timeout=1500)
    out = res.stdout + res.stderr
    run_dir = w / "results/runs/mine"
    for f in ("config.yaml", "adapter", "merged", "eval/metrics.json", "archive.tar.gz"):
        assert (run_dir / f).exists(), f
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 2 and resolved["lora"]["modules_to_save"] == []
    # The end-of-run summary.
    summary = out[out.index("vlmflow run 'mine'") :]
    data = json.loads((w / "results/data/mine/summary.json").read_text())
    assert f"data      {data['accepted']} rows accepted, {data['rejected']} rejected" in summary
    assert "training  2 steps, final loss " in summary
    metrics = json.loads((run_dir / "eval/metrics.json").read_text())
    base, tuned = metrics["base"]["exact_match"], metrics["tuned"]["exact_match"]
    assert f"exact_match {base:.4g} -> {tuned:.4g}" in summary
    for path in ("adapter", "merged", "config.yaml", "archive.tar.gz"):
        assert f"results/runs/mine/{path}" in summary
    assert "snakemake --report report.html --configfile my.yaml" in summary


def test_jobs_import_vlmflow_from_the_checkout(workflow_copy, tmp_path_factory):
    """The rules put the checkout's src/ on PYTHONPATH, so a job needs no installed vlmflow (a
    conda env from envs/vlmflow.yaml has none): a module that only this copy has is found."""
    w = workflow_copy(tmp_path_factory.mktemp("wf_pythonpath"))
    (w / "src/vlmflow/_checkout_probe.py").write_text("WHERE = __file__\n")
    script = w / "scripts/write_config.py"
    script.write_text(
        script.read_text().replace(
            "import yaml\n",
            "import yaml\n\nfrom vlmflow._checkout_probe import WHERE\n\nprint('probe', WHERE)\n",
            1,
        )
    )
    env_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    res = subprocess.run(
        [str(BIN / "snakemake"), "--cores", "1", "results/runs/test/config.yaml"]
        + ["--configfile", ".test/config.yaml"],
        cwd=w,
        capture_output=True,
        text=True,
        timeout=600,
        # Not this test process's PYTHONPATH (it points at the worktree under test).
        env={k: v for k, v in snakemake_env().items() if k != "PYTHONPATH"},
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + str(env_path)
    log = (w / "logs/resolved_config/test.log").read_text()
    assert f"probe {w / 'src/vlmflow/_checkout_probe.py'}" in log
