"""Builders shared by the tests (importable as `helpers`: pytest puts tests/ on sys.path for
tests/conftest.py). Policies come from the schema's defaults, as the CLIs build them."""

import atexit
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

from vlmflow.config import resolve_dataset
from vlmflow.fetch import DownloadPolicy
from vlmflow.images import ImagePolicy

# A decoder small enough to count its FLOPs by hand (the tests of bench/flops.py): 2 layers 8 wide,
# MLP 16.
HAND_TEXT = dict(hidden_size=8, num_hidden_layers=2, intermediate_size=16)


def _images_defaults() -> dict:
    return resolve_dataset({"sources": [{"path": "unused.jsonl"}]})["images"]


def image_policy(**overrides) -> ImagePolicy:
    """The schema's default image policy, with `overrides` (ImagePolicy field names)."""
    return dataclasses.replace(ImagePolicy.from_config(_images_defaults()), **overrides)


def download_policy(**overrides) -> DownloadPolicy:
    """The schema's default download policy, with `overrides` (DownloadPolicy field names)."""
    return dataclasses.replace(
        DownloadPolicy.from_config(_images_defaults()["download"]), **overrides
    )


def train_config(model: str, **train_over) -> dict:
    """A small model/lora/train config of a tiny model (unresolved: the schema fills the rest):
    batch 8, 5 steps, lr 2e-3, LoRA r=8 with the head and projector trained in full."""
    train = {
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "max_steps": 5,
        "learning_rate": 2e-3,
        "warmup_steps": 1,
        "optim": "adamw_torch",
        "use_gradient_checkpointing": False,
        "seed": 2,
        **train_over,
    }
    return {
        "model": {"name": model, "max_seq_length": 256},
        "lora": {"r": 8, "lora_alpha": 16, "modules_to_save": ["lm_head", "projector"]},
        "train": train,
    }


class StopAfter:
    """Stands for a PreemptionHandler signalled during step `n` (checked once per step)."""

    def __init__(self, n, signame="SIGTERM"):
        self.n, self.checks = n, 0
        self.signame = signame

    @property
    def requested(self):
        self.checks += 1
        return self.checks >= self.n


BIN = Path(sys.executable).parent
_NO_SLURM_CONTROLLER: list[str] = []


def _no_slurm_controller() -> list[str]:
    """A folder whose `scontrol` answers "no controller" at once, where SLURM's tools are
    installed (CI installs them for the SLURM stage): every `snakemake` start imports the SLURM
    executor plugin, which asks `scontrol show config` for MinJobAge, and with no controller
    running that waits ~10 s (its timeout) per start, dry runs included."""
    if not _NO_SLURM_CONTROLLER and shutil.which("sinfo"):
        folder = tempfile.mkdtemp(prefix="vlmflow-no-slurmctld-")
        atexit.register(shutil.rmtree, folder, True)
        stub = Path(folder, "scontrol")
        stub.write_text(
            '#!/bin/sh\necho "scontrol: no SLURM controller in these tests" >&2\nexit 1\n'
        )
        stub.chmod(0o755)
        _NO_SLURM_CONTROLLER.append(folder)
    return _NO_SLURM_CONTROLLER


def snakemake_env(**extra) -> dict:
    """The environment of a `snakemake` the workflow tests start (not the SLURM tests: those run
    a controller): offline, the venv first on PATH (rules call `python scripts/...`), no wait for
    a SLURM controller (`_no_slurm_controller`), plus `extra`."""
    path = os.pathsep.join([str(BIN), *_no_slurm_controller(), os.environ["PATH"]])
    return dict(os.environ, HF_HUB_OFFLINE="1", PATH=path, **extra)
