"""The comparison of an experiment's runs (results/experiments/{name}/): a table of runs x
settings x metrics (base, tuned, delta), the loss curves of every run on one plot, a gallery of
test samples with every run's answer next to the reference, the best run by the configured
metric (best.json: a pointer to its run and merged model), and the experiment's archive (every
run's resolved config with its hash, and the comparison)."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import pandas as pd
import yaml

from .archive import sha256_file, with_checksums, write_tar_gz
from .experiments import MISSING, config_hash, get_dotted, swept_settings
from .io import atomic_file, write_json
from .report import _page, _plt, _Raw, _save_fig, _table, _write_text, thumbnail_uri


def read_run_config(path: str | os.PathLike) -> dict:
    """A run's resolved config as written by rule resolved_config."""
    return yaml.safe_load(Path(path).read_text())


def comparison_table(configs: dict[str, dict], metrics: dict[str, dict]) -> pd.DataFrame:
    """One row per run (in order): the run, the settings that differ between runs, the base
    model, and per metric the base and tuned scores and their delta."""
    settings = swept_settings(configs)
    rows = []
    for run, cfg in configs.items():
        m = metrics[run]
        row: dict = {"run": run}
        for key in settings:
            value = get_dotted(cfg, key)
            row[key] = None if value is MISSING else value
        row["base_model"] = cfg["model"]["name"]
        for name in m["metrics"]:
            row[f"base_{name}"] = m["base"][name]
            row[f"tuned_{name}"] = m["tuned"][name]
            row[f"delta_{name}"] = m["delta"][name]
        rows.append(row)
    df = pd.DataFrame(rows)
    for key in settings:  # lists and mappings as text: one cell each
        df[key] = [v if isinstance(v, str | int | float | bool) else json.dumps(v) for v in df[key]]
    return df


def select_best(table: pd.DataFrame, metric: str, higher_is_better: bool) -> tuple[str, float]:
    """(run, tuned score) of the best run by `metric`; the first listed wins a tie."""
    column = f"tuned_{metric}"
    if column not in table:
        raise ValueError(f"experiment.select.metric '{metric}' is not a metric of every run")
    values = table[column].tolist()
    best = max(values) if higher_is_better else min(values)
    i = values.index(best)
    return str(table["run"].iloc[i]), float(best)


