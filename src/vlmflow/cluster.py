"""What a job asks the cluster for, computed from the config's `resources` section.

Rules call `job_resources(...)` in their `resources:` block (through rules/common.smk), so that
partitions, GPU model, memory and wall time come from the config (or the profile's
`set-resources`), never from the rules. The keys are those of snakemake-executor-plugin-slurm
(slurm_partition, gpu, gpu_model, gres, nodes, tasks, mpi, cpus_per_task, slurm_extra); on a
workstation only `gpu` (checked against `--resources gpu=N`) matters.
"""

from __future__ import annotations

import os
from collections.abc import Callable

# Exit code of a training run stopped by SIGTERM/SIGUSR1 after writing its checkpoint
# (EX_TEMPFAIL: "try again"): the retried job resumes from that checkpoint.
EXIT_PREEMPTED = 75


def _per_attempt(base: int) -> Callable[..., int]:
    def scaled(wildcards, attempt):
        return base * attempt

    scaled.__name__ = f"{base}_x_attempt"
    return scaled


def job_resources(
    resources_cfg: dict,
    *,
    gpus: int = 0,
    nodes: int = 1,
    time_limit_signal_s: int = 0,
) -> dict:
    """Snakemake `resources:` of one rule.

    `gpus` is per node. mem_mb and runtime are callables that multiply the configured value by
    the attempt number. With `nodes` > 1 the job gets one task per node (`srun` inside the rule
    starts them) and `gres=gpu[:model]:N` per node; otherwise `gpu=N` (and `gpu_model`).
    `time_limit_signal_s` > 0 adds `--signal=TERM@N` to the sbatch flags.
    """
    group = resources_cfg["gpu"] if gpus > 0 else resources_cfg["cpu"]
    res: dict = {
        "mem_mb": _per_attempt(group["mem_mb"]),
        "runtime": _per_attempt(group["runtime"]),
    }
    if group["partition"] is not None:
        res["slurm_partition"] = group["partition"]
    extra = [group["slurm_extra"]] if group["slurm_extra"] else []
    if time_limit_signal_s > 0:
        # Not `B:`: with the SLURM executor the batch shell is the plugin's `sh` wrapper, which
        # dies on the signal and ends the job. Job steps get it instead: the step's snakemake
        # waits on SIGTERM and the training process (exec'd by the rule) checkpoints.
        extra.append(f"--signal=TERM@{time_limit_signal_s}")
    if extra:
        res["slurm_extra"] = " ".join(extra)
    if gpus > 0:
        if group["cpus_per_task"] is not None:
            res["cpus_per_task"] = group["cpus_per_task"]
        model = group["gpu_model"]
        if nodes > 1:
            res["gres"] = f"gpu:{model}:{gpus}" if model else f"gpu:{gpus}"
        else:
            res["gpu"] = gpus
            if model:
                res["gpu_model"] = model
    if nodes > 1:
        # One task per node; the plugin then runs the rule's shell command in the batch step
        # (no srun around it), and the command starts the tasks itself (`srun torchrun ...`).
        # tasks_per_gpu=0 keeps the plugin from adding --ntasks-per-gpu.
        res.update(nodes=nodes, tasks=nodes, tasks_per_gpu=0, mpi="srun")
    return res


def slurm_context(environ: dict | None = None) -> str | None:
    """One line naming the SLURM job this process runs in (None outside SLURM)."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in env:
        return None
    keys = [
        ("job", "SLURM_JOB_ID"),
        ("partition", "SLURM_JOB_PARTITION"),
        ("node", "SLURMD_NODENAME"),
        ("gpus", "SLURM_JOB_GPUS"),
        ("CUDA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"),
        ("restarts", "SLURM_RESTART_COUNT"),
    ]
    return "SLURM " + " ".join(f"{k}={env.get(v, '-')}" for k, v in keys)
