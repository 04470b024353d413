"""Experiments: many runs in one workflow.

A config holds either one run (`run: {name, dataset}`, the top-level sections as its settings) or
an experiment: named `runs:` (a dataset plus overrides of the sections in `RUN_SECTIONS`) and/or
a `sweep:` (a grid and/or a list over dotted keys such as `train.learning_rate`). The top-level
sections are the shared defaults of every run. `resolve_runs` turns a config into one fully
resolved, validated config per run (what that run's rules get as params, written to
results/runs/{run}/config.yaml); `budget_key` / `base_eval_key` name what runs share, so that
the token budget and the base model's evaluation run once per distinct setting, not per run.

Pure functions: no Snakemake, no files.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from pathlib import PurePosixPath
from typing import Any

from .config import ConfigError, load_schema, validate_config

# Sections a run may override; the others (datasets, resources, report, ...) are shared.
RUN_SECTIONS = ("model", "lora", "train", "eval", "export")
# Short forms of swept keys in run names (any other key shows as its last part).
ABBREVIATIONS = {
    "train.learning_rate": "lr",
    "train.per_device_train_batch_size": "bs",
    "train.gradient_accumulation_steps": "ga",
    "train.num_train_epochs": "epochs",
    "train.max_steps": "steps",
    "lora.lora_alpha": "alpha",
    "lora.lora_dropout": "dropout",
    "model.name": "",  # the model's own name says it
}
# Eval settings that change where a job runs, not its answers: not part of the base-eval key.
_PLACEMENT_KEYS = ("gpus", "threads")
_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


def is_experiment(config: dict) -> bool:
    """True when the config defines its runs with `runs:` and/or `sweep:`."""
    return bool(config.get("runs")) or bool(config.get("sweep"))


# ----------------------------------------------------------------------------- names
def format_value(value: Any) -> str:
    """A swept value as it shows in a run name: floats in short form (2e-4 -> 0.0002, 1e-5 ->
    1e-05), model ids and paths by their last part, characters a run name cannot hold as '_'."""
    if isinstance(value, bool) or value is None:
        text = json.dumps(value)
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = "_".join(format_value(v) for v in value)
    elif isinstance(value, dict):
        text = "_".join(f"{k}{format_value(v)}" for k, v in value.items())
    else:
        text = str(value)
        if "/" in text:
            text = PurePosixPath(text.rstrip("/")).name or text
    return _NAME_OK.sub("_", text).strip("_") or "_"


def run_name(point: dict[str, Any], prefix: str | None = None) -> str:
    """The name of a sweep point ({dotted key: value}, in the sweep's key order): each swept
    value with its key's short form, joined by '-', e.g. `lr0.0002-r16`. It depends on the
    point alone, so adding a value to the sweep renames no existing run."""
    parts = [prefix] if prefix else []
    for key, value in point.items():
        label = ABBREVIATIONS.get(key, key.rsplit(".", 1)[-1])
        parts.append(f"{label}{format_value(value)}")
    return "-".join(parts) or "run"


# ---------------------------------------------------------------------------- expansion
def set_dotted(target: dict, key: str, value: Any) -> None:
    """target[a][b] = value for key 'a.b' (intermediate mappings created)."""
    *head, leaf = key.split(".")
    for part in head:
        target = target.setdefault(part, {})
    target[leaf] = copy.deepcopy(value)


def _check_key(key: str, where: str) -> list[str]:
    section = key.split(".", 1)[0]
    if key == "dataset" or (section in RUN_SECTIONS and "." in key):
        return []
    allowed = ", ".join(["dataset"] + [f"{s}.<key>" for s in RUN_SECTIONS])
    return [f"'{where}': '{key}' is not a key a run can set ({allowed})"]


def sweep_points(sweep: dict) -> tuple[list[tuple[str, dict]], list[str]]:
    """The points of a sweep as (run name, {dotted key: value}), and the problems found. The
    grid is the product of its value lists; with a list too, every list entry is combined with
    every grid point. A name shows the point's values (see run_name); an entry's `name` stands
    for the entry's own values."""
    problems: list[str] = []
    grid = sweep.get("grid") or {}
    entries = sweep.get("list") or [{}]
    for key, values in grid.items():
        problems += _check_key(key, f"sweep.grid.{key}")
        if not isinstance(values, list) or not values:
            problems.append(f"'sweep.grid.{key}': give a non-empty list of values")
    for i, entry in enumerate(entries):
        for key in entry:
            if key != "name":
                problems += _check_key(key, f"sweep.list[{i}].{key}")
            if key in grid:
                problems.append(f"'sweep.list[{i}].{key}': also swept by sweep.grid")
    if problems:
        return [], problems
    points = []
    keys = list(grid)
    prefix = sweep.get("prefix")
    for entry in entries:
        fixed = {k: v for k, v in entry.items() if k != "name"}
        for combo in itertools.product(*(grid[k] for k in keys)):
            varied = dict(zip(keys, combo))
            if entry.get("name"):
                name = run_name(varied, "-".join(p for p in (prefix, entry["name"]) if p))
            else:
                name = run_name({**fixed, **varied}, prefix)
            points.append((name, {**fixed, **varied}))
    return points, problems


def expand_runs(config: dict) -> dict[str, dict]:
    """Every run of the config as {name: {"dataset": ..., section: overrides}} (overrides not
    yet merged): the single `run:`, or `runs:` and the sweep's points. Raises ConfigError naming
    every problem (a sweep key a run cannot set, two runs with one name)."""
    if not is_experiment(config):
        run = config["run"]
        return {run["name"]: {"dataset": run["dataset"]}}
    default_dataset = (config.get("run") or {}).get("dataset")
    if default_dataset is None and len(config.get("datasets") or {}) == 1:
        default_dataset = next(iter(config["datasets"]))
    runs: dict[str, dict] = {}
    origin: dict[str, str] = {}
    problems: list[str] = []

    def add(name: str, spec: dict, where: str) -> None:
        if name in runs:
            problems.append(f"'{where}': run name '{name}' is also that of {origin[name]}")
            return
        spec = copy.deepcopy(spec)
        spec.setdefault("dataset", default_dataset)
        runs[name], origin[name] = spec, where

    for name, spec in (config.get("runs") or {}).items():
        add(name, spec or {}, f"runs.{name}")
    sweep = config.get("sweep") or {}
    points, problems_sweep = sweep_points(sweep) if sweep else ([], [])
    problems += problems_sweep
    for name, point in points:
        spec: dict = {}
        for key, value in point.items():
            set_dotted(spec, key, value)
        add(name, spec, f"sweep point {json.dumps(point, sort_keys=True, default=str)}")
    if problems:
        raise ConfigError("invalid experiment:\n" + "\n".join(f"  - {p}" for p in problems))
    return runs


# --------------------------------------------------------------------------- resolution
def merge(base: dict, overrides: dict) -> dict:
    """`overrides` on top of `base`: mappings merged key by key, anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_run(config: dict, name: str, spec: dict, schema: dict | None = None) -> dict:
    """The full config of one run: the shared sections with the run's overrides, `run` set to
    the run, `runs`/`sweep` left out, validated (defaults filled). A ConfigError names the
    run."""
    base = {k: v for k, v in config.items() if k not in ("runs", "sweep")}
    overrides = {k: v for k, v in spec.items() if k != "dataset"}
    resolved = merge(base, overrides)
    resolved["run"] = {"name": name, "dataset": spec.get("dataset")}
    try:
        return validate_config(resolved, schema)
    except ConfigError as e:
        lines = str(e).splitlines()[1:]
        text = "\n".join(f"  - run '{name}': {ln.strip()[2:]}" for ln in lines)
        raise ConfigError(text) from None


def resolve_runs(config: dict, schema: dict | None = None) -> dict[str, dict]:
    """{run name: resolved config} of every run, in order; every problem of every run in one
    ConfigError (each naming its run and key)."""
    schema = schema or load_schema()
    runs = expand_runs(config)
    resolved, problems = {}, []
    for name, spec in runs.items():
        if _NAME_OK.sub("", name) != name:
            problems.append(f"  - run '{name}': a run name holds letters, digits, '.', '_', '-'")
            continue
        unknown = sorted(set(spec) - {"dataset", *RUN_SECTIONS})
        if unknown:
            problems.append(f"  - run '{name}': cannot set {', '.join(unknown)}")
            continue
        try:
            resolved[name] = resolve_run(config, name, spec, schema)
        except ConfigError as e:
            problems.append(str(e))
    metric = ((config.get("experiment") or {}).get("select") or {}).get("metric")
    if is_experiment(config) and metric is not None:
        problems += [
            f"  - run '{name}': 'experiment.select.metric' {metric} is not one of its "
            f"eval.metrics ({', '.join(cfg['eval']['metrics'])})"
            for name, cfg in resolved.items()
            if metric not in cfg["eval"]["metrics"]
        ]
    if problems:
        raise ConfigError("invalid experiment runs:\n" + "\n".join(problems))
    return resolved


# ----------------------------------------------------------------------- what runs share
def config_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _key(label: str, obj: Any) -> str:
    return f"{format_value(label)}-{config_hash(obj)[:10]}"


def budget_settings(run_cfg: dict) -> dict:
    """What the token budget of a run depends on: its dataset's limit and the model section
    (processor, pixel limits, max_seq_length)."""
    ds = run_cfg["datasets"][run_cfg["run"]["dataset"]]
    return {"model": run_cfg["model"], "max_bad_fraction": ds.get("max_bad_fraction")}


def budget_key(run_cfg: dict) -> str:
    """Folder name of the run's token budget under results/data/{dataset}/budget/: the model's
    name and a hash of `budget_settings`; runs with equal settings share it."""
    return _key(run_cfg["model"]["name"], budget_settings(run_cfg))


def base_eval_settings(run_cfg: dict) -> dict:
    """What the base model's answers depend on: the token budget (the test rows) and the eval
    settings (not where the job runs)."""
    ev = {k: v for k, v in run_cfg["eval"].items() if k not in _PLACEMENT_KEYS}
    return {"budget": budget_key(run_cfg), "model": run_cfg["model"], "eval": ev}


def base_eval_key(run_cfg: dict) -> str:
    """Folder name of the base model's evaluation under results/base/{dataset}/; runs with the
    same base model, data and eval settings share it."""
    return _key(run_cfg["model"]["name"], base_eval_settings(run_cfg))


def shared_jobs(runs: dict[str, dict], key_fn) -> dict[tuple[str, str], str]:
    """{(dataset, key): first run with it} over `runs`, for a key function (budget_key,
    base_eval_key): each shared job takes its settings from that run."""
    out: dict[tuple[str, str], str] = {}
    for name, cfg in runs.items():
        out.setdefault((cfg["run"]["dataset"], key_fn(cfg)), name)
    return out


def swept_settings(runs: dict[str, dict]) -> list[str]:
    """Dotted keys (of RUN_SECTIONS, plus 'dataset') whose value differs between runs: the
    settings columns of the comparison table."""

    def flat(value, path):
        if isinstance(value, dict) and value:
            for k, v in value.items():
                yield from flat(v, f"{path}.{k}")
        else:
            yield path, json.dumps(value, sort_keys=True, default=str)

    seen: dict[str, set] = {}
    for cfg in runs.values():
        items = [("dataset", json.dumps(cfg["run"]["dataset"]))]
        for s in RUN_SECTIONS:
            items += list(flat(cfg[s], s))
        for k, v in items:
            seen.setdefault(k, set()).add(v)
    return [k for k, vals in seen.items() if len(vals) > 1]


MISSING = object()


def get_dotted(cfg: dict, key: str) -> Any:
    """cfg's value at a dotted key ('dataset': the run's dataset); MISSING when absent."""
    if key == "dataset":
        return cfg["run"]["dataset"]
    value: Any = cfg
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value
