"""What a finished run produced, in a few lines: rows accepted and rejected, training steps and
final loss, the metrics base -> tuned, and where the adapter, merged model, report and archive
are. Printed at the end of `snakemake` (onsuccess) and shown on the report's landing page.

Reads only the files the run wrote; a stage that has not run yet is left out."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .artifacts import Metrics

REPORT_COMMAND = "snakemake --report report.html"


def report_command(configfiles: list[str] | None = None) -> str:
    """The command that builds this run's report (with the run's own config files)."""
    if not configfiles:
        return REPORT_COMMAND
    return f"{REPORT_COMMAND} --configfile {' '.join(configfiles)}"


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_summary(
    run: str,
    dataset: str,
    root: str | Path = ".",
    merged: bool = True,
    configfiles: list[str] | None = None,
    budget: str | Path | None = None,
) -> dict:
    """The facts of run `run` on `dataset` from the files under `root` (missing ones: None);
    `budget`: the summary.json of the run's token budget (shared by runs with its settings)."""
    root = Path(root)
    run_dir = Path("results/runs") / run
    data_dir = Path("results/data") / dataset
    train = _json(root / run_dir / "adapter/train_summary.json")
    if train is None and (root / run_dir / "adapter/train_log.jsonl").is_file():
        lines = (root / run_dir / "adapter/train_log.jsonl").read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
        train = {"steps": last.get("step"), "final_loss": last.get("loss")}

    def where(rel: str) -> str | None:
        return str(run_dir / rel) if (root / run_dir / rel).exists() else None

    return {
        "run": run,
        "dataset": dataset,
        "data": _json(root / data_dir / "summary.json"),
        "data_dir": str(data_dir),
        "budget": _json(root / budget) if budget else None,
        "train": train,
        "metrics": _json(root / run_dir / "eval/metrics.json"),
        "adapter": where("adapter"),
        "merged": where("merged") if merged else None,
        "config": where("config.yaml"),
        "archive": where("archive.tar.gz"),
        "report": "report.html" if (root / "report.html").is_file() else None,
        "report_command": report_command(configfiles),
    }


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def metric_lines(metrics: dict) -> list[str]:
    """`name base -> tuned` for each metric (lower-is-better ones say so)."""
    m = Metrics.from_json(metrics)
    out = []
    for name in m.names:
        out.append(
            f"{name} {_num(m.base[name])} -> {_num(m.tuned[name])}"
            + ("" if m.higher(name) else " (lower is better)")
        )
    return out


def format_summary(s: dict) -> str:
    """The terminal block."""
    lines = [f"vlmflow run '{s['run']}' (dataset '{s['dataset']}'):"]
    d = s["data"]
    if d:
        order = {"train": 0, "val": 1, "test": 2}
        splits = " / ".join(
            f"{k} {v}"
            for k, v in sorted(d.get("splits", {}).items(), key=lambda kv: order.get(kv[0], 3))
        )
        rejected = f"{d['rejected']} rejected"
        if d["rejected"]:
            reasons = ", ".join(f"{k} {v}" for k, v in d.get("rejected_by_reason", {}).items())
            rejected += f" ({reasons}; {s['data_dir']}/rejected.tsv)"
        lines.append(f"  data      {d['accepted']} rows accepted, {rejected}; {splits}")
    b = s["budget"]
    if b:
        lines.append(
            f"  tokens    {b['dropped']} of {b['rows_in']} samples over max_seq_length "
            f"{b['max_seq_length']} dropped"
        )
    t = s["train"]
    if t:
        lines.append(f"  training  {t['steps']} steps, final loss {_num(t['final_loss'])}")
    m = s["metrics"]
    if m:
        lines.append(f"  metrics   {'; '.join(metric_lines(m))} ({m['n']} test samples)")
    for key, label in (
        ("adapter", "adapter"),
        ("merged", "merged"),
        ("config", "config"),
        ("archive", "archive"),
    ):
        if s[key]:
            lines.append(f"  {label:<9} {s[key]}")
    lines.append(f"  report    {s['report'] or 'not built yet'} ({s['report_command']})")
    return "\n".join(lines)


def summary_html(s: dict, figure: str | Path | None = None) -> str:
    """An HTML fragment for the report's landing page: the metrics base vs tuned as a table,
    the run's facts, and `figure` (the training curves) inline."""
    esc = html.escape
    cell = "style='border:1px solid #ccc;padding:3px 10px'"
    parts = ["<div class='vlmflow-summary'>"]
    if s["metrics"]:
        m = Metrics.from_json(s["metrics"])
        rows = [f"<tr><th {cell}>metric</th><th {cell}>base</th><th {cell}>tuned</th></tr>"]
        for name in m.names:
            label = name + ("" if m.higher(name) else " (lower is better)")
            rows.append(
                f"<tr><td {cell}>{esc(label)}</td><td {cell}>{esc(_num(m.base[name]))}</td>"
                f"<td {cell}><b>{esc(_num(m.tuned[name]))}</b></td></tr>"
            )
        parts.append(
            f"<p><b>Base vs tuned</b> on {m.n} held-out test samples:</p>"
            f"<table style='border-collapse:collapse' class='vlmflow-metrics'>{''.join(rows)}"
            "</table>"
        )
    # The facts of the terminal summary but the metrics (the table) and the report command.
    facts = [line.strip().split(None, 1) for line in format_summary(s).splitlines()[1:-1]]
    items = "".join(f"<li><b>{esc(k)}</b> {esc(v)}</li>" for k, v in facts if k != "metrics")
    parts.append(f"<ul>{items}</ul>")
    if figure and Path(figure).is_file():
        uri = base64.b64encode(Path(figure).read_bytes()).decode()
        parts.append(
            "<p><b>Training</b> (loss, learning rate, gradient norm, tokens/s per step):</p>"
            f"<img class='vlmflow-training' style='max-width:100%' "
            f"src='data:image/png;base64,{uri}' alt='training curves'>"
        )
    parts.append("</div>")
    return "\n".join(parts)
