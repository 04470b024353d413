"""Ending a training job cleanly: preemption and time-limit signals, and GPU out-of-memory.

SLURM warns a job before its time limit (`sbatch --signal=TERM@180`, which the train rule asks
for) and before preemption (SIGTERM, then SIGKILL after the grace time); users and admins may
send SIGUSR1; Ctrl-C sends SIGINT. `PreemptionHandler` turns SIGTERM, SIGUSR1 and SIGINT into a
flag; the train loop checks it at every step boundary, writes a checkpoint atomically and raises
`Preempted`; the train CLI then exits with `EXIT_PREEMPTED` (75) and a message saying where it
stopped. The retried job (Snakemake `retries:` or a SLURM requeue) resumes from that checkpoint.

`stop_with_parent` (Linux) asks the kernel for a SIGTERM when the process that started the
trainer dies (Snakemake killed with -9): the orphan then checkpoints and stops instead of
training on beside the next run.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .cluster import EXIT_PREEMPTED

log = logging.getLogger(__name__)

__all__ = ["EXIT_PREEMPTED", "Preempted", "PreemptionHandler", "oom_advice", "stop_with_parent"]

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_PR_SET_PDEATHSIG = 1


def stop_with_parent(signum: int = signal.SIGTERM) -> bool:
    """Have the kernel send `signum` to this process when its parent dies (prctl
    PR_SET_PDEATHSIG; Linux only, else False). Under torchrun the parent is torchrun; under
    Snakemake, the Snakemake process (the rule `exec`s the trainer)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signum)
    return True


class Preempted(Exception):  # noqa: N818 (not an error: a requested stop)
    """Training stopped at a step boundary on request; the checkpoint is written."""

    def __init__(self, signame: str, step: int, total: int, checkpoint: Path):
        self.signame, self.step, self.total, self.checkpoint = signame, step, total, checkpoint
        super().__init__(
            f"{signame} received: stopped after step {step}/{total} and wrote the checkpoint "
            f"{checkpoint}. Run the same job again (Snakemake retries it) to resume from there; "
            f"exit code {EXIT_PREEMPTED}."
        )


class PreemptionHandler:
    """Install handlers for `signals` that only set a flag (checked by the train loop).

    Use as a context manager, or call `close()` to restore the previous handlers. Outside the
    main thread, signal handlers cannot be installed: the handler then stays inert (logged).
    """

    def __init__(self, signals=DEFAULT_SIGNALS):
        self.received: signal.Signals | None = None
        self.orphaned = False  # the signal came with the parent's death (stop_with_parent)
        self._parent = os.getppid()
        self._previous: dict[signal.Signals, object] = {}
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: preemption signals are not handled")
            return
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        log.info(
            "on %s: checkpoint at the next step and exit %d",
            "/".join(s.name for s in signals),
            EXIT_PREEMPTED,
        )

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            # the parent-death signal is SIGTERM (stop_with_parent); another signal sent to the
            # whole job (scancel --signal=USR1) may also end the parent: that is not why
            self.orphaned = signum == signal.SIGTERM and os.getppid() != self._parent
            # logging from a handler is safe in CPython: handlers run between bytecodes
            log.warning("%s received: will checkpoint and stop after this step", self.signame)

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def signame(self) -> str:
        if self.received is None:
            return "stop request"
        if self.orphaned:
            return f"{self.received.name} (its parent process {self._parent} ended)"
        return self.received.name

    def close(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def oom_advice(cfg: dict, world_size: int = 1, family=None) -> str:
    """What to lower after a CUDA out-of-memory error, given the resolved model/train config
    (and the model's `Family`, which says what `use_gradient_checkpointing: auto` did): a
    concrete next value for each setting that still has room, most effective first."""
    model, train = cfg["model"], cfg["train"]
    bs, accum = train["per_device_train_batch_size"], train["gradient_accumulation_steps"]
    tips = []
    if bs > 1:
        half = max(1, bs // 2)
        tips.append(
            f"train.per_device_train_batch_size: {bs} -> {half} (and "
            f"train.gradient_accumulation_steps: {accum} -> {accum * bs // half} to keep the "
            f"global batch of {bs * accum * world_size})"
        )
    if model.get("max_pixels") is None:
        tips.append(
            "model.max_pixels: unset -> e.g. 401408 (512 x 28 x 28): large images become "
            "thousands of vision tokens"
        )
    else:
        tips.append(
            f"model.max_pixels: {model['max_pixels']} -> {model['max_pixels'] // 2} "
            "(fewer vision tokens per image)"
        )
    gc = train.get("use_gradient_checkpointing")
    applied = gc
    if gc == "auto":  # what it was on the GPU that ran out (plain checkpointing if unknown)
        import torch

        from .modeling import gradient_checkpointing_mode

        cuda = torch.device("cuda")
        applied = True if family is None else gradient_checkpointing_mode(gc, model, cuda, family)
    if gc is False or gc in ("false", "False"):
        tips.append("train.use_gradient_checkpointing: false -> true (recompute activations)")
    elif applied is True or applied == "true":
        tips.append(
            f"train.use_gradient_checkpointing: {'auto' if gc == 'auto' else 'true'} -> "
            "offload, where available (activations kept in CPU memory)"
        )
    if not model.get("load_in_4bit"):
        tips.append("model.load_in_4bit: false -> true (QLoRA: 4-bit base weights)")
    tips.append(
        f"model.max_seq_length: {model['max_seq_length']} -> {model['max_seq_length'] // 2} "
        "(if long samples cause the peak)"
    )
    return (
        "CUDA ran out of memory during training. Lower one of these settings and run again:\n"
        + "\n".join(f"  - {t}" for t in tips)
    )
