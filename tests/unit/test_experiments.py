"""Experiments: runs and sweeps resolved into one validated config per run, what runs share, and
the comparison of their results."""

import copy
import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from vlmflow.compare import compare, comparison_table, experiment_archive, select_best
from vlmflow.config import ConfigError, validate_config
from vlmflow.experiments import (
    base_eval_key,
    budget_key,
    config_hash,
    expand_runs,
    format_value,
    resolve_runs,
    run_name,
    shared_jobs,
    swept_settings,
)


def base_config(**extra):
    cfg = {
        "datasets": {"d": {"sources": [{"path": "data.jsonl"}]}},
        "model": {"name": "org/base", "max_seq_length": 512},
        "lora": {"r": 16, "modules_to_save": ["lm_head"]},
        "train": {"learning_rate": 2e-4},
    }
    cfg.update(extra)
    return validate_config(cfg)


def test_a_grid_expands_to_every_combination_named_by_its_values():
    cfg = base_config(sweep={"grid": {"train.learning_rate": [1e-4, 2e-4], "lora.r": [8, 16]}})
    runs = resolve_runs(cfg)
    assert list(runs) == ["lr0.0001-r8", "lr0.0001-r16", "lr0.0002-r8", "lr0.0002-r16"]
    assert runs["lr0.0001-r16"]["train"]["learning_rate"] == 1e-4
    assert runs["lr0.0001-r16"]["lora"]["r"] == 16
    # each run's config is a whole single-run config: its own name, the only dataset, defaults
    assert runs["lr0.0002-r8"]["run"] == {"name": "lr0.0002-r8", "dataset": "d"}
    assert "sweep" not in runs["lr0.0002-r8"] and "runs" not in runs["lr0.0002-r8"]
    assert runs["lr0.0002-r8"]["train"]["max_grad_norm"] == 1.0  # a schema default


def test_adding_a_value_renames_no_existing_run():
    grid = {"train.learning_rate": [1e-4, 2e-4], "lora.r": [8, 16]}
    before = expand_runs(base_config(sweep={"grid": grid}))
    grid2 = {"train.learning_rate": [5e-5, 1e-4, 2e-4], "lora.r": [8, 16, 32]}
    after = expand_runs(base_config(sweep={"grid": grid2}))
    assert set(before) < set(after)
    for name, spec in before.items():
        assert after[name] == spec