def loss_curves(logs: dict[str, str | os.PathLike], out_png: str | os.PathLike) -> None:
    """Training loss per optimizer step of every run, overlaid."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 5))
    positive = True
    for run, path in logs.items():
        records = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
        records = [r for r in records if r.get("loss") is not None]
        steps, losses = [r["step"] for r in records], [r["loss"] for r in records]
        positive &= all(v > 0 for v in losses)
        ax.plot(steps, losses, label=run, marker="." if len(steps) < 50 else None)
    ax.set_title("training loss")
    ax.set_xlabel("step")
    if positive:
        ax.set_yscale("log")
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save_fig(fig, out_png)


def gallery(
    predictions: dict[str, str | os.PathLike],
    configs: dict[str, dict],
    out_html: str | os.PathLike,
    max_items: int = 24,
) -> int:
    """Test samples (of the first run's test split), one row each: image, question, reference,
    the answer of each base model, and each run's answer (green when it equals the reference
    by exact match, as the per-sample column of the first metric says)."""
    frames = {run: pd.read_parquet(p).set_index("id") for run, p in predictions.items()}
    first = next(iter(frames.values()))
    ids = list(first.index[:max_items])
    bases: dict[str, str] = {}  # base model -> a run with it
    for run, cfg in configs.items():
        bases.setdefault(cfg["model"]["name"], run)
    header = ["image", "question", "reference"]
    header += [f"base: {Path(b).name}" for b in bases] + list(frames)
    rows = []
    for sample in ids:
        r = first.loc[sample]
        img = ""
        if r.get("image") and Path(r["image"]).is_file():
            img = f"<img src='{thumbnail_uri(r['image'], 96)}' alt='{html.escape(str(sample))}'>"
        cells = [_Raw(img), str(r["question"]), str(r["reference"])]
        for run in list(bases.values()):
            cells.append(_answer(frames[run], sample, "base"))
        for run in frames:
            cells.append(_answer(frames[run], sample, "tuned"))
        rows.append(cells)
    body = (
        f"<p>{len(ids)} of {len(first)} test samples; green: the answer equals the reference "
        "(exact match).</p>" + _table(header, rows, num_from=len(header))
    )
    _write_text(out_html, _page("Experiment: answers of every run", body))
    return len(ids)


def _answer(frame: pd.DataFrame, sample, who: str) -> str:
    if sample not in frame.index:
        return _Raw("<i>(not in this run's test split)</i>")
    r = frame.loc[sample]
    text = str(r[f"{who}_answer"])
    ok = text.strip().lower() == str(r["reference"]).strip().lower()
    color = "#e5f4e8" if ok else "#fbe9e7"
    return _Raw(f"<span style='background:{color}'>{html.escape(text) or '<i>(empty)</i>'}</span>")


def compare(
    runs: dict[str, dict],
    *,
    experiment: dict,
    out_dir: str | os.PathLike,
    gallery_samples: int = 24,
) -> dict:
    """Write the comparison of `runs` ({run: {config, metrics, predictions, train_log, adapter,
    merged}} paths) under `out_dir`: table.tsv, table.html, loss.png, gallery.html and
    best.json. Returns best.json's content."""
    out = Path(out_dir)
    configs = {r: read_run_config(p["config"]) for r, p in runs.items()}
    metrics = {r: json.loads(Path(p["metrics"]).read_text()) for r, p in runs.items()}
    table = comparison_table(configs, metrics)
    first = next(iter(metrics.values()))
    select = experiment["select"]
    metric = select["metric"] or first["metrics"][0]
    hib = select["higher_is_better"]
    if hib is None:
        hib = first["higher_is_better"][metric]
    best, value = select_best(table, metric, hib)
    with atomic_file(out / "table.tsv") as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    marked = table.assign(run=[f"{r} (best)" if r == best else r for r in table["run"]])
    body = (
        f"<p>{len(table)} runs; best by tuned {metric} "
        f"({'higher' if hib else 'lower'} is better): <b>{html.escape(best)}</b> "
        f"({value:.4g}).</p>" + _table(list(marked.columns), marked.values.tolist())
    )
    _write_text(out / "table.html", _page(f"Experiment {experiment['name']}", body))
    loss_curves({r: p["train_log"] for r, p in runs.items()}, out / "loss.png")
    gallery(
        {r: p["predictions"] for r, p in runs.items()},
        configs,
        out / "gallery.html",
        gallery_samples,
    )
    pointer = {
        "experiment": experiment["name"],
        "run": best,
        "metric": metric,
        "higher_is_better": hib,
        "value": value,
        "merged": runs[best].get("merged"),
        "adapter": runs[best]["adapter"],
        "config": runs[best]["config"],
    }
    write_json(out / "best.json", pointer)
    return pointer


def experiment_archive(
    out: str | os.PathLike,
    *,
    name: str,
    configs: dict[str, str | os.PathLike],
    comparison: list[str | os.PathLike],
) -> dict:
    """The experiment's archive: every run's resolved config with its hashes (runs.json: sha256
    of the file and of the canonical config), and the comparison files. Returns runs.json."""
    runs = {}
    members: dict[str, bytes | Path] = {}
    for run, path in configs.items():
        members[f"{name}/runs/{run}/config.yaml"] = Path(path)
        runs[run] = {
            "config": str(path),
            "config_sha256": sha256_file(path),
            "config_hash": config_hash(read_run_config(path)),
        }
    for f in comparison:
        members[f"{name}/comparison/{Path(f).name}"] = Path(f)
    members[f"{name}/runs.json"] = (json.dumps(runs, indent=2, sort_keys=True) + "\n").encode()
    write_tar_gz(out, with_checksums(members, name))
    return runs
