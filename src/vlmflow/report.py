"""Figures and self-contained HTML pages for `snakemake --report`: data QC, training curves, the
metrics table and a gallery of test samples. Every page embeds its images (data URIs), so that it
renders inside the report's frame, offline."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

import pandas as pd

from .artifacts import MergeCheck, Metrics
from .io import atomic_file

CSS = """
body { font-family: system-ui, sans-serif; margin: 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.better { color: #17702a; font-weight: 600; } .worse { color: #b3261e; font-weight: 600; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 8px; width: 250px; }
.card img { display: block; margin: 0 auto 6px; image-rendering: pixelated; max-width: 234px; }
.card dl { margin: 0; display: grid; grid-template-columns: auto 1fr; gap: 2px 8px; }
.card dt { font-weight: 600; } .card dd { margin: 0; word-break: break-word; }
.ok { background: #e5f4e8; } .bad { background: #fbe9e7; }
.id { color: #777; font-size: 0.8em; }
"""


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"
        f"<body><h2>{html.escape(title)}</h2>\n{body}\n</body></html>\n"
    )


def _write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def _table(header: list[str], rows: list[list], num_from: int = 1) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            cls = " class='num'" if i >= num_from and isinstance(v, int | float) else ""
            cells.append(f"<td{cls}>{v if isinstance(v, _Raw) else html.escape(_fmt(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


class _Raw(str):
    """Already-escaped HTML."""


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig, path: str | os.PathLike) -> None:
    plt = _plt()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)


# --------------------------------------------------------------------------------------- data QC
def reason_label(reason: str) -> str:
    """A rejection reason's kind: its first word, with the image check for bad images
    ("bad_image: 'x.png': decode_error: ..." -> "bad_image: decode_error")."""
    parts = [p.strip() for p in str(reason).split(":")]
    if parts[0] == "bad_image" and len(parts) > 2:
        return f"bad_image: {parts[2]}"
    return parts[0]


def data_qc(
    summary_path: str | os.PathLike,
    rejected_path: str | os.PathLike,
    images_path: str | os.PathLike,
    out_html: str | os.PathLike,
    out_png: str | os.PathLike,
    max_rejected_rows: int = 50,
) -> dict:
    """Accepted/rejected rows by reason, split sizes and image checks, as a page and a figure."""
    summary = json.loads(Path(summary_path).read_text())
    rejected = pd.read_parquet(rejected_path)
    images = pd.read_parquet(images_path)
    reasons = dict(sorted(summary.get("rejected_by_reason", {}).items()))
    detailed = (
        rejected["reason"].map(reason_label).value_counts().sort_index() if len(rejected) else {}
    )
    image_reasons = (
        images.loc[~images["ok"], "reason"].str.split(":", n=1).str[0].value_counts().sort_index()
    )
    body = [
        "<h3>Rows</h3>",
        _table(
            ["rows in", "accepted", "rejected"],
            [[summary["rows_in"], summary["accepted"], summary["rejected"]]],
            num_from=0,
        ),
        "<h3>Splits (accepted rows)</h3>",
        _table(["split", "rows"], [[k, v] for k, v in summary["splits"].items()]),
        "<h3>Rejected rows by reason</h3>",
        _table(["reason", "rows"], [[k, v] for k, v in reasons.items()])
        if reasons
        else "<p>No row was rejected.</p>",
        "<h3>Image checks</h3>",
        _table(
            ["result", "images"],
            [["ok", int(images["ok"].sum())]] + [[k, int(v)] for k, v in image_reasons.items()],
        ),
    ]
    if len(rejected):
        shown = rejected.head(max_rejected_rows)
        body += [
            f"<h3>Rejected rows (first {len(shown)} of {len(rejected)})</h3>",
            _table(
                ["source", "row", "reason"],
                [[r["source"], r["row"], r["reason"]] for r in shown.to_dict("records")],
                num_from=1,
            ),
        ]
    _write_text(out_html, _page("Data quality", "\n".join(body)))

    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    splits = {k: summary["splits"][k] for k in ("train", "val", "test") if k in summary["splits"]}
    ax1.bar(list(splits), list(splits.values()), color="tab:blue")
    ax1.set_title(f"accepted rows by split ({summary['accepted']})")
    ax1.set_ylabel("rows")
    labels = [str(k) for k in dict(detailed)] or ["(none)"]
    ax2.barh(labels, [int(v) for v in dict(detailed).values()] or [0], color="tab:red")
    ax2.set_title(f"rejected rows by reason ({summary['rejected']})")
    ax2.set_xlabel("rows")
    fig.tight_layout()
    _save_fig(fig, out_png)
    return summary


# -------------------------------------------------------------------------------------- training
def training_curves(log_path: str | os.PathLike, out_png: str | os.PathLike) -> int:
    """Loss, learning rate, gradient norm and throughput per optimizer step."""
    records = [json.loads(x) for x in Path(log_path).read_text().splitlines() if x.strip()]
    if not records:
        raise ValueError(f"{log_path}: the training log is empty")
    steps = [r["step"] for r in records]
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6))
    panels = [
        ("loss", "training loss", "tab:blue", True),
        ("lr", "learning rate", "tab:orange", False),
        ("grad_norm", "gradient norm", "tab:green", False),
        ("tokens_per_s", "tokens / s", "tab:purple", False),
    ]
    for ax, (key, title, color, log_scale) in zip(axes.flat, panels):
        ax.plot(
            steps,
            [r.get(key) for r in records],
            color=color,
            marker="." if len(steps) < 50 else None,
        )
        ax.set_title(title)
        ax.set_xlabel("step")
        if log_scale and all((r.get(key) or 0) > 0 for r in records):
            ax.set_yscale("log")
    fig.tight_layout()
    _save_fig(fig, out_png)
    return len(records)


# ------------------------------------------------------------------------------------ evaluation
def metrics_page(
    metrics_path: str | os.PathLike,
    out_html: str | os.PathLike,
    out_png: str | os.PathLike,
    merge_check_path: str | os.PathLike | None = None,
    serve_check_path: str | os.PathLike | None = None,
) -> dict:
    """The base vs tuned table (with the better side marked), generation speed, the merge and
    serve checks and the settings."""
    m = Metrics.read(metrics_path)
    names = m.names
    rows = []
    for name in names:
        hib = m.higher(name)
        d = m.delta[name]
        better = (d > 0) == hib and d != 0
        cls = "better" if better else ("worse" if d != 0 else "")
        rows.append(
            [
                name + ("" if hib else " (lower is better)"),
                m.base[name],
                m.tuned[name],
                _Raw(f"<span class='{cls}'>{d:+.4g}</span>"),
            ]
        )
    body = [
        f"<p>Held-out test split: <b>{m.n}</b> samples.</p>",
        _table(["metric", "base", "tuned", "delta"], rows),
        "<h3>Generation</h3>",
        _table(
            ["model", "generated tokens", "seconds", "tokens / s"],
            [
                [k, v.get("generated_tokens"), v.get("seconds"), v.get("tokens_per_s")]
                for k, v in m.generation.items()
            ],
        ),
    ]
    if merge_check_path and Path(merge_check_path).exists():
        check = MergeCheck.read(merge_check_path).to_json()
        body += [
            "<h3>Merge check</h3>",
            _table(
                ["key", "value"], [[k, v] for k, v in sorted(check.items()) if k != "quantized"]
            ),
        ]
    if serve_check_path and Path(serve_check_path).exists():
        serve = json.loads(Path(serve_check_path).read_text())
        body += [
            f"<h3>Serve check ({serve['format']}, {serve['quantization']})</h3>",
            f"<p>{serve['served_by']} vs {serve['reference']}: token agreement "
            f"<b>{serve['token_agreement']:.3f}</b> (served tokens within "
            f"{serve['gap_tolerance']} std of the merged model's top logit; required "
            f"{serve['required_agreement']}), exact prefix agreement "
            f"{serve['prefix_agreement']:.3f}, {serve['identical_answers']} of "
            f"{len(serve['samples'])} answers identical.</p>",
            _table(
                ["sample", "merged model", "served", "agreeing served tokens", "max gap", "prefix"],
                [
                    [
                        s["id"],
                        s["reference"],
                        s["served"],
                        f"{s['agreeing_served_tokens']}/{s['served_tokens']}",
                        "inf" if s["max_gap"] is None else s["max_gap"],
                        f"{s['agreeing_tokens']}/{s['reference_tokens']}",
                    ]
                    for s in serve["samples"]
                ],
            ),
        ]
    body += [
        "<h3>Settings</h3>",
        _table(["key", "value"], [[k, json.dumps(v)] for k, v in sorted(m.settings.items())]),
    ]
    _write_text(out_html, _page("Base vs tuned", "\n".join(body)))

    plt = _plt()
    cols = min(4, len(names))
    rows_n = -(-len(names) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3 * cols, 2.8 * rows_n), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        vals = [m.base[name], m.tuned[name]]
        bars = ax.bar(["base", "tuned"], vals, color=["tab:gray", "tab:blue"])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(name + ("" if m.higher(name) else " (lower is better)"), fontsize=10)
        top = SCALE_TOP.get(name) or max(max(vals) * 1.2, 1.0)
        ax.set_ylim(0, top)
    fig.tight_layout()
    _save_fig(fig, out_png)
    return m.to_json()


SCALE_TOP = {"exact_match": 1.05, "accuracy": 1.05, "anls": 1.05, "rouge_l": 1.05, "bleu": 105}


def thumbnail_uri(path: str | os.PathLike, size: int = 160) -> str:
    """A PNG data URI of the image scaled to fit `size` (small images are enlarged without
    smoothing, so that an 8x8 digit stays readable)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = size / max(im.size)
        new = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize(new, Image.NEAREST if scale > 1 else Image.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _full_score(metric: str, value: float | None, higher_is_better: bool) -> bool:
    if value is None:
        return False
    if not higher_is_better:  # error rates
        return value == 0
    return value >= (100.0 if metric == "bleu" else 1.0) - 1e-6


def gallery_page(
    predictions_path: str | os.PathLike,
    metrics_path: str | os.PathLike,
    out_html: str | os.PathLike,
    max_items: int = 24,
) -> int:
    """Test images with question, reference, base answer and tuned answer; each answer is
    coloured by the first configured metric (green = full score)."""
    preds = pd.read_parquet(predictions_path)
    m = Metrics.read(metrics_path)
    metric = (m.metrics or ["exact_match"])[0]
    hib = m.higher(metric)
    shown = preds.head(max_items)
    cards = []
    for r in shown.to_dict("records"):
        img = ""
        if r.get("image") and Path(r["image"]).is_file():
            img = f"<img src='{thumbnail_uri(r['image'])}' alt='{html.escape(str(r['id']))}'>"
        answers = []
        for who in ("base", "tuned"):
            s = r.get(f"{who}_{metric}")
            cls = "ok" if _full_score(metric, s, hib) else "bad"
            label = f" ({metric} {s:.3g})" if s is not None else ""
            text = html.escape(str(r[f"{who}_answer"])) or "<i>(empty)</i>"
            answers.append(
                f"<dt>{who}</dt><dd class='{cls}'>{text}"
                f"<span class='id'>{html.escape(label)}</span></dd>"
            )
        cards.append(
            "<div class='card'>"
            + img
            + "<dl>"
            + f"<dt>question</dt><dd>{html.escape(str(r['question']))}</dd>"
            + f"<dt>reference</dt><dd>{html.escape(str(r['reference']))}</dd>"
            + "".join(answers)
            + "</dl>"
            + f"<div class='id'>{html.escape(str(r['id']))}</div></div>"
        )
    body = (
        f"<p>{len(shown)} of {len(preds)} test samples; answers coloured by {metric}.</p>"
        f"<div class='gallery'>{''.join(cards)}</div>"
    )
    _write_text(out_html, _page("Test samples: base vs tuned", body))
    return len(shown)
