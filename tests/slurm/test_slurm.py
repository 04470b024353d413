"""The demo workflow through a real SLURM (tests/slurm/cluster.sh: munged, slurmctld, slurmd on
this machine, two fake GPUs) with the SLURM profile, then a preempted and resumed training job.

Needs root (it starts the daemons; `cluster.sh install` apt-gets them if they are missing).
Select with `-m slurm`, leave out with `-m "not slurm"`. Every call has a timeout: SLURM and the
executor plugin hang silently when something is off.
"""

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slurm

RULES = [
    "demo_digits",
    "build_tiny_model",
    "validate_images",
    "format_conversations",
    "token_budget",
    "train",
    "merge",
    "evaluate_base",
    "evaluate",
    "report_data",
    "report_training",
    "report_evaluation",
    "report_summary",
    "resolved_config",
    "publish",
    "archive",
]
GPU_RULES = {"train", "evaluate_base", "evaluate"}
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: .*/rule_(\w+)/")


def sh(*cmd, timeout=60, check=True, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.fail(
            "the SLURM test needs root (it starts munged, slurmctld and slurmd); "
            "leave it out with -m 'not slurm'"
        )
    # one test cluster per machine (/etc/slurm, the daemons): a second session waits its turn
    with open("/tmp/vlmflow-slurm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sh("bash", str(HERE / "cluster.sh"), "install", timeout=900)
        sh("bash", str(HERE / "cluster.sh"), "start", timeout=180)
        try:
            yield
        finally:
            sh("bash", str(HERE / "cluster.sh"), "stop", timeout=120, check=False)


def snakemake_cmd(*targets):
    return [
        str(BIN / "python"),
        str(HERE / "snakemake_fastpoll.py"),
        *targets,
        "--profile",
        "tests/slurm/profile",
        "--configfile",
        ".test/config.yaml",
        "tests/slurm/config.yaml",
    ]


def env():
    return dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{BIN}:{os.environ['PATH']}")


def submitted(text: str) -> list[tuple[str, str]]:
    """(rule, SLURM job id) of every sbatch submission in a snakemake log, in order."""
    return [(m[2], m[1]) for m in SUBMITTED.finditer(text)]


def scontrol(job_id: str) -> str:
    return sh("scontrol", "show", "job", job_id).stdout


@pytest.fixture(scope="module")
def slurm_run(cluster, workflow_copy, tmp_path_factory, local_test_run_started):
    """The demo workflow through SLURM; the local run that the outputs are compared against
    runs meanwhile (`local_test_run_started`)."""
    work = workflow_copy(tmp_path_factory.mktemp("slurmwf"), extra=["tests/slurm"])
    res = subprocess.run(
        snakemake_cmd(), cwd=work, capture_output=True, text=True, env=env(), timeout=900
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    jobs = dict(submitted(out))
    # the partition/GPU of each job, asked while SLURM still lists it (MinJobAge=300)
    shown = {rule: scontrol(job) for rule, job in jobs.items() if rule in GPU_RULES}
    return work, out, jobs, shown


def test_every_job_went_through_sbatch_to_its_partition(slurm_run):
    work, out, jobs, shown = slurm_run
    assert sorted(jobs) == sorted(RULES), out[-3000:]
    assert len(set(jobs.values())) == len(RULES)  # one SLURM job per rule
    for rule, job in jobs.items():
        step = next((work / "logs" / rule).rglob("*.log"))
        text = step.read_text()
        m = re.search(
            r"SLURM job=(\d+) partition=(\S+) node=\S+ gpus=(\S+) CUDA_VISIBLE_DEVICES=(\S+)", text
        )
        assert m, f"{step}: no SLURM context line:\n{text[:2000]}"
        assert m[1] == job, (rule, m[0])
        if rule in GPU_RULES:
            assert m[2] == "gpu", (rule, m[0])
            assert m[3] != "-" and m[4] != "-", (rule, m[0])  # a (fake) GPU was allocated
            assert "Partition=gpu" in shown[rule]
            assert re.search(r"TresPerJob=gres:gpu:a100:1\b", shown[rule]), shown[rule]
        else:
            assert m[2] == "cpu" and m[3] == "-" and m[4] == "-", (rule, m[0])
    assert "slurm_extra=--signal=TERM@180" in out  # train asks for the time-limit warning


def _log(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def _rows(parquet, workdir) -> list:
    """Rows of a Parquet file with the working directory's path (in resolved image paths)
    written as <workdir>."""
    text = json.dumps(pq.read_table(parquet).to_pylist())
    return json.loads(text.replace(str(Path(workdir).resolve()), "<workdir>"))


def test_outputs_equal_those_of_a_local_run(slurm_run, local_test_run):
    """Same machine, same thread counts: losses equal to 1e-6 relative, identical answers."""
    work, local = slurm_run[0], local_test_run
    for split in ("train", "val", "test", "rejected"):
        a = _rows(work / f"results/data/digits/{split}.parquet", work)
        b = _rows(local / f"results/data/digits/{split}.parquet", local)
        assert a and a == b, split
    la = _log(work / "results/runs/test/adapter/train_log.jsonl")
    lb = _log(local / "results/runs/test/adapter/train_log.jsonl")
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, 7))
    for a, b in zip(la, lb):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6), (a, b)
    cols = ["id", "reference", "base_answer", "tuned_answer", "tuned_exact_match"]
    pa = pq.read_table(work / "results/runs/test/eval/predictions.parquet").select(cols)
    pb = pq.read_table(local / "results/runs/test/eval/predictions.parquet").select(cols)
    assert pa.num_rows > 0 and pa.equals(pb)
    ma = json.loads((work / "results/runs/test/eval/metrics.json").read_text())
    mb = json.loads((local / "results/runs/test/eval/metrics.json").read_text())
    for key in ("n", "base", "tuned", "delta"):
        assert ma[key] == mb[key], key


def test_a_signalled_training_job_is_retried_and_resumes(slurm_run):
    """scancel --signal=USR1 a running train job: it checkpoints and exits; Snakemake retries it
    (profile `retries: 1`); the retry resumes and ends with the uninterrupted run's adapter
    (tolerance 1e-6: same machine, same threads; in practice identical)."""
    work = slurm_run[0]
    run = work / "results/runs/test"
    reference = {
        "log": _log(run / "adapter/train_log.jsonl"),
        "weights": run / "adapter.reference.safetensors",
    }
    (run / "adapter/adapter_model.safetensors").rename(reference["weights"])
    sh("rm", "-rf", str(run / "adapter"), str(run / "work"))
    train_log = work / "logs/train/test.log"
    train_log.unlink()

    cmd = snakemake_cmd("results/runs/test/adapter")
    with open(work / "preempt.snakemake.log", "w") as f:
        proc = subprocess.Popen(cmd, cwd=work, stdout=f, stderr=subprocess.STDOUT, env=env())
    try:
        deadline = time.monotonic() + 300
        # the handler is installed: from here on the signal becomes a checkpoint
        while not (train_log.exists() and "checkpoint at the next step" in train_log.read_text()):
            assert proc.poll() is None, (work / "preempt.snakemake.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the train job did not start"
            time.sleep(0.5)
        job = re.search(r"SLURM job=(\d+)", train_log.read_text())[1]
        sh("scancel", "--signal=USR1", job)
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
    out = (work / "preempt.snakemake.log").read_text()
    assert rc == 0, out[-5000:]
    trains = [j for rule, j in submitted(out) if rule == "train"]
    assert len(trains) == 2 and trains[0] == job, out[-3000:]  # the retry is a new SLURM job
    # the retry asked for twice the wall time and memory (resources scale with the attempt)
    first, retry = scontrol(trains[0]), scontrol(trains[1])
    assert "TimeLimit=00:10:00" in first and "TimeLimit=00:20:00" in retry, retry
    assert re.search(r"MinMemoryNode=2000M", first) and re.search(r"MinMemoryNode=4000M", retry)

    history = (run / "work/train/preemptions.log").read_text()
    m = re.search(rf"SLURM job={job} .*SIGUSR1 received: stopped after step (\d+)/6", history)
    assert m, history
    stopped = int(m[1])
    summary = json.loads((run / "adapter/train_summary.json").read_text())
    assert summary["resumed_from_step"] == stopped >= 1
    retry_log = train_log.read_text()
    assert f"SLURM job={trains[1]}" in retry_log and f"(step {stopped})" in retry_log

    resumed = _log(run / "adapter/train_log.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 7))  # the step count continued
    for a, b in zip(resumed, reference["log"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), (a, b)
    from safetensors.torch import load_file

    got = load_file(run / "adapter/adapter_model.safetensors")
    want = load_file(reference["weights"])
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
