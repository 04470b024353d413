"""The JSON files one step writes and later steps read, as small typed records (no torch import).

- `Metrics`: `eval/metrics.json` (evaluate → report, summary, the model cards);
- `TrainSummary`: the adapter's `train_summary.json` (train → summary, the model cards);
- `MergeCheck`: `merge_check.json` (merge → report, the model cards, the archive).

`to_json()` gives exactly the JSON written before these records existed; `from_json()` reads it
back, and `read`/`write` do both through a file (written atomically). Optional keys are those a
file may lack (a check that was skipped, metrics written by hand or by an older run); what a
reader assumes when one is missing is said once, here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .io import write_json


class _Record:
    """to_json / from_json / read / write for a dataclass (None fields are left out)."""

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def read(cls, path: str | os.PathLike):
        return cls.from_json(json.loads(Path(path).read_text()))

    def write(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_json())


@dataclass(frozen=True)
class Metrics(_Record):
    """Base vs tuned on the test split (`eval/metrics.json`)."""

    n: int
    """Test samples scored."""
    base: dict[str, float]
    tuned: dict[str, float]
    metrics: list[str] | None = None
    """The metric names in the configured order (`eval.metrics`); absent: the tuned scores'."""
    delta: dict[str, float] | None = None
    """tuned - base per metric."""
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    """Per metric; a metric not listed is taken as higher-is-better."""
    generation: dict[str, dict] = field(default_factory=dict)
    """base / tuned: generated tokens, seconds, tokens/s."""
    settings: dict = field(default_factory=dict)
    """The models compared and the eval section."""

    @property
    def names(self) -> list[str]:
        return self.metrics or sorted(self.tuned)

    def higher(self, name: str) -> bool:
        """Whether a higher score of `name` is better."""
        return self.higher_is_better.get(name, True)


@dataclass(frozen=True)
class TrainSummary(_Record):
    """What a training run did (`adapter/train_summary.json`)."""

    steps: int
    final_loss: float | None
    resumed_from_step: int | None = None
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    family: str | None = None
    device: str | None = None
    world_size: int | None = None
    train_samples: int | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)  # every key, also a None final_loss


@dataclass
class MergeCheck(_Record):
    """The merged model's logits vs the adapter on the fresh base (`merge_check.json`): either
    `skipped` (with the reason) or the comparison; a 4-bit export adds its `quantized` error."""

    save_method: str | None = None
    skipped: str | None = None
    max_abs_diff: float | None = None
    max_abs_reference_logit: float | None = None
    tolerance: float | None = None
    top1_agreement: float | None = None
    tokens: int | None = None
    passed: bool | None = None
    compared: str | None = None
    check_dtype: str | None = None
    export_dtype: str | None = None
    samples: int | None = None
    atol: float | None = None
    rtol: float | None = None
    quantized: dict | None = None
    """The 4-bit export's max |logit diff| and top-1 agreement (reported, not gated)."""

    @property
    def ran(self) -> bool:
        """Whether the logits were compared (not skipped)."""
        return self.max_abs_diff is not None
