"""Per-run token budget: each sample's length with the run's model processor, image tokens
included, counted before any GPU job starts. Samples over `max_seq_length` are dropped with
reason `too_long` (or the run fails, `model.too_long: fail`); nothing is ever truncated.

Counting (`TokenCounter`) renders each conversation with the processor's chat template and
tokenizes the text; what images add is computed from each image's (upright) size:

- fast path: the processor's own size → token-count logic (`_get_num_multimodal_tokens`, the
  same resize rules as its image processor: `min_pixels`/`max_pixels`, patch and merge sizes),
  plus a constant calibrated against one real processor call. It is checked against real
  processor calls on the smallest, largest and most common sizes of the data before use;
- otherwise (or if that check fails): one real processor call per distinct image size, on a
  blank image of that size (cached);
- where what an image adds depends on the other images of its sample (LLaVA-OneVision tiles a
  lone image only), a row of several images is counted with one processor call on blank images
  of its sizes (cached by those sizes).

The total equals `len(processor(text=..., images=...).input_ids)`, what the collator feeds the
model (tests compare them on many sizes).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

PROBE_TEXT = "probe"


class TokenCounter:
    """Token counts of canonical conversations for one processor."""

    def __init__(self, processor):
        from .collate import to_hf_messages

        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self._to_hf = to_hf_messages
        self._probe_cache: dict[tuple[tuple[int, int], ...], int] = {}
        self._images_interact: bool | None = None
        self._fast_offset: int | None = None
        self.method = "probe"
        probe = self.render(self._probe_messages(0))
        self._text_offset = len(self._proc_ids(probe, None)) - len(self._tok_ids([probe])[0])

    # -- rendering and raw counts ------------------------------------------------------------
    def render(self, messages: Sequence[dict]) -> str:
        return self.processor.apply_chat_template(self._to_hf(messages), tokenize=False)

    @staticmethod
    def _probe_messages(n_images: int) -> list[dict]:
        parts = [{"type": "image", "text": "", "image": str(i)} for i in range(n_images)]
        return [
            {"role": "user", "content": [*parts, {"type": "text", "text": PROBE_TEXT}]},
            {"role": "assistant", "content": [{"type": "text", "text": PROBE_TEXT}]},
        ]

    def _tok_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts)["input_ids"]

    def _proc_ids(self, text: str, images: list | None) -> list[int]:
        kw = {"images": [images]} if images else {}
        out = self.processor(text=[text], **kw)
        return list(out["input_ids"][0])

    def probe(self, width: int, height: int) -> int:
        """Tokens one image of this size adds, from a real processor call (cached)."""
        return self.probe_images(((width, height),))

    def probe_images(self, sizes: tuple[tuple[int, int], ...]) -> int:
        """Tokens the images of these (width, height) add to one sample together, from a real
        processor call (cached)."""
        if sizes not in self._probe_cache:
            from PIL import Image

            text = self.render(self._probe_messages(len(sizes)))
            imgs = [Image.new("RGB", s, (127, 127, 127)) for s in sizes]
            with_img = len(self._proc_ids(text, imgs))
            self._probe_cache[sizes] = with_img - len(self._tok_ids([text])[0]) - self._text_offset
        return self._probe_cache[sizes]

    @property
    def images_interact(self) -> bool:
        """Whether what an image adds depends on the other images of its sample (LLaVA-OneVision
        tiles a lone image, not those of a multi-image sample): then a row of several images
        is counted with one processor call (cached by its sizes) instead of image by image."""
        if self._images_interact is None:
            size = (224, 224)
            self._images_interact = self.probe_images((size, size)) != 2 * self.probe(*size)
        return self._images_interact

    def _fast_raw(self, width: int, height: int) -> int:
        data = self.processor._get_num_multimodal_tokens(image_sizes=[(height, width)])
        return int(data["num_image_tokens"][0])

    def calibrate(self, sizes: Sequence[tuple[int, int]]) -> str:
        """Choose the fast path if it matches real processor calls on `sizes` (width, height)
        plus one reference size; returns the method chosen ('fast' or 'probe')."""
        self.method = "probe"
        if not hasattr(self.processor, "_get_num_multimodal_tokens"):
            return self.method
        checks = list(dict.fromkeys([(224, 224), *sizes]))
        offset = None
        for w, h in checks:
            try:
                real = self.probe(w, h)
            except Exception:  # a size the processor refuses: those samples are dropped anyway
                continue
            try:
                fast = self._fast_raw(w, h)
            except Exception as e:  # a processor without the size logic: probe instead
                log.info("image-token counts by processor calls (%s: %s)", type(e).__name__, e)
                return self.method
            if offset is None:
                offset = real - fast
            elif fast + offset != real:
                log.warning(
                    "fast image-token count disagrees with the processor at %dx%d (%d vs %d); "
                    "counting with one processor call per image size",
                    w,
                    h,
                    fast + offset,
                    real,
                )
                return self.method
        if offset is None:
            return self.method
        self._fast_offset = offset
        self.method = "fast"
        return self.method

    def image_tokens(self, width: int, height: int) -> int:
        if self._fast_offset is not None:
            return self._fast_raw(width, height) + self._fast_offset
        return self.probe(width, height)

    def count(self, rows: Sequence[dict], sizes: Sequence[Sequence[tuple[int, int]]]) -> list[dict]:
        """One dict per row: text_tokens, image_tokens, total, error ('' or 'kind: details').
        `sizes[i]` are the (width, height) of row i's images, in order."""
        texts, errors = [], []
        for r in rows:
            try:
                texts.append(self.render(r["messages"]))
                errors.append("")
            except Exception as e:  # jinja raises for conversations a template refuses
                texts.append("")
                errors.append(f"template_error: {type(e).__name__}: {e}")
        lengths = []
        for i in range(0, len(texts), 2048):
            lengths += [len(x) + self._text_offset for x in self._tok_ids(texts[i : i + 2048])]
        out = []
        for n, (row_sizes, err) in enumerate(zip(sizes, errors)):
            img = 0
            if not err:
                try:
                    if len(row_sizes) > 1 and self.images_interact:
                        img = self.probe_images(tuple(map(tuple, row_sizes)))
                    else:
                        img = sum(self.image_tokens(w, h) for w, h in row_sizes)
                except Exception as e:
                    err = f"processor_error: {type(e).__name__}: {e}"
            text = lengths[n] if not err else 0
            out.append(dict(text_tokens=text, image_tokens=img, total=text + img, error=err))
        return out


