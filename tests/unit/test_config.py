import pytest
import yaml

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


# ------------------------------------------------------------------ bad values, config files
@pytest.mark.parametrize(
    "section, values, needle",
    [
        (
            "lora",
            {"lora_alpha": -16},
            "'lora.lora_alpha': -16 is less than or equal to the minimum of 0",
        ),
        (
            "train",
            {"learning_rate": float("nan")},
            "'train.learning_rate': nan is not a finite number",
        ),
        (
            "train",
            {"max_grad_norm": float("inf")},
            "'train.max_grad_norm': inf is not a finite number",
        ),
        (
            "train",
            {"max_steps": 0},
            "'train.max_steps': 0 is less than the minimum of 1 (write null to train for "
            "num_train_epochs epochs instead)",
        ),
    ],
)
def test_bad_values_are_errors_naming_the_key(section, values, needle):
    cfg = minimal()
    cfg[section] = values
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert needle in str(e.value)
    # The CLIs (a section given by hand) check the same.
    with pytest.raises(ConfigError) as e:
        resolve_sections({section: values}, [section])
    assert needle.split("'")[1].split(".")[1] in str(e.value)


def test_nan_from_yaml_is_caught(tmp_path):
    from vlmflow.config import load_config_file

    path = tmp_path / "c.yaml"
    path.write_text(
        "run: {name: r, dataset: d}\ndatasets: {d: {sources: [{path: x}]}}\n"
        "train:\n  learning_rate: .nan\n"
    )
    with pytest.raises(ConfigError, match="'train.learning_rate': nan is not a finite number"):
        validate_config(load_config_file(path))


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path):
    from vlmflow.config import check_config_files, load_config_file

    path = tmp_path / "dup.yaml"
    path.write_text(
        "run:\n"  # 1
        "  name: r\n"  # 2
        "  dataset: d\n"  # 3
        "train:\n"  # 4
        "  learning_rate: 0.001\n"  # 5
        "  max_steps: 10\n"  # 6
        "  learning_rate: 0.1\n"  # 7
        "datasets:\n"  # 8
        "  d: {sources: [{path: x, path: y}]}\n"  # 9
        "run: {name: again}\n"  # 10
    )
    with pytest.raises(ConfigError) as e:
        load_config_file(path)
    msg = str(e.value)
    assert "duplicate keys" in msg and str(path) in msg
    assert "'train.learning_rate' is given twice, on line 5 and on line 7" in msg
    assert "'datasets.d.sources[0].path' is given twice, on line 9 and on line 9" in msg
    assert "'run' is given twice, on line 1 and on line 10" in msg
    good = tmp_path / "good.yaml"
    good.write_text("run: {name: r, dataset: d}\n")
    assert load_config_file(good) == {"run": {"name": "r", "dataset": "d"}}
    with pytest.raises(ConfigError, match="dup.yaml"):
        check_config_files([good, path])
    check_config_files([good])


def test_settings_that_differ_from_the_defaults():
    from vlmflow.config import describe_settings, non_default_settings

    cfg = minimal()
    cfg["train"] = {"max_steps": 30, "learning_rate": 1e-3}  # 30 is the default
    validate_config(cfg)
    assert non_default_settings(cfg) == [
        ("run.name", "r1"),
        ("run.dataset", "d"),
        ("datasets.d.sources[0].path", "x.jsonl"),
        ("datasets.d.sources[0].image_root", "imgs"),
        ("train.learning_rate", 0.001),
    ]
    block = describe_settings(cfg, ["my.yaml"])
    assert block.splitlines()[0].startswith("vlmflow config (my.yaml)")
    assert "  train: learning_rate=0.001" in block and "max_steps" not in block


def test_demo_and_example_configs_have_no_duplicate_keys():
    from pathlib import Path

    from vlmflow.config import check_config_files

    root = Path(__file__).resolve().parents[2]
    check_config_files(
        [root / "config/config.yaml", root / ".test/config.yaml", *root.glob("config/examples/*")]
    )


def test_nested_command_line_overrides_are_typed_by_the_schema():
    from vlmflow.config import typed_cli_config

    # What Snakemake's --config 'train={max_steps: 7, ...}' hands over (YAML BaseLoader).
    raw = {
        "train": {"max_steps": "7", "learning_rate": "1e-3", "cache_encoded": "true"},
        "run": {"name": "007"},
        "model": {"max_pixels": "null", "name": "x/y"},
        "eval": {"metrics": ["cer"]},
    }
    assert typed_cli_config(raw) == {
        "train": {"max_steps": 7, "learning_rate": 1e-3, "cache_encoded": True},
        "run": {"name": "007"},  # a string key stays a string
        "model": {"max_pixels": None, "name": "x/y"},
        "eval": {"metrics": ["cer"]},
    }


def test_a_yaml_1_1_exponent_is_a_number():
    from vlmflow.config import typed_cli_config

    cfg = minimal()
    cfg["train"] = yaml.safe_load("learning_rate: 2e-4\noptim: adamw_torch\n")
    assert cfg["train"]["learning_rate"] == "2e-4"  # what a YAML 1.1 loader gives
    cfg = validate_config(typed_cli_config(cfg))
    assert cfg["train"]["learning_rate"] == 2e-4 and cfg["train"]["optim"] == "adamw_torch"