def test_names_show_values_readably():
    assert format_value(1e-5) == "1e-05"
    assert format_value("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen2.5-VL-7B-Instruct"
    assert format_value(["q_proj", "v_proj"]) == "q_proj_v_proj"
    assert run_name({"model.name": "resources/models/tiny-qwen2_vl", "lora.r": 8}) == (
        "tiny-qwen2_vl-r8"
    )
    assert run_name({"lora.lora_alpha": 32}, prefix="ab") == "ab-alpha32"


def test_a_list_is_combined_with_the_grid_and_its_names_stand_for_the_entries():
    sweep = {
        "prefix": "cmp",
        "grid": {"lora.r": [8, 16]},
        "list": [
            {"name": "qwen", "model.name": "Qwen/Qwen2.5-VL-7B-Instruct"},
            {"model.name": "google/gemma-3-4b-it", "model.max_seq_length": 1024},
        ],
    }
    runs = resolve_runs(base_config(sweep=sweep))
    assert list(runs) == [
        "cmp-qwen-r8",
        "cmp-qwen-r16",
        "cmp-gemma-3-4b-it-max_seq_length1024-r8",
        "cmp-gemma-3-4b-it-max_seq_length1024-r16",
    ]
    assert runs["cmp-qwen-r8"]["model"]["name"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert runs["cmp-qwen-r8"]["model"]["max_seq_length"] == 512  # the shared default
    assert runs["cmp-gemma-3-4b-it-max_seq_length1024-r16"]["model"]["max_seq_length"] == 1024


def test_run_overrides_merge_into_the_shared_sections():
    cfg = base_config(
        datasets={"d": {"sources": [{"path": "a.jsonl"}]}, "e": {"sources": [{"path": "b"}]}},
        run={"name": "ignored", "dataset": "d"},
        runs={
            "plain": None,
            "other": {
                "dataset": "e",
                "model": {"name": "org/other"},
                "lora": {"modules_to_save": ["projector"]},
                "export": {"save_method": "lora"},
            },
        },
    )
    runs = resolve_runs(cfg)
    assert list(runs) == ["plain", "other"]  # `run:` is not a run of an experiment
    plain, other = runs["plain"], runs["other"]
    assert plain["run"]["dataset"] == "d" and other["run"]["dataset"] == "e"
    assert plain["model"] == cfg["model"]
    assert other["model"] == {**cfg["model"], "name": "org/other"}  # max_seq_length kept
    assert other["lora"]["modules_to_save"] == ["projector"]  # a list is replaced, not merged
    assert other["lora"]["r"] == 16
    assert other["export"]["save_method"] == "lora"
    assert cfg["model"]["name"] == "org/base"  # the shared config is not modified


def test_the_single_run_form_is_one_run_with_the_top_level_settings():
    cfg = base_config(run={"name": "solo", "dataset": "d"})
    runs = resolve_runs(cfg)
    assert list(runs) == ["solo"]
    assert runs["solo"]["model"] == cfg["model"] and runs["solo"]["train"] == cfg["train"]


def test_run_is_required_without_runs_or_sweep():
    with pytest.raises(ConfigError, match="'run': required"):
        base_config()


def test_every_problem_of_every_run_is_named_at_once():
    cfg = base_config(
        runs={
            "a": {"train": {"learnin_rate": 1e-4}},
            "b": {"lora": {"r": "big"}},
            "c": {"dataset": "nope"},
        },
        sweep={"grid": {"lora.r": [0]}},
    )
    with pytest.raises(ConfigError) as e:
        resolve_runs(cfg)
    text = str(e.value)
    assert "run 'a': unknown key 'train.learnin_rate' (did you mean 'learning_rate'?)" in text
    assert "run 'b': 'lora.r': 'big' is not of type 'integer'" in text
    assert "run 'c': 'run.dataset': 'nope' is not a key of 'datasets'" in text
    assert "run 'r0': 'lora.r': 0 is less than the minimum of 1" in text


def test_the_selected_metric_must_be_one_every_run_computes():
    cfg = base_config(
        eval={"metrics": ["exact_match", "cer"]},
        experiment={"select": {"metric": "cer"}},
        runs={"a": {}, "b": {"eval": {"metrics": ["anls"]}}},
    )
    with pytest.raises(ConfigError) as e:
        resolve_runs(cfg)
    assert "run 'b': 'experiment.select.metric' cer is not one of its eval.metrics" in str(e.value)
    assert "run 'a'" not in str(e.value)


def test_sweep_keys_and_names_are_checked():
    cfg = base_config(
        runs={"lr0.0001": {}},
        sweep={"grid": {"train.learning_rate": [1e-4], "resources.cpu": [1]}},
    )
    with pytest.raises(ConfigError) as e:
        expand_runs(cfg)
    assert "'sweep.grid.resources.cpu': 'resources.cpu' is not a key a run can set" in str(e.value)
    cfg["sweep"]["grid"].pop("resources.cpu")
    with pytest.raises(ConfigError, match="run name 'lr0.0001' is also that of runs.lr0.0001"):
        expand_runs(cfg)


def test_the_schema_refuses_a_misspelt_experiment_section():
    with pytest.raises(ConfigError, match="unknown key 'sweep.grids'"):
        base_config(sweep={"grids": {"lora.r": [8]}})
    with pytest.raises(ConfigError, match="unknown key 'runs.a.trian'"):
        base_config(runs={"a": {"trian": {}}})


def test_runs_share_the_budget_and_base_eval_when_their_settings_agree():
    cfg = base_config(
        runs={
            "big_batch": {"eval": {"threads": 8, "gpus": 2}},  # where it runs, not what
            "long": {"eval": {"max_new_tokens": 7}},
            "other_model": {"model": {"name": "org/other"}},
            "longer_seq": {"model": {"max_seq_length": 1024}},
        },
        sweep={"grid": {"train.learning_rate": [1e-4, 2e-4], "lora.r": [8, 16]}},
    )
    runs = resolve_runs(cfg)
    budgets = shared_jobs(runs, budget_key)
    bases = shared_jobs(runs, base_eval_key)
    # the sweep, big_batch and long share one budget; other_model and longer_seq have their own
    assert len(budgets) == 3
    assert len({budget_key(runs[r]) for r in ("big_batch", "long", "lr0.0001-r8")}) == 1
    # long generates more tokens: its own base evaluation
    assert len(bases) == 4
    assert base_eval_key(runs["big_batch"]) == base_eval_key(runs["lr0.0002-r16"])
    assert base_eval_key(runs["long"]) != base_eval_key(runs["lr0.0002-r16"])
    assert budget_key(runs["other_model"]).startswith("other-")
    assert list(bases.values())[0] == "big_batch"  # the first run with the settings
    assert set(swept_settings(runs)) == {
        "model.name",
        "model.max_seq_length",
        "lora.r",
        "train.learning_rate",
        "eval.threads",
        "eval.gpus",
        "eval.max_new_tokens",
    }


# ---------------------------------------------------------------------------------- comparison
def write_run(root, name, cfg, cer, losses):
    d = root / "results/runs" / name
    (d / "eval").mkdir(parents=True)
    (d / "adapter").mkdir()
    (d / "config.yaml").write_text("# header\n" + yaml.safe_dump(cfg))
    (d / "eval/metrics.json").write_text(
        json.dumps(
            {
                "metrics": ["exact_match", "cer"],
                "base": {"exact_match": 0.0, "cer": 0.9},
                "tuned": {"exact_match": 1 - cer, "cer": cer},
                "delta": {"exact_match": 1 - cer, "cer": cer - 0.9},
                "higher_is_better": {"exact_match": True, "cer": False},
            }
        )
    )
    pd.DataFrame(
        {
            "id": ["s1", "s2"],
            "image": [None, None],
            "question": ["which digit?", "which digit?"],
            "reference": ["3", "7"],
            "base_answer": ["1", "1"],
            "tuned_answer": [f"3{name}", "7"],
        }
    ).to_parquet(d / "eval/predictions.parquet")
    (d / "adapter/train_log.jsonl").write_text(
        "".join(json.dumps({"step": i + 1, "loss": v}) + "\n" for i, v in enumerate(losses))
    )
    return {
        "config": str(d / "config.yaml"),
        "metrics": str(d / "eval/metrics.json"),
        "predictions": str(d / "eval/predictions.parquet"),
        "train_log": str(d / "adapter/train_log.jsonl"),
        "adapter": str(d / "adapter"),
        "merged": str(d / "merged"),
    }


@pytest.fixture
def experiment_runs(tmp_path):
    cfg = base_config(sweep={"grid": {"train.learning_rate": [1e-4, 2e-4], "lora.r": [8, 16]}})
    runs = resolve_runs(cfg)
    cers = {"lr0.0001-r8": 0.5, "lr0.0001-r16": 0.25, "lr0.0002-r8": 0.125, "lr0.0002-r16": 0.3}
    return {
        name: write_run(tmp_path, name, runs[name], cers[name], [2.0, 1.0 + i])
        for i, name in enumerate(runs)
    }


def test_the_table_has_a_row_per_run_with_its_settings_and_metrics(experiment_runs):
    from vlmflow.compare import read_run_config

    configs = {r: read_run_config(p["config"]) for r, p in experiment_runs.items()}
    metrics = {r: json.loads(Path(p["metrics"]).read_text()) for r, p in experiment_runs.items()}
    table = comparison_table(configs, metrics)
    assert table["run"].tolist() == list(experiment_runs)
    assert table["lora.r"].tolist() == [8, 16, 8, 16]
    assert table["train.learning_rate"].tolist() == [1e-4, 1e-4, 2e-4, 2e-4]
    assert table["tuned_cer"].tolist() == [0.5, 0.25, 0.125, 0.3]
    assert table["delta_cer"].tolist() == pytest.approx([-0.4, -0.65, -0.775, -0.6])
    assert select_best(table, "cer", False) == ("lr0.0002-r8", 0.125)
    assert select_best(table, "exact_match", True) == ("lr0.0002-r8", 0.875)
    assert select_best(table, "cer", True) == ("lr0.0001-r8", 0.5)
    with pytest.raises(ValueError, match="'bleu' is not a metric"):
        select_best(table, "bleu", True)


def test_compare_writes_table_curves_gallery_and_best_pointer(experiment_runs, tmp_path):
    out = tmp_path / "results/experiments/e"
    experiment = {"name": "e", "select": {"metric": None, "higher_is_better": None}}
    best = compare(experiment_runs, experiment=experiment, out_dir=out)
    # metric null: the first of eval.metrics (exact_match, higher is better)
    assert (best["run"], best["metric"], best["higher_is_better"]) == (
        "lr0.0002-r8",
        "exact_match",
        True,
    )
    assert json.loads((out / "best.json").read_text()) == best
    assert best["merged"] == experiment_runs["lr0.0002-r8"]["merged"]
    tsv = pd.read_csv(out / "table.tsv", sep="\t")
    assert tsv["run"].tolist() == list(experiment_runs)
    assert "lr0.0002-r8 (best)" in (out / "table.html").read_text()
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    page = (out / "gallery.html").read_text()
    for run in experiment_runs:  # each run's answer, next to the reference
        assert f"3{run}" in page
    assert "base: base" in page and "<td>3</td>" in page

    experiment["select"] = {"metric": "cer", "higher_is_better": None}  # lower is better
    assert compare(experiment_runs, experiment=experiment, out_dir=out)["value"] == 0.125


def test_the_experiment_archive_records_every_config_with_its_hash(experiment_runs, tmp_path):
    out = tmp_path / "e.tar.gz"
    comparison = tmp_path / "table.tsv"
    comparison.write_text("run\n")
    configs = {r: p["config"] for r, p in experiment_runs.items()}
    runs = experiment_archive(out, name="e", configs=configs, comparison=[comparison])
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        recorded = json.load(tar.extractfile("e/runs.json"))
    assert recorded == runs
    assert {f"e/runs/{r}/config.yaml" for r in experiment_runs} <= names
    assert {"e/comparison/table.tsv", "e/SHA256SUMS"} <= names
    for run, path in configs.items():
        cfg = yaml.safe_load(Path(path).read_text())
        assert runs[run]["config_hash"] == config_hash(cfg)
        other = copy.deepcopy(cfg)
        other["train"]["learning_rate"] *= 2
        assert config_hash(other) != runs[run]["config_hash"]
