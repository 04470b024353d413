"""Cluster resources from the config, and the SLURM context line of every step's log."""

from vlmflow.cluster import job_resources, slurm_context
from vlmflow.config import resolve_sections


def resources(**over):
    cfg = resolve_sections({"resources": over}, ["resources"])["resources"]
    return cfg


def test_cpu_job_scales_memory_and_runtime_with_the_attempt():
    r = job_resources(resources(cpu={"partition": "short", "mem_mb": 4000, "runtime": 30}))
    assert r["slurm_partition"] == "short"
    assert [r["mem_mb"](None, a) for a in (1, 2, 3)] == [4000, 8000, 12000]
    assert [r["runtime"](None, a) for a in (1, 2)] == [30, 60]
    assert not {"gpu", "gpu_model", "gres", "nodes", "slurm_extra"} & set(r)


def test_unset_partition_and_model_are_left_to_the_profile():
    r = job_resources(resources(), gpus=1)
    assert r["gpu"] == 1
    assert "slurm_partition" not in r and "gpu_model" not in r
    assert r["mem_mb"](None, 1) == 64000  # the gpu group's default


def test_gpu_job_single_node():
    cfg = resources(
        gpu={
            "partition": "gpu",
            "gpu_model": "h100",
            "cpus_per_task": 16,
            "qos": "x",
            "slurm_extra": "--exclusive",
        }
    )
    r = job_resources(cfg, gpus=2, time_limit_signal_s=180)
    assert {k: r[k] for k in ("slurm_partition", "gpu", "gpu_model", "cpus_per_task")} == {
        "slurm_partition": "gpu",
        "gpu": 2,
        "gpu_model": "h100",
        "cpus_per_task": 16,
    }
    assert r["qos"] == "x"  # the plugin's own resource (it refuses --qos inside slurm_extra)
    assert r["slurm_extra"] == "--exclusive --signal=TERM@180"
    assert "nodes" not in r and "mpi" not in r


def test_gpu_job_multi_node_asks_one_task_and_n_gpus_per_node():
    r = job_resources(resources(gpu={"gpu_model": "a100"}), gpus=4, nodes=3)
    assert r["gres"] == "gpu:a100:4" and "gpu" not in r and "gpu_model" not in r
    assert (r["nodes"], r["tasks"], r["tasks_per_gpu"], r["mpi"]) == (3, 3, 0, "srun")


def test_gpus_zero_means_a_cpu_job():
    cfg = resources(cpu={"partition": "cpu"}, gpu={"partition": "gpu"})
    assert job_resources(cfg, gpus=0)["slurm_partition"] == "cpu"


def test_slurm_context_line():
    assert slurm_context({}) is None
    env = {
        "SLURM_JOB_ID": "12",
        "SLURM_JOB_PARTITION": "gpu",
        "SLURMD_NODENAME": "n1",
        "SLURM_STEP_GPUS": "0,1",
        "CUDA_VISIBLE_DEVICES": "0,1",
    }
    assert slurm_context(env) == (
        "SLURM job=12 partition=gpu node=n1 gpus=0,1 CUDA_VISIBLE_DEVICES=0,1 restarts=-"
    )
