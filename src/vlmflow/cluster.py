"""What a job asks the cluster for, and how training processes are started on it.

Nothing here imports torch: rules/common.smk imports this module on every snakemake start.

Rules call `job_resources(...)` in their `resources:` block (through rules/common.smk), so that
partitions, GPU model, memory and wall time come from the config (or the profile's
`set-resources`), never from the rules. The keys are those of snakemake-executor-plugin-slurm
(slurm_partition, gpu, gpu_model, gres, nodes, tasks, mpi, cpus_per_task, slurm_extra); on a
workstation only `gpu` (checked against `--resources gpu=N`) matters.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

# Exit code of a training run stopped by SIGTERM/SIGUSR1 after writing its checkpoint
# (EX_TEMPFAIL: "try again"): the retried job resumes from that checkpoint.
EXIT_PREEMPTED = 75
# Signals torchrun forwards to its workers (torchrun's default set + SIGUSR1, which a cluster or
# a user may send to ask for a checkpoint); the workers get `shutdown_timeout_s` to write it.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
RDZV_BASE_PORT = 29500


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
    if group.get("qos") is not None:
        res["qos"] = group["qos"]  # the plugin's resource: it refuses --qos in slurm_extra
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
    fields = {
        "job": env.get("SLURM_JOB_ID"),
        "partition": env.get("SLURM_JOB_PARTITION"),
        "node": env.get("SLURMD_NODENAME"),
        "gpus": env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS"),
        "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES"),
        "restarts": env.get("SLURM_RESTART_COUNT"),
    }
    return "SLURM " + " ".join(f"{k}={v if v else '-'}" for k, v in fields.items())


# ------------------------------------------------------------------------------------ launching
# `launch_prefix()` is what the train rule runs its script with: `python` for one process,
# `torchrun --standalone` for N GPUs on one node, and for M nodes `srun` starting this module on
# each node, which calls torchrun with a c10d rendezvous on the job's first node.
def launch_prefix(
    gpus: int, nodes: int = 1, shutdown_timeout_s: int = 300, threads: int = 1
) -> str:
    """The command that starts a training script: `<prefix> scripts/train.py ...`.

    For several nodes the srun step names its CPUs, GPUs and memory itself: the plugin's job
    step drops the SLURM_* variables (SLURM_GPUS, SLURM_CPUS_PER_TASK, ...) srun would inherit.
    """
    if nodes > 1:
        gres = f" --gres=gpu:{gpus}" if gpus > 0 else ""
        return (
            f"srun --nodes={nodes} --ntasks-per-node=1 --cpus-per-task={threads}{gres} "
            f"--mem=0 --kill-on-bad-exit=1 "
            f"python -m vlmflow.cluster --nnodes={nodes} --nproc-per-node={max(gpus, 1)} "
            f"--shutdown-timeout={shutdown_timeout_s}"
        )
    if gpus > 1:
        return (
            f"torchrun --standalone --nnodes=1 --nproc-per-node={gpus} "
            f"--signals-to-handle={TORCHRUN_SIGNALS}{_shutdown_flag(shutdown_timeout_s)}"
        )
    return "python"


def _shutdown_flag(seconds: int) -> str:
    """` --shutdown-timeout=N` where this torch's torchrun knows the flag (torch 2.11's does
    not), read from its source so that torch is not imported while the DAG is built."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    run_py = Path(spec.origin).parent / "distributed" / "run.py" if spec and spec.origin else None
    if run_py is not None and run_py.is_file() and "shutdown-timeout" in run_py.read_text():
        return f" --shutdown-timeout={seconds}"
    return ""


def slurm_torchrun_args(
    nnodes: int, nproc_per_node: int, shutdown_timeout_s: int, environ=None, hostnames=None
) -> list[str]:
    """torchrun arguments for one node of a multi-node SLURM job: a c10d rendezvous on the
    job's first node, on a port derived from the job id (two jobs sharing a node don't clash)."""
    env = os.environ if environ is None else environ
    job = env["SLURM_JOB_ID"]
    if hostnames is None:
        hostnames = subprocess.run(
            ["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
    port = RDZV_BASE_PORT + int(job) % 1000
    return [
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc_per_node}",
        f"--node-rank={env.get('SLURM_NODEID', '0')}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={hostnames[0]}:{port}",
        f"--rdzv-id={job}",
        f"--signals-to-handle={TORCHRUN_SIGNALS}",
        *_shutdown_flag(shutdown_timeout_s).split(),
    ]


def main(argv: list[str] | None = None) -> None:
    """`python -m vlmflow.cluster --nnodes M --nproc-per-node N [...] -- script args`:
    torchrun for one node of a multi-node SLURM job (started once per node by srun)."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--nnodes", type=int, required=True)
    p.add_argument("--nproc-per-node", type=int, required=True)
    p.add_argument("--shutdown-timeout", type=int, default=300)
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command only")
    p.add_argument("script", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    script = a.script[1:] if a.script[:1] == ["--"] else a.script
    if not script:
        p.error("no training script given")
    args = [
        *slurm_torchrun_args(a.nnodes, a.nproc_per_node, a.shutdown_timeout),
        *script,
    ]
    if a.dry_run:
        print("torchrun " + shlex.join(args))
        return
    from torch.distributed.run import main as torchrun

    torchrun(args)


if __name__ == "__main__":
    sys.exit(main())
