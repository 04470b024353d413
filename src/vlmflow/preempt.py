"""Ending a training job cleanly: preemption and time-limit signals, and GPU out-of-memory.

SLURM warns a job before its time limit (`sbatch --signal=TERM@180`, which the train rule asks
for) and before preemption (SIGTERM, then SIGKILL after the grace time); users and admins may
send SIGUSR1. `PreemptionHandler` turns SIGTERM and SIGUSR1 into a flag; the train loop checks
it at every step boundary, writes a checkpoint atomically and raises `Preempted`; the train CLI
then exits with `EXIT_PREEMPTED` (75) and a message saying where it stopped. The retried job
(Snakemake `retries:` or a SLURM requeue) resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from .cluster import EXIT_PREEMPTED

log = logging.getLogger(__name__)

__all__ = ["EXIT_PREEMPTED", "Preempted", "PreemptionHandler", "oom_advice"]

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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
            # logging from a handler is safe in CPython: handlers run between bytecodes
            log.warning("%s received: will checkpoint and stop after this step", self.received.name)

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def signame(self) -> str:
        return self.received.name if self.received is not None else "stop request"

    def close(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def oom_advice(cfg: dict, world_size: int = 1) -> str:
    """What to lower after a CUDA out-of-memory error, given the resolved model/train config:
    a concrete next value for each setting that still has room, most effective first."""
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
    if gc is False or gc in ("false", "False"):
        tips.append("train.use_gradient_checkpointing: false -> true (recompute activations)")
    elif gc is True or gc == "true":
        tips.append(
            "train.use_gradient_checkpointing: true -> offload, where available (activations "
            "kept in CPU memory)"
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
