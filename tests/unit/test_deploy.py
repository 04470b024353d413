"""How the workflow is deployed: the SLURM settings the profile and the schema show pass the
executor plugin's own checks, and the conda env file stands alone and matches the lock."""

import re
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from vlmflow.cluster import job_resources
from vlmflow.config import load_schema, validate_config

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------- SLURM
def profile_examples() -> dict:
    """The commented-out settings block of profiles/slurm/config.yaml, as YAML."""
    text = (ROOT / "profiles/slurm/config.yaml").read_text()
    block = re.search(r"^# default-resources:\n(?:#.*\n)+", text, re.M)
    assert block, "the profile's commented default-resources/set-resources example is gone"
    lines = [line[2:] for line in block.group(0).splitlines()]
    return yaml.safe_load("\n".join(lines))


def schema_slurm_extra_examples() -> list[str]:
    res = load_schema()["properties"]["resources"]["properties"]
    out = []
    for group in ("cpu", "gpu"):
        out += res[group]["properties"]["slurm_extra"].get("examples", [])
    assert out, "the schema gives no slurm_extra example"
    return out


def _validate(resources: dict) -> None:
    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra

    validate_slurm_extra(SimpleNamespace(resources=SimpleNamespace(**resources)))


def test_the_plugin_refuses_qos_in_slurm_extra():
    from snakemake_interface_common.exceptions import WorkflowError

    with pytest.raises(WorkflowError, match="quality-of-service"):
        _validate({"slurm_extra": "--qos=long"})


def test_every_slurm_example_passes_the_plugins_validation():
    examples = profile_examples()
    for rule, res in examples["set-resources"].items():
        extra = res.get("slurm_extra")
        # The profile quotes it for the shell-like parser of set-resources: strip that.
        _validate({**res, "slurm_extra": extra.strip("'\"") if extra else None})
        assert "qos" in res, f"the profile's {rule} example shows no qos resource"
    for extra in schema_slurm_extra_examples():
        _validate({"slurm_extra": extra})
    # What the rules ask for, with every example of the schema and a QoS set.
    for extra in schema_slurm_extra_examples():
        cfg = {
            "run": {"name": "r", "dataset": "d"},
            "datasets": {"d": {"sources": [{"path": "x"}]}},
            "resources": {
                "cpu": {"qos": "normal", "slurm_extra": extra},
                "gpu": {"qos": "gpu", "slurm_extra": extra},
            },
        }
        resources = validate_config(cfg)["resources"]
        for kwargs in ({}, {"gpus": 2, "time_limit_signal_s": 180}, {"gpus": 4, "nodes": 2}):
            res = job_resources(resources, **kwargs)
            assert res["qos"] == ("gpu" if kwargs else "normal")
            _validate(res)


# ----------------------------------------------------------------------------- conda env file
def test_env_file_is_self_contained_and_matches_the_lock():
    from vlmflow.envfile import lock_pins, render, runtime_requirements

    env_text = (ROOT / "envs/vlmflow.yaml").read_text()
    lock = (ROOT / "requirements.lock").read_text()
    env = yaml.safe_load(env_text)
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    # Snakemake copies the file into .snakemake/conda/: no path, no -r / -e, only pins.
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+!-]+", p) for p in pip), pip
    pins = lock_pins(lock)
    for p in pip:
        assert p in pins.values(), f"{p} is not the lock's pin"
    names = {p.split("==")[0].lower() for p in pip}
    for runtime in ("torch", "transformers", "peft", "pandas", "pyarrow", "jsonschema"):
        assert runtime in names
    for dev in ("pytest", "ruff", "snakefmt", "snakemake", "trl", "datasets"):
        assert dev not in names, dev
    # Exactly what `make lock` writes (python -m vlmflow.envfile) from the lock.
    assert env_text == render(lock, runtime_requirements())


def test_pyproject_declares_the_runtime_dependencies():
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    deps = {re.split(r"[<>=\[ ;]", d)[0].lower() for d in project["dependencies"]}
    imported = set()
    for path in [*ROOT.glob("src/vlmflow/**/*.py"), *ROOT.glob("scripts/*.py")]:
        for m in re.finditer(r"^\s*(?:from|import) ([A-Za-z_]\w*)", path.read_text(), re.M):
            imported.add(m.group(1))
    dist_of = {"PIL": "pillow", "yaml": "pyyaml"}
    dist_of |= {"rouge_score": "rouge-score"}
    third_party = {
        dist_of.get(name, name).lower()
        for name in imported
        if name not in __import__("sys").stdlib_module_names and name not in ("vlmflow",)
    }
    # Not runtime dependencies: llama.cpp's converter and its gguf-py, run from the llama.cpp
    # source the gguf rule fetches (their imports stand in the runner's code string), and
    # llama-cpp-python, asked for by name only when gguf_q4_k_m is chosen.
    on_demand = {"conversion", "convert_hf_to_gguf", "gguf", "llama_cpp"}
    assert third_party - {"packaging"} - on_demand <= deps, third_party - deps
    assert not deps & {"trl", "datasets", "pytest", "ruff", "snakefmt"}
    assert {"pytest", "ruff", "snakefmt"} <= {
        re.split(r"[<>=\[ ]", d)[0] for d in project["optional-dependencies"]["dev"]
    }
