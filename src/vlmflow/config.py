"""Configuration: one JSON schema (config/schema/config.schema.yaml) holds every key, its default
and its description. `validate_config` fills the defaults in place and reports every problem at
once, each with its key path, so that a typo fails at start and names the key."""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schema" / "config.schema.yaml"


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem found."""


def load_schema(path: Path | str = SCHEMA_PATH) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _with_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def _describe(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    if error.validator == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(known))
        parts = []
        for key in extra:
            hint = difflib.get_close_matches(key, known, n=1)
            where = f"{path}.{key}" if path != "<top level>" else key
            parts.append(
                f"unknown key '{where}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            )
        return "; ".join(parts)
    return f"'{path}': {error.message}"


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Validate `config` against the schema, filling defaults in place. Returns `config`.

    Raises ConfigError listing every problem (unknown keys with a close-match hint, wrong types,
    out-of-range values, missing required keys), plus cross-key checks the schema cannot express.
    """
    schema = schema or load_schema()
    validator = _Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    problems = [_describe(e) for e in errors]
    if not problems:
        problems += _cross_checks(config)
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
    return config


def _cross_checks(config: dict) -> list[str]:
    problems = []
    run = config["run"]
    if run["dataset"] not in config["datasets"]:
        problems.append(
            f"'run.dataset': '{run['dataset']}' is not a key of 'datasets' "
            f"({', '.join(sorted(config['datasets']))})"
        )
    for name, ds in config["datasets"].items():
        split = ds["split"]
        if split["val"] + split["test"] >= 1:
            problems.append(f"'datasets.{name}.split': val + test must be below 1")
    model = config["model"]
    if (
        model["min_pixels"] is not None
        and model["max_pixels"] is not None
        and model["min_pixels"] > model["max_pixels"]
    ):
        problems.append("'model.min_pixels' is larger than 'model.max_pixels'")
    return problems


def load_config_arg(value: str) -> dict:
    """Read a CLI `--config` argument: inline JSON (starting with '{') or a YAML/JSON file."""
    if value.lstrip().startswith("{"):
        return json.loads(value)
    with open(value) as f:
        return yaml.safe_load(f)


def resolve_sections(values: dict[str, Any], sections: list[str]) -> dict:
    """Validate the given top-level sections on their own and fill their defaults.

    CLIs use this: Snakemake passes them only the sections they depend on (so that editing one
    section re-runs only the rules that read it), and a user running a CLI by hand may pass a
    partial file. Returns a new dict with exactly `sections`.
    """
    schema = load_schema()
    unknown = sorted(set(values) - set(sections))
    problems = [f"unknown section '{k}' (this step reads {', '.join(sections)})" for k in unknown]
    out = {}
    for section in sections:
        sub = copy.deepcopy(values.get(section) or {})
        sub_schema = schema["properties"][section]
        for e in _Validator(sub_schema).iter_errors(sub):
            problems.append(f"{section}: {_describe(e)}")
        out[section] = sub
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
    return out


def resolve_dataset(values: dict) -> dict:
    """Validate one entry of `datasets` on its own and fill its defaults."""
    schema = load_schema()["properties"]["datasets"]["additionalProperties"]
    values = copy.deepcopy(values)
    problems = [_describe(e) for e in _Validator(schema).iter_errors(values)]
    if problems:
        raise ConfigError(
            "invalid dataset configuration:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return values
