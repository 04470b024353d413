"""Sources → canonical conversations (schema in docs/conversation_schema.md).

    id        string   stable id: the source's id column, else a hash of the prompt content
    source    string   source name
    messages  list<struct<role: string, content: list<struct<type: string, text: string,
                                                             image: string>>>>
              roles: system | user | assistant; part type: text | image. An image part's
              `image` is the index (as a string) into `images`; `text` is '' for image parts.
              Image parts appear in the order of `images`.
    images    list<string>  files as opened by vlmflow.images.load_rgb (under the image root,
                            or in the dataset's blob store for embedded and downloaded images)
    split     string   train | val | test, from hash(split.seed, id)

Rows that cannot be used are never dropped silently: they go to the rejected table with a
reason, and `rows in == accepted + rejected`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import DataError
from .fetch import DownloadPolicy
from .image_refs import BlobStore, ImageRef, record_key
from .image_validation import validate_refs
from .images import ImagePolicy
from .io import atomic_file, write_json, write_parquet
from .layouts import Sample, Source, iter_image_refs, iter_samples, raw_json
from .readers import RowError
from .redact import redact_text

log = logging.getLogger(__name__)

# resize: an image part's per-image size hint (Qwen-VL's resized_height / resized_width, or
# min_pixels / max_pixels); null = the model's settings
RESIZE = pa.struct(
    [(k, pa.int64()) for k in ("resized_height", "resized_width", "min_pixels", "max_pixels")]
)
PART = pa.struct(
    [("type", pa.string()), ("text", pa.string()), ("image", pa.string()), ("resize", RESIZE)]
)
# train: False on an assistant turn kept as context only (OpenAI's loss weight 0); null = the
# default (assistant turns are trained on)
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.list_(PART)), ("train", pa.bool_())])
CONVERSATION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("messages", pa.list_(MESSAGE)),
        ("images", pa.list_(pa.string())),
        ("split", pa.string()),
    ]
)
REJECTED_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row", pa.int64()),
        ("id", pa.string()),
        ("kind", pa.string()),
        ("reason", pa.string()),
        ("raw", pa.string()),
    ]
)
SPLITS = ("train", "val", "test")
ROLES = ("system", "user", "assistant")

__all__ = [
    "CONVERSATION_SCHEMA",
    "DataError",
    "REJECTED_SCHEMA",
    "SPLITS",
    "Source",
    "assign_split",
    "check_bad_fraction",
    "format_dataset",
    "read_conversations",
    "sources_of",
    "validate_dataset",
]


def sources_of(ds: dict) -> list[Source]:
    """The dataset config's sources. Each row's `source` is the source's `name`, else its file
    stem, else (when stems collide) its path without the suffix; names must be unique."""
    out = [Source(**s) for s in ds["sources"]]
    stems = Counter(Path(s.path).stem for s in out if s.name is None)
    for s in out:
        if s.name is None and stems[Path(s.path).stem] > 1:
            s.default_label = str(Path(s.path).with_suffix(""))
    seen: dict[str, str] = {}
    for s in out:
        if s.label in seen:
            raise DataError(
                f"two sources are both named '{s.label}' ({seen[s.label]} and {s.path}); "
                "give them different `name:`s"
            )
        seen[s.label] = s.path
    return out


# ---------------------------------------------------------------------------------------------
# Ids and splits.


def stable_id(source: str, image: str, instruction: str) -> str:
    h = hashlib.sha256(json.dumps([source, image, instruction]).encode()).hexdigest()
    return h[:16]


def content_id(source: str, messages: list[dict], images: list[ImageRef]) -> str:
    """Id derived from what the model is asked (images and non-assistant text), not from the
    answers: fixing a typo in an answer keeps the row's id and split, and the same question on
    the same image twice is a duplicate. One image (or none) and one prompt gives the seed's
    historical formula."""
    prompts = [
        "".join(p["text"] for p in m["content"] if p["type"] == "text")
        for m in messages
        if m["role"] != "assistant"
    ]
    values = [r.value for r in images]
    if len(prompts) == 1 and len(values) <= 1:
        return stable_id(source, values[0] if values else "", prompts[0])
    h = hashlib.sha256(json.dumps([source, values, prompts], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def assign_split(row_id: str, val: float, test: float, seed: int) -> str:
    """Deterministic split from a hash of (seed, id): adding rows never moves existing ones."""
    h = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    if u < test:
        return "test"
    if u < test + val:
        return "val"
    return "train"


class SplitGroups:
    """Rows that share an image (its content hash) or a value of the group column are one group,
    and a group goes to one split: no image is in both train and test. Groups are merged as rows
    arrive (union-find over the keys); a group's split is the hash of (seed, its smallest key),
    so that a row alone with its image keeps its split when other rows are added."""

    def __init__(self, split_cfg: dict):
        self.cfg = split_cfg
        self.by = split_cfg.get("group_by", "none")
        self.parent: dict[str, str] = {}
        self.first: list[str] = []

    def _find(self, k: str) -> str:
        root = k
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[k] != root:
            self.parent[k], k = root, self.parent[k]
        return root

    def _union(self, a: str, b: str) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:  # the smaller key is the root: the group's name, whatever the order of rows
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo

    def keys_of(self, row: dict) -> list[str]:
        if self.by == "image" and row["_images"]:
            return ["image:" + k for k in row["_images"]]
        if self.by == "column":
            col = self.cfg["group_column"]
            raw = row["_raw"] if isinstance(row["_raw"], dict) else {}
            v = raw.get(col)
            if v not in (None, ""):
                return [f"column:{v}"]
        return ["id:" + row["id"]]

    def add(self, row: dict) -> None:
        keys = self.keys_of(row)
        for k in keys:
            self.parent.setdefault(k, k)
        for k in keys[1:]:
            self._union(keys[0], k)
        self.first.append(keys[0])

    def split(self, i: int) -> str:
        """Split of the i-th row added."""
        name = self._find(self.first[i])
        if name.startswith("id:"):
            name = name[3:]  # a row on its own: the historical hash of its id
        return assign_split(name, self.cfg["val"], self.cfg["test"], self.cfg["seed"])

    def count(self) -> int:
        return sum(1 for k in self.parent if self.parent[k] == k)


def empty_split_message(
    dataset: str, split: str, counts: dict, split_cfg: dict, groups: int, need: str
) -> str:
    accepted = sum(counts.values())
    key = f"datasets.{dataset}.split" if dataset else "split"
    grouped = {
        "image": f"rows that share an image stay together: {groups} groups",
        "column": f"rows with the same '{split_cfg.get('group_column')}' stay together: "
        f"{groups} groups",
    }.get(split_cfg.get("group_by"), f"{groups} rows")
    if not accepted:
        return f"no row was accepted, so the {split} split is empty; {need}"
    if split == "train":
        fix = f"lower {key}.val / {key}.test, or add rows"
        asked = f"{key}.val = {split_cfg['val']}, {key}.test = {split_cfg['test']}"
    else:
        asked = f"{key}.{split} = {split_cfg[split]}"
        expect = accepted * split_cfg[split]
        asked += f" (about {expect:.1f} of them)"
        fix = f"raise {key}.{split} (or change {key}.seed), or add rows"
    return (
        f"the {split} split is empty: {accepted} rows accepted ({grouped}), {asked}, split "
        f"train/val/test = {counts['train']}/{counts['val']}/{counts['test']}; {need}. "
        f"Fix: {fix}."
    )


# ---------------------------------------------------------------------------------------------
# Conversion.


def reason_kind(reason: str) -> str:
    """The short kind of a reason ('kind: details' → 'kind')."""
    return reason.split(":", 1)[0]


def _lookup(images: dict, ref: ImageRef) -> dict | None:
    rec = images.get(ref.key)
    if rec is None and ref.kind == "path":
        rec = images.get((ref.root, ref.value))  # maps keyed the pre-formats way
    return rec


def convert_source(source: Source, images: dict, split_cfg: dict) -> Iterator[tuple[bool, dict]]:
    """(True, canonical row) or (False, rejected row) for every row of `source`, in order.

    `images` maps an image key (`ImageRef.key`) to its images.parquet record.
    """
    label = source.label
    for s in iter_samples(source):
        if isinstance(s, RowError):
            yield False, _rejected(label, s.row, None, s.reason, s.raw)
            continue
        yield _convert(label, s, images, split_cfg)


def _convert(label: str, s: Sample, images: dict, split_cfg: dict) -> tuple[bool, dict]:
    row_id = s.id or content_id(label, s.messages, s.images)
    paths, shas = [], []
    for ref in s.images:
        info = _lookup(images, ref)
        if info is None:
            return False, _rejected(
                label,
                s.row,
                row_id,
                f"bad_image: {ref.describe()}: not_validated: not in images.parquet "
                "(re-run validate_images)",
                s.raw,
            )
        if not info["ok"]:
            kind = "bad_image/" + info["reason"].split(":", 1)[0]
            reason = f"bad_image: {ref.describe()}: {info['reason']}"
            return False, _rejected(label, s.row, row_id, reason, s.raw, kind)
        paths.append(info["resolved"])
        shas.append(info.get("sha256") or info["resolved"])
    row = dict(
        id=row_id,
        source=label,
        messages=s.messages,
        images=paths,
        split=assign_split(row_id, split_cfg["val"], split_cfg["test"], split_cfg["seed"]),
        _row=s.row,
        _raw=s.raw,
        _images=shas,
    )
    return True, row


def _rejected(
    source: str, row: int | None, row_id: str | None, reason: str, raw, kind: str | None = None
) -> dict:
    return dict(
        source=source,
        row=row,
        id=row_id,
        kind=kind or reason_kind(reason),
        reason=redact_text(reason),  # no URL credential or token in rejected.parquet
        raw=redact_text(raw if isinstance(raw, str) else raw_json(raw)),
    )


def check_row(row: dict) -> None:
    """The canonical schema's rules beyond column types (checked on every write)."""
    if not row["id"]:
        raise ValueError("a conversation row has an empty id")
    if row["split"] not in SPLITS:
        raise ValueError(f"row {row['id']}: split {row['split']!r} not in {SPLITS}")
    used = []
    for m in row["messages"]:
        if m["role"] not in ROLES:
            raise ValueError(f"row {row['id']}: role {m['role']!r} not in {ROLES}")
        for p in m["content"]:
            if p["type"] == "image":
                used.append(int(p["image"]))
            elif p["type"] != "text" or p["text"] is None:
                raise ValueError(f"row {row['id']}: bad part {p}")
    if used != list(range(len(row["images"]))):
        raise ValueError(f"row {row['id']}: image parts {used} do not index images in order")
    if not any(m["role"] == "assistant" for m in row["messages"]):
        raise ValueError(f"row {row['id']}: no assistant turn")