def representative_sizes(sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The smallest, largest and most common sizes (and most extreme aspect ratios)."""
    if not sizes:
        return []
    distinct = Counter(sizes)
    by_area = sorted(distinct, key=lambda s: s[0] * s[1])
    by_ratio = sorted(distinct, key=lambda s: s[0] / max(1, s[1]))
    picks = [by_area[0], by_area[-1], distinct.most_common(1)[0][0], by_ratio[0], by_ratio[-1]]
    return list(dict.fromkeys(picks))


def percentiles(values: Sequence[int]) -> dict:
    import numpy as np

    if not len(values):
        return {k: None for k in ("min", "mean", "p50", "p90", "p95", "p99", "max")}
    a = np.asarray(values)
    q = np.percentile(a, [50, 90, 95, 99])
    return {
        "min": int(a.min()),
        "mean": round(float(a.mean()), 1),
        "p50": int(math.ceil(q[0])),
        "p90": int(math.ceil(q[1])),
        "p95": int(math.ceil(q[2])),
        "p99": int(math.ceil(q[3])),
        "max": int(a.max()),
    }


def plot_histogram(lengths: list[dict], max_seq_length: int, png: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    kept = [r["total"] for r in lengths if r["kept"]]
    dropped = [r["total"] for r in lengths if not r["kept"] and not r["error"]]
    top = max([max_seq_length, *kept, *dropped]) if (kept or dropped) else max_seq_length
    bins = list(range(0, int(top * 1.05) + 2, max(1, int(top * 1.05) // 60)))
    ax.hist(
        [kept, dropped],
        bins=bins,
        stacked=True,
        label=["kept", "too long"],
        color=["tab:blue", "tab:red"],
    )
    ax.axvline(
        max_seq_length, color="black", linestyle="--", label=f"max_seq_length {max_seq_length}"
    )
    ax.set_xlabel("tokens per sample (text + image)")
    ax.set_ylabel("samples")
    ax.set_title(f"Token lengths ({len(kept)} kept, {len(dropped)} too long)")
    ax.legend()
    fig.tight_layout()
    from .io import atomic_file

    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_table(path: str | Path, stats: dict, max_seq_length: int) -> None:
    from .io import atomic_file

    cols = [
        "split",
        "rows",
        "kept",
        "too_long",
        "errors",
        "min",
        "mean",
        "p50",
        "p90",
        "p95",
        "p99",
        "max",
    ]
    with atomic_file(path) as tmp:
        lines = [f"# token lengths per sample; max_seq_length {max_seq_length}", "\t".join(cols)]
        for split, s in stats.items():
            lines.append("\t".join("" if s.get(c) is None else str(s.get(c, split)) for c in cols))
        tmp.write_text("\n".join(lines) + "\n")


def token_budget(
    model_cfg: dict,
    data_dir: str | Path,
    images_parquet: str | Path | None,
    outdir: str | Path,
    *,
    max_bad_fraction: float = 1.0,
    rejects_copy: str | Path | None = None,
    processor=None,
) -> dict:
    """Count, filter and write a run's data (see module docstring). Returns the summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .collate import image_hints, image_size_for
    from .data import (
        SPLITS,
        DataError,
        _rejected,
        read_conversations,
        rejected_table,
        to_table,
        write_rejects_tsv,
    )
    from .io import write_json, write_parquet

    data_dir, outdir = Path(data_dir), Path(outdir)
    if processor is None:
        from .modeling import load_processor

        processor = load_processor(model_cfg)
    limit = model_cfg["max_seq_length"]
    sizes_of: dict[str, tuple[int, int]] = {}
    if images_parquet:
        t = pq.read_table(images_parquet, columns=["resolved", "width", "height", "ok"])
        for r in t.to_pylist():
            if r["ok"]:
                sizes_of[r["resolved"]] = (r["width"], r["height"])

    def size(path: str) -> tuple[int, int]:
        if path not in sizes_of:
            from .images import load_rgb

            sizes_of[path] = load_rgb(path).size
        return sizes_of[path]

    rows = {s: read_conversations(data_dir / f"{s}.parquet") for s in SPLITS}
    all_rows = [(s, r) for s in SPLITS for r in rows[s]]

    def sizes_of_row(r: dict) -> list[tuple[int, int]]:
        # an image part's resize hint: the size the Encoder gives the processor
        return [
            size(p)
            if hint is None
            else image_size_for(size(p), hint, model_cfg["min_pixels"], model_cfg["max_pixels"])
            for p, hint in zip(r["images"], image_hints(r))
        ]

    sizes = [sizes_of_row(r) for _, r in all_rows]
    counter = TokenCounter(processor)
    counter.calibrate(representative_sizes([x for row in sizes for x in row]))
    log.info("counting tokens of %d samples (image tokens: %s path)", len(all_rows), counter.method)
    counts = counter.count([r for _, r in all_rows], sizes)

    lengths, rejected = [], []
    kept: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for (split, row), c, row_sizes in zip(all_rows, counts, sizes):
        ok = not c["error"] and c["total"] <= limit
        lengths.append(
            dict(
                id=row["id"],
                split=split,
                source=row["source"],
                n_images=len(row["images"]),
                text_tokens=c["text_tokens"],
                image_tokens=c["image_tokens"],
                total=c["total"],
                kept=ok,
                error=c["error"],
            )
        )
        if ok:
            kept[split].append(row)
            continue
        reason = c["error"] or (
            f"too_long: {c['total']} tokens ({c['image_tokens']} from {len(row_sizes)} "
            f"image(s)) > max_seq_length {limit}"
        )
        raw = json.dumps({"messages": row["messages"], "images": row["images"]}, ensure_ascii=False)
        rejected.append(_rejected(row["source"], None, row["id"], reason, raw[:2000]))

    stats = {}
    for split in (*SPLITS, "all"):
        sel = [x for x in lengths if split == "all" or x["split"] == split]
        ok_totals = [x["total"] for x in sel if not x["error"]]
        stats[split] = dict(
            split=split,
            rows=len(sel),
            kept=sum(x["kept"] for x in sel),
            too_long=sum(1 for x in sel if not x["kept"] and not x["error"]),
            errors=sum(1 for x in sel if x["error"]),
            **percentiles(ok_totals),
        )
    outdir.mkdir(parents=True, exist_ok=True)
    lengths_schema = pa.schema(
        [
            ("id", pa.string()),
            ("split", pa.string()),
            ("source", pa.string()),
            ("n_images", pa.int64()),
            ("text_tokens", pa.int64()),
            ("image_tokens", pa.int64()),
            ("total", pa.int64()),
            ("kept", pa.bool_()),
            ("error", pa.string()),
        ]
    )
    write_parquet(outdir / "token_lengths.parquet", pa.Table.from_pylist(lengths, lengths_schema))
    write_table(outdir / "token_lengths.tsv", stats, limit)
    plot_histogram(lengths, limit, outdir / "token_lengths.png")
    write_parquet(outdir / "rejected.parquet", rejected_table(rejected))
    write_rejects_tsv(outdir / "rejected.tsv", rejected)
    if rejects_copy:
        write_rejects_tsv(rejects_copy, rejected)

    n = len(all_rows)
    too_long = [r for r in rejected if r["kind"] == "too_long"]
    hint = (
        "raise model.max_seq_length, lower model.max_pixels (fewer image tokens), or shorten "
        "the texts"
    )
    if too_long and model_cfg["too_long"] == "fail":
        worst = sorted(lengths, key=lambda x: -x["total"])[:5]
        longest = ", ".join(f"{w['id']} ({w['total']} tokens)" for w in worst)
        raise DataError(
            f"{len(too_long)} of {n} samples exceed max_seq_length {limit} (model.too_long: "
            f"fail); longest: {longest}. "
            f"Fix: {hint}. List: {rejects_copy or outdir / 'rejected.tsv'}"
        )
    if n and len(rejected) / n > max_bad_fraction:
        by = Counter(r["kind"] for r in rejected)
        raise DataError(
            f"{len(rejected)} of {n} samples dropped by the token budget ({len(rejected) / n:.1%}"
            f" > max_bad_fraction {max_bad_fraction:.1%}); by reason: "
            f"{', '.join(f'{k}: {v}' for k, v in by.most_common())}; p50/p95/max tokens "
            f"{stats['all']['p50']}/{stats['all']['p95']}/{stats['all']['max']} vs "
            f"max_seq_length {limit}. Fix: {hint}. List: {rejects_copy or outdir / 'rejected.tsv'}"
        )
    if rows["train"] and not kept["train"]:
        raise DataError(f"no train sample fits max_seq_length {limit}. Fix: {hint}")
    for split in SPLITS:
        write_parquet(outdir / f"{split}.parquet", to_table(kept[split]))
    summary = {
        "max_seq_length": limit,
        "too_long": model_cfg["too_long"],
        "image_token_count": counter.method,
        "rows_in": n,
        "kept": n - len(rejected),
        "dropped": len(rejected),
        "dropped_by_reason": dict(Counter(r["kind"] for r in rejected).most_common()),
        "splits": {s: len(kept[s]) for s in SPLITS},
        "tokens": stats,
    }
    write_json(outdir / "summary.json", summary)
    return summary
