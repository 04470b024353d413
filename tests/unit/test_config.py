import pytest

from vlmflow.config import ConfigError, resolve_sections, validate_config


def minimal():
    return {
        "run": {"name": "r1", "dataset": "d"},
        "datasets": {"d": {"sources": [{"path": "x.jsonl", "image_root": "imgs"}]}},
    }


def test_defaults_are_filled_from_the_schema():
    cfg = validate_config(minimal())
    assert cfg["lora"]["r"] == 16
    assert cfg["lora"]["finetune_vision_layers"] is True
    assert cfg["train"]["optim"] == "adamw_8bit"
    assert cfg["datasets"]["d"]["split"] == {
        "val": 0.05,
        "test": 0.1,
        "seed": 0,
        "group_by": "image",
        "group_column": None,
    }
    assert cfg["datasets"]["d"]["sources"][0]["columns"]["response"] == "response"
    assert cfg["model"]["trust_remote_code"] is False


def test_unknown_key_is_named_with_a_hint():
    cfg = minimal()
    cfg["train"] = {"learnig_rate": 1e-4}
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert "train.learnig_rate" in str(e.value)
    assert "did you mean 'learning_rate'" in str(e.value)


def test_every_problem_is_reported_at_once():
    cfg = minimal()
    cfg["lora"] = {"r": "sixteen"}
    cfg["train"] = {"optim": "sgd", "bogus": 1}
    cfg["extra_top"] = 1
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    msg = str(e.value)
    for needle in ("lora.r", "train.optim", "train.bogus", "extra_top"):
        assert needle in msg, needle


def test_cross_checks():
    cfg = minimal()
    cfg["run"]["dataset"] = "other"
    with pytest.raises(ConfigError, match="run.dataset"):
        validate_config(cfg)
    cfg = minimal()
    cfg["datasets"]["d"]["split"] = {"val": 0.5, "test": 0.5}
    with pytest.raises(ConfigError, match="val \\+ test"):
        validate_config(cfg)


def test_resolve_sections_for_cli_use():
    cfg = resolve_sections({"train": {"max_steps": 3}}, ["model", "train"])
    assert cfg["train"]["max_steps"] == 3 and cfg["train"]["seed"] == 3407
    assert cfg["model"]["dtype"] == "auto"
    with pytest.raises(ConfigError, match="unknown section 'lora'"):
        resolve_sections({"lora": {}}, ["train"])


def test_demo_and_test_configs_are_valid():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    paths = [root / "config/config.yaml", root / ".test/config.yaml"]
    paths += sorted((root / "config/examples").glob("*.yaml"))
    assert len(paths) > 2
    for path in paths:
        with open(path) as f:
            validate_config(yaml.safe_load(f))
