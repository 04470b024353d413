"""Configuration: one JSON schema (config/schema/config.schema.yaml) holds every key, its default
and its description. `validate_config` fills the defaults in place and reports every problem at
once, each with its key path, so that a typo fails at start and names the key."""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import VlmflowError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schema" / "config.schema.yaml"


class ConfigError(VlmflowError, ValueError):
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
    hint = _HINTS.get((path.rsplit(".", 1)[-1], error.validator))
    return f"'{path}': {error.message}" + (f" ({hint})" if hint else "")


# Extra words for errors whose plain jsonschema message does not say what to write instead.
_HINTS = {
    ("max_steps", "minimum"): "write null to train for num_train_epochs epochs instead",
}


def _non_finite(value, path: str = "") -> list[str]:
    """Keys holding NaN or +-inf (YAML `.nan`, `.inf`): a schema `minimum` lets NaN through."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, f"{path}.{k}" if path else k)]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _non_finite(v, f"{path}[{i}]")]
    if isinstance(value, float) and not math.isfinite(value):
        return [f"'{path}': {value} is not a finite number"]
    return []


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Validate `config` against the schema, filling defaults in place. Returns `config`.

    Raises ConfigError listing every problem (unknown keys with a close-match hint, wrong types,
    out-of-range values, missing required keys), plus cross-key checks the schema cannot express.
    """
    schema = schema or load_schema()
    validator = _Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    problems = _non_finite(config) + [_describe(e) for e in errors]
    if not problems:
        problems += _cross_checks(config)
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
    return config


def _cross_checks(config: dict) -> list[str]:
    problems = []
    run = config.get("run")
    if run is None and not (config.get("runs") or config.get("sweep")):
        problems.append("'run': required (or define the runs with 'runs:' / 'sweep:')")
    elif run is not None and run["dataset"] not in config["datasets"]:
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
    problems += _non_finite(values)
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


# ------------------------------------------------------------------ config files, as written
def _duplicate_keys(node, path: str = ""):
    """Yield a line for each key given twice in one mapping of a composed YAML document."""
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            where = f"{path}.{key}" if path else str(key)
            if key is not None and key != "<<":
                line = key_node.start_mark.line + 1
                if key in seen:
                    yield f"'{where}' is given twice, on line {seen[key]} and on line {line}"
                else:
                    seen[key] = line
            yield from _duplicate_keys(value_node, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, f"{path}[{i}]")


def load_config_file(path: str | os.PathLike) -> dict:
    """Read a YAML (or JSON) config file strictly: a key given twice in one mapping is an error
    naming both lines (a plain YAML load, Snakemake's included, silently keeps the last one)."""
    name = str(path)  # as given: the user's own spelling of it
    try:
        text = Path(path).read_text()
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except OSError as e:
        raise ConfigError(f"{name}: cannot read the config file ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: not valid YAML: {e}") from None
    duplicates = list(_duplicate_keys(node))
    if duplicates:
        raise ConfigError(
            f"{name}: duplicate keys (YAML would keep only the last one):\n"
            + "\n".join(f"  - {d}" for d in duplicates)
        )
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: the top level must be a mapping of sections (run:, ...)")
    return data


def check_config_files(paths) -> None:
    """Strictly re-read the config files a run is made of (see load_config_file); every problem
    of every file in one ConfigError."""
    problems = []
    for path in paths:
        try:
            load_config_file(path)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("\n".join(problems))


def _non_default(value, schema: dict, path: str):
    """(key path, value) of every setting of `value` that differs from its schema default."""
    if "default" in schema and value == schema["default"]:
        return
    if isinstance(value, dict) and ("properties" in schema or "additionalProperties" in schema):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            sub_schema = props.get(key, extra if isinstance(extra, dict) else {})
            yield from _non_default(sub, sub_schema, f"{path}.{key}" if path else key)
    elif (
        isinstance(value, list)
        and isinstance(schema.get("items"), dict)
        and value
        and all(isinstance(v, dict) for v in value)
    ):
        for i, item in enumerate(value):
            yield from _non_default(item, schema["items"], f"{path}[{i}]")
    else:
        yield path, value


def non_default_settings(config: dict, schema: dict | None = None) -> list[tuple[str, Any]]:
    """The resolved settings that differ from the schema's defaults, as (key path, value)."""
    return list(_non_default(config, schema or load_schema(), ""))


def describe_settings(
    config: dict, sources: list[str], schema: dict | None = None, width: int = 100
) -> str:
    """One compact block: where the config came from and every setting that is not the schema's
    default, one line per section (per dataset), wrapped at `width`."""
    groups: dict[str, list[str]] = {}
    for key, value in non_default_settings(config, schema):
        parts = key.split(".")
        n = 2 if parts[0] == "datasets" and len(parts) > 2 else 1
        head, rest = ".".join(parts[:n]), ".".join(parts[n:])
        groups.setdefault(head, []).append(
            f"{rest}={json.dumps(value)}" if rest else json.dumps(value)
        )
    lines = [
        f"vlmflow config ({', '.join(sources) or 'no file'}), settings other than the schema defaults:"
    ]
    for head, items in groups.items():
        line = f"  {head}:"
        for item in items:
            if len(line) + 1 + len(item) > width and not line.endswith(":"):
                lines.append(line)
                line = "    " + item
            else:
                line += " " + item
        lines.append(line)
    return "\n".join(lines)


def _accepts_string(schema: dict) -> bool:
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if "string" in types or any(isinstance(v, str) for v in schema.get("enum", [])):
        return True
    return any(_accepts_string(s) for s in schema.get("oneOf", []) + schema.get("anyOf", []))


def _typed(value, schema: dict):
    if isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        return {
            k: _typed(v, props.get(k, extra if isinstance(extra, dict) else {}))
            for k, v in value.items()
        }
    if isinstance(value, list):
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return [_typed(v, items) for v in value]
    if isinstance(value, str) and not _accepts_string(schema):
        try:
            typed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if isinstance(typed, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                return value
        return typed
    return value


def typed_cli_config(values: dict, schema: dict | None = None) -> dict:
    """`--config section={key: value}` as the schema means it: Snakemake parses such nested
    values with YAML's BaseLoader, so every leaf arrives as a string ('7', 'true'); a leaf whose
    key takes no string is read as YAML (7, True), the others stay strings. Also applied to the
    config files' values: YAML 1.1 reads `learning_rate: 2e-4` (no dot) as the text '2e-4'."""
    schema = schema or load_schema()
    return {
        k: _typed(v, schema.get("properties", {}).get(k, {})) for k, v in (values or {}).items()
    }
