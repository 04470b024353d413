import os
import shutil
import subprocess
from pathlib import Path

# No network anywhere in the tests: every model and processor is built locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test` runs the unit and workflow stages on `-n 2`), the workers share
# the cores: each one's torch (and the scripts it starts) gets its part of them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_threads))

import pytest  # noqa: E402

# Each pytest-xdist worker builds its own session and module fixtures: the tests that read one of
# these runs go to one worker (`--dist loadgroup`, pyproject.toml), which runs it once.
# `tools`: llama.cpp's tools (tests/unit/test_gguf.py), a ~15 CPU-minute build that two workers
# would otherwise both start.
SHARED_RUNS = ("local_test_run", "families_run", "experiment", "tools")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook
def pytest_collection_modifyitems(config, items):
    for item in items:
        used = [f for f in SHARED_RUNS if f in getattr(item, "fixturenames", ())]
        if not used:
            continue
        item.add_marker(pytest.mark.xdist_group(used[0]))
        # xdist 3.8 tells its scheduler a test's group by renaming it `nodeid@group` through
        # `item._nodeid`, which pytest 9.2 no longer reads (a node's id is `item._id`): without
        # this, no test is grouped.
        if getattr(config.option, "loadgroup", False) and hasattr(item, "_id"):
            from _pytest.nodeid import NodeId

            item._id = NodeId.parse(f"{item.nodeid}@{used[0]}")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """A tiny random Qwen2.5-VL + processor saved to disk (loaded back via from_pretrained)."""
    from vlmflow.tiny import build_tiny

    return str(build_tiny("qwen2_5_vl", tmp_path_factory.mktemp("models") / "tiny-qwen2_5_vl"))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    from vlmflow.demo import write_digits

    out = tmp_path_factory.mktemp("data") / "digits"
    write_digits(out, limit=200)
    return out


@pytest.fixture(scope="session")
def digits_rows(digits_dir):
    """Canonical conversation rows of the 200-image digits folder."""
    from helpers import image_policy

    from vlmflow import data, image_validation

    src = data.Source(path=str(digits_dir / "data.jsonl"), image_root=str(digits_dir))
    recs = image_validation.validate_images(
        data.seed_image_refs(src), image_policy(), progress=False
    )
    acc, rej = data.seed_to_conversations(
        src, {(r["root"], r["path"]): r for r in recs}, {"val": 0.1, "test": 0.2, "seed": 0}
    )
    assert not rej
    return acc


@pytest.fixture(scope="session")
def trained_adapter(tiny_qwen, digits_rows, tmp_path_factory):
    """A LoRA adapter (plus trained head and projector) after a few steps on the digits."""
    from vlmflow.config import resolve_sections
    from vlmflow.train import train

    cfg = resolve_sections(
        {
            "model": {"name": tiny_qwen, "max_seq_length": 256},
            "lora": {"r": 8, "lora_alpha": 16, "modules_to_save": ["lm_head", "projector"]},
            "train": {
                "per_device_train_batch_size": 8,
                "gradient_accumulation_steps": 1,
                "max_steps": 6,
                "learning_rate": 2e-3,
                "optim": "adamw_torch",
                "use_gradient_checkpointing": False,
            },
        },
        ["model", "lora", "train"],
    )
    out = tmp_path_factory.mktemp("runs") / "adapter"
    train(cfg, [r for r in digits_rows if r["split"] == "train"], out, out.parent / "work")
    return str(out)


ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = [
    "Snakefile",
    "rules",
    "scripts",
    "src",
    "config",
    "envs",
    ".test",
    "report",
    "requirements.lock",
]


def copy_workflow(dest: Path, extra=()) -> Path:
    """A copy of the workflow (what a user's checkout holds) to run snakemake in."""
    for name in [*WORKFLOW_FILES, *extra]:
        src = ROOT / name
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    return dest


@pytest.fixture(scope="session")
def workflow_copy():
    """copy_workflow(dest, extra=()) for tests that run snakemake themselves."""
    return copy_workflow


@pytest.fixture(scope="session")
def local_test_run_started(tmp_path_factory):
    """(workdir, process, log) of the .test config's run by the real `snakemake --cores 2` on
    this machine, started in the background: the SLURM test starts it before its own run, so
    that the two overlap (SLURM's jobs leave the cores idle while they are scheduled)."""
    from helpers import BIN, snakemake_env

    work = copy_workflow(tmp_path_factory.mktemp("wf"))
    log = tmp_path_factory.mktemp("wf-log") / "snakemake.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "snakemake"), "--cores", "2", "--configfile", ".test/config.yaml"],
            cwd=work,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=snakemake_env(),
        )
    yield work, proc, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def local_test_run(local_test_run_started):
    """The .test config run once by the real `snakemake --cores 2` on this machine (its
    workdir, once the run has ended): the workflow tests check it, the SLURM test compares its
    own outputs against it."""
    work, proc, log = local_test_run_started
    try:
        rc = proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "killed after 900 s"
    assert rc == 0, f"local run failed ({rc}):\n{log.read_text()[-8000:]}"
    return work
