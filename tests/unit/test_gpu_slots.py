"""vlmflow.gpu_slots: jobs running at once on one machine each get their own GPUs."""

import os
import subprocess
import sys
from pathlib import Path

from vlmflow.gpu_slots import gpu_pool, try_claim

ROOT = Path(__file__).resolve().parents[2]


def test_the_pool_is_cuda_visible_devices_when_set():
    assert gpu_pool({"CUDA_VISIBLE_DEVICES": "3, 5"}) == ["3", "5"]
    assert gpu_pool({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_claims_take_free_gpus_and_release_all_or_nothing(tmp_path):
    pool = ["0", "1", "2"]
    first = try_claim(2, pool, tmp_path)
    assert first[0] == ["0", "1"]
    assert try_claim(2, pool, tmp_path) is None  # one left: nothing taken
    second = try_claim(1, pool, tmp_path)
    assert second[0] == ["2"]
    for fd in first[1]:
        os.close(fd)  # a job that ends frees its GPUs
    assert try_claim(2, pool, tmp_path)[0] == ["0", "1"]


def run_slot(tmp_path, gpus, env_extra):
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    env.update(
        PYTHONPATH=str(ROOT / "src"),
        VLMFLOW_GPU_LOCKS=str(tmp_path),
        CUDA_VISIBLE_DEVICES="3,5",
        **env_extra,
    )
    code = "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'))"
    cmd = [sys.executable, "-m", "vlmflow.gpu_slots", "--gpus", str(gpus), "--"]
    res = subprocess.run(
        [*cmd, sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_the_command_runs_on_a_gpu_no_other_job_holds(tmp_path):
    held = try_claim(1, ["3"], tmp_path)  # another job runs on GPU 3
    assert run_slot(tmp_path, 1, {}) == "5"
    os.close(held[1][0])
    assert run_slot(tmp_path, 1, {}) == "3"
    assert run_slot(tmp_path, 2, {}) == "3,5"
    # Under SLURM the job's devices are SLURM's; without GPUs there is nothing to claim.
    held = try_claim(2, ["3", "5"], tmp_path)
    assert run_slot(tmp_path, 1, {"SLURM_JOB_ID": "7"}) == "3,5"
    assert run_slot(tmp_path, 0, {}) == "3,5"