def to_table(rows: list[dict]) -> pa.Table:
    for r in rows:
        check_row(r)
    clean = [{k: r[k] for k in CONVERSATION_SCHEMA.names} for r in rows]
    return pa.Table.from_pylist(clean, schema=CONVERSATION_SCHEMA)


def rejected_table(rows: list[dict]) -> pa.Table:
    rows = [{**r, "kind": r.get("kind") or reason_kind(r["reason"])} for r in rows]
    return pa.Table.from_pylist(rows, schema=REJECTED_SCHEMA)


class _Sink:
    """Rows streamed into one Parquet file via a temporary file renamed on commit."""

    def __init__(self, path: Path, schema: pa.Schema, to_table, batch: int = 20_000):
        self.path, self.schema, self.to_table, self.batch = path, schema, to_table, batch
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.writer = pq.ParquetWriter(self.tmp, schema)
        self.rows: list[dict] = []
        self.count = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(self.to_table(self.rows))
            self.rows = []

    def commit(self) -> None:
        self.flush()
        self.writer.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


def write_rejects_tsv(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """The rejects as a tab-separated table a person can read (or open in a spreadsheet)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["source", "row", "id", "kind", "reason", "raw"])
        for r in rows:
            w.writerow(
                [
                    r["source"],
                    "" if r["row"] is None else r["row"],
                    r["id"] or "",
                    r["kind"],
                    r["reason"],
                    r["raw"],
                ]
            )


def bad_fraction_message(n_in: int, rejected: list[dict], max_bad_fraction: float) -> str:
    frac = len(rejected) / n_in
    counts = Counter(r.get("kind") or reason_kind(r["reason"]) for r in rejected)
    first: dict[str, dict] = {}
    for r in rejected:
        first.setdefault(r.get("kind") or reason_kind(r["reason"]), r)
    detail = ", ".join(f"{k}: {v}" for k, v in counts.most_common())
    examples = "\n".join(
        f"  {k}: e.g. {first[k]['source']} row {first[k]['row']}: {first[k]['reason'][:300]}"
        for k, _ in counts.most_common(10)
    )
    return (
        f"{len(rejected)} of {n_in} rows rejected ({frac:.1%} > max_bad_fraction "
        f"{max_bad_fraction:.1%}); by reason: {detail}.\n{examples}"
    )


def check_bad_fraction(n_in: int, rejected: list[dict], max_bad_fraction: float) -> None:
    if n_in == 0:
        raise DataError("the dataset has no rows")
    if len(rejected) / n_in > max_bad_fraction:
        raise DataError(bad_fraction_message(n_in, rejected, max_bad_fraction))


def format_dataset(
    ds: dict,
    images: dict,
    outdir: str | os.PathLike,
    *,
    rejects_copy: str | os.PathLike | None = None,
    name: str = "",
    require: tuple[str, ...] = ("train",),
) -> dict:
    """Convert every source of a dataset config; write {train,val,test}.parquet,
    rejected.parquet, rejected.tsv and summary.json under `outdir`. Returns the summary.

    Rows stream through (memory does not grow with the dataset except for the set of ids).
    The rejects are written before the `max_bad_fraction` check, also to `rejects_copy` (a log
    file, which Snakemake keeps when the job fails), so that a failed run shows why.

    Splits keep groups together (`split.group_by`): accepted rows are staged in one Parquet file
    while the groups form, then written to their split. A split in `require` (and the test split
    whenever `split.test` > 0) that comes out empty is a DataError naming the numbers and the
    key to change (`name` is the dataset's key in the config).
    """
    outdir = Path(outdir)
    sources = sources_of(ds)
    sinks = {s: _Sink(outdir / f"{s}.parquet", CONVERSATION_SCHEMA, to_table) for s in SPLITS}
    staged = _Sink(outdir / ".staged.parquet", CONVERSATION_SCHEMA, to_table)
    groups = SplitGroups(ds["split"])
    rejected: list[dict] = []
    seen: dict[str, tuple[str, int]] = {}
    per_source: dict[str, Counter] = {}
    n_images = 0
    try:
        for src in sources:
            counts = per_source.setdefault(src.label, Counter())
            for ok, row in convert_source(src, images, ds["split"]):
                counts["rows"] += 1
                if ok and row["id"] in seen:
                    first_src, first_row = seen[row["id"]]
                    ok, row = (
                        False,
                        _rejected(
                            row["source"],
                            row["_row"],
                            row["id"],
                            f"duplicate_id: same id as {first_src} row {first_row}",
                            row["_raw"],
                        ),
                    )
                if not ok:
                    rejected.append(row)
                    counts["rejected"] += 1
                    continue
                seen[row["id"]] = (row["source"], row["_row"])
                n_images += len(row["images"])
                groups.add(row)
                staged.add(row)
                counts["accepted"] += 1
        n_in = sum(c["rows"] for c in per_source.values())
        write_parquet_table(outdir / "rejected.parquet", rejected_table(rejected))
        write_rejects_tsv(outdir / "rejected.tsv", rejected)
        if rejects_copy:
            write_rejects_tsv(rejects_copy, rejected)
        if n_in == 0:
            raise DataError("the dataset has no rows")
        if len(rejected) / n_in > ds["max_bad_fraction"]:
            msg = bad_fraction_message(n_in, rejected, ds["max_bad_fraction"])
            where = rejects_copy or outdir / "rejected.tsv"
            raise DataError(f"{msg}\nEvery rejected row with its reason: {where}")
        staged.commit()
        i = 0
        for batch in pq.ParquetFile(staged.path).iter_batches(batch_size=20_000):
            for row in batch.to_pylist():
                row["split"] = groups.split(i)
                sinks[row["split"]].add(row)
                i += 1
        counts_by_split = {s: sinks[s].count for s in SPLITS}
        for s in SPLITS:
            if counts_by_split[s]:
                continue
            if s in require or (s == "test" and ds["split"]["test"] > 0):
                need = (
                    "training needs rows" if s == "train" else f"a later rule reads the {s} split"
                )
                raise DataError(
                    empty_split_message(name, s, counts_by_split, ds["split"], groups.count(), need)
                )
            if ds["split"][s] > 0:
                log.warning("the %s split is empty (split.%s = %s)", s, s, ds["split"][s])
        for sink in sinks.values():
            sink.commit()
    except BaseException:
        for sink in sinks.values():
            if sink.tmp.exists():
                sink.discard()
        if staged.tmp.exists():
            staged.discard()
        raise
    finally:
        staged.path.unlink(missing_ok=True)
    summary = {
        "rows_in": n_in,
        "accepted": n_in - len(rejected),
        "rejected": len(rejected),
        "splits": {s: sinks[s].count for s in SPLITS},
        "split_groups": groups.count(),
        "images_in_accepted_rows": n_images,
        "rejected_by_reason": dict(Counter(r["kind"] for r in rejected).most_common()),
        "sources": {k: dict(v) for k, v in per_source.items()},
    }
    write_json(outdir / "summary.json", summary)
    return summary


def write_parquet_table(path: str | os.PathLike, table: pa.Table) -> None:
    write_parquet(path, table)


def read_images_table(path: str | os.PathLike) -> dict:
    """images.parquet → {image key: record}."""
    return {record_key(r): r for r in pq.read_table(path).to_pylist()}


def read_conversations(path: str | Path) -> list[dict]:
    """Read a conversation Parquet file (checked against CONVERSATION_SCHEMA) as a list of dicts."""
    table = pq.read_table(path)
    missing = [n for n in CONVERSATION_SCHEMA.names if n not in table.column_names]
    if missing:
        raise DataError(f"{path}: not a conversation file (missing columns {missing})")
    return table.select(CONVERSATION_SCHEMA.names).to_pylist()


# ---------------------------------------------------------------------------------------------
# Small helpers kept for callers of the first API (tests, fixtures).


def image_refs(sources: Iterable[Source], on_payload=None) -> list[ImageRef]:
    out: list[ImageRef] = []
    for s in sources:
        out += iter_image_refs(s, on_payload)
    return out


def seed_image_refs(source: Source) -> list[tuple[str, str]]:
    """(image_root, relative path) of every image file a source's usable rows reference."""
    return [(r.root, r.value) for r in iter_image_refs(source) if r.kind == "path"]


def seed_to_conversations(
    source: Source, images: dict, split_cfg: dict
) -> tuple[list[dict], list[dict]]:
    """Convert one source into (accepted rows, rejected rows), keeping everything in memory."""
    accepted, rejected = [], []
    for ok, row in convert_source(source, images, split_cfg):
        (accepted if ok else rejected).append(row)
    return accepted, rejected


def dedupe(accepted: list[dict], rejected: list[dict]) -> list[dict]:
    """Keep the first row of each id; later ones are rejected as duplicates."""
    seen: dict[str, tuple[str, int]] = {}
    out = []
    for row in accepted:
        if row["id"] in seen:
            src, first = seen[row["id"]]
            rejected.append(
                _rejected(
                    row["source"],
                    row["_row"],
                    row["id"],
                    f"duplicate_id: same id as {src} row {first}",
                    row["_raw"],
                )
            )
            continue
        seen[row["id"]] = (row["source"], row["_row"])
        out.append(row)
    return out


def validate_dataset(
    ds: dict,
    cache_dir: str | os.PathLike,
    *,
    name: str = "",
    threads: int = 1,
    progress: bool = True,
) -> list[dict]:
    """Validate every image a dataset config's usable rows reference; images.parquet rows.

    Embedded images are written once into the blob store under `cache_dir`, URLs downloaded
    into it; verdicts are cached in `cache_dir/validation[-name].parquet` (one file per dataset,
    so that datasets may share a cache_dir) so that a re-run decodes only new or changed files.
    """
    cache_dir = Path(cache_dir)
    blobs = BlobStore(cache_dir)
    blob_paths: dict[str, Path] = {}

    def keep(sha: str, data: bytes) -> None:
        if sha not in blob_paths:
            blob_paths[sha] = blobs.put(data, sha)[1]

    refs = image_refs(sources_of(ds), keep)
    return validate_refs(
        refs,
        ImagePolicy.from_config(ds["images"]),
        threads=threads,
        cache_dir=cache_dir,
        cache_file=cache_dir / (f"validation-{name}.parquet" if name else "validation.parquet"),
        blob_paths=blob_paths,
        download=DownloadPolicy.from_config(ds["images"]["download"]),
        progress=progress,
    )
