"""Local GPU slots, so that `snakemake --resources gpu=N` runs N GPU jobs at once, each on its
own GPUs (Snakemake counts the `gpu` resource but does not say which device a job gets).

    python -m vlmflow.gpu_slots --gpus N -- CMD [ARGS...]

claims N of this machine's GPUs (one lock file per GPU, under $VLMFLOW_GPU_LOCKS or the temp
folder), sets CUDA_VISIBLE_DEVICES to them and execs CMD, which holds the locks until it exits
(killed too: the kernel releases them). The pool is CUDA_VISIBLE_DEVICES when set, else the GPUs
`nvidia-smi -L` lists. Under SLURM (SLURM_JOB_ID set) the job's devices are SLURM's, and with no
GPU (or N = 0) there is nothing to claim: CMD runs as it is.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLL_S = 5.0


def gpu_pool(environ: dict | None = None) -> list[str]:
    """The GPU ids a job may claim: CUDA_VISIBLE_DEVICES, else what nvidia-smi lists."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def lock_dir(environ: dict | None = None) -> Path:
    env = os.environ if environ is None else environ
    default = Path(tempfile.gettempdir()) / f"vlmflow-gpu-slots-{os.getuid()}"
    return Path(env.get("VLMFLOW_GPU_LOCKS") or default)


def try_claim(n: int, pool: list[str], locks: Path) -> tuple[list[str], list[int]] | None:
    """Lock n free GPUs of `pool`: (their ids, the open lock files), or None when fewer than n
    are free (nothing stays locked then)."""
    locks.mkdir(parents=True, exist_ok=True, mode=0o700)
    got: list[tuple[str, int]] = []
    for gpu in pool:
        fd = os.open(locks / f"gpu{gpu}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        got.append((gpu, fd))
        if len(got) == n:
            return [g for g, _ in got], [f for _, f in got]
    for _, fd in got:
        os.close(fd)
    return None


def claim(n: int, pool: list[str], locks: Path, poll_s: float = POLL_S):
    """try_claim until n GPUs are free (saying so on stderr while it waits)."""
    said = False
    while (got := try_claim(n, pool, locks)) is None:
        if not said:
            print(f"gpu_slots: waiting for {n} free GPU(s) of {pool}", file=sys.stderr)
            said = True
        time.sleep(poll_s)
    return got


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, required=True, help="GPUs the command needs")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    a = p.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        p.error("give the command after --")
    pool = [] if "SLURM_JOB_ID" in os.environ else gpu_pool()
    if a.gpus > 0 and pool:
        if a.gpus > len(pool):
            p.error(f"the job needs {a.gpus} GPUs; this machine has {len(pool)} ({pool})")
        gpus, fds = claim(a.gpus, pool, lock_dir())
        for fd in fds:
            os.set_inheritable(fd, True)  # the command holds the locks until it exits
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        print(
            f"gpu_slots: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}", file=sys.stderr
        )
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
