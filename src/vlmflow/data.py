"""Sources → canonical conversations.

Canonical conversation schema (one Parquet row per sample; see docs/conversation_schema.md):

    id        string   stable id: the source's id column, else a hash of source + image + text
    source    string   source name
    messages  list<struct<role: string, content: list<struct<type: string, text: string,
                                                             image: string>>>>
              roles: system | user | assistant; part type: text | image. An image part's
              `image` is the index (as a string) into `images`; `text` is '' for image parts.
    images    list<string>  image paths as opened (image root joined with the relative path)
    split     string   train | val | test, from hash(split.seed, id)

Rows that cannot be used are never dropped silently: they go to the rejected table with a
reason, and `rows in == accepted + rejected`.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

PART = pa.struct([("type", pa.string()), ("text", pa.string()), ("image", pa.string())])
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.list_(PART))])
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
        ("reason", pa.string()),
        ("raw", pa.string()),
    ]
)
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Input that cannot be read at all (names the file, line or column)."""


@dataclass
class Source:
    path: str
    image_root: str
    name: str | None = None
    format: str = "seed"
    columns: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """Read a JSON, JSONL, CSV or Parquet file into (row number, record) pairs.

    Row numbers are 1-based line numbers for JSONL/CSV (header = line 1 for CSV) and 1-based
    positions otherwise. Malformed JSON lines raise DataError naming file and line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    if suffix in (".jsonl", ".ndjson"):
        out = []
        with open(path, encoding="utf-8", errors="strict") as f:
            try:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
                    if not isinstance(rec, dict):
                        raise DataError(f"{path}:{lineno}: expected a JSON object per line")
                    out.append((lineno, rec))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: invalid UTF-8 ({e})") from None
        return out
    if suffix == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        return list(enumerate(data, start=1))
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            return [(i, dict(r)) for i, r in enumerate(csv.DictReader(f), start=2)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    raise DataError(
        f"{path}: unsupported file type '{suffix}' (use .jsonl, .json, .csv or .parquet)"
    )


def stable_id(source: str, image: str, instruction: str) -> str:
    h = hashlib.sha256(json.dumps([source, image, instruction]).encode()).hexdigest()
    return h[:16]


def assign_split(row_id: str, val: float, test: float, seed: int) -> str:
    """Deterministic split from a hash of (seed, id): adding rows never moves existing ones."""
    h = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    if u < test:
        return "test"
    if u < test + val:
        return "val"
    return "train"


def seed_image_refs(source: Source) -> list[tuple[str, str]]:
    """(image_root, relative path) of every image a seed-format source references."""
    col = source.columns.get("image", "image")
    refs = []
    for lineno, rec in read_records(source.path):
        if col not in rec:
            raise DataError(f"{source.path}:{lineno}: missing required column '{col}'")
        if rec[col] not in (None, ""):
            refs.append((source.image_root, str(rec[col])))
    return refs


def seed_to_conversations(
    source: Source, images: dict[tuple[str, str], dict], split_cfg: dict
) -> tuple[list[dict], list[dict]]:
    """Convert one seed-format source. Returns (accepted rows, rejected rows).

    `images` maps (root, relative path) → an image record from `images.validate_images`.
    """
    cols = {"id": None, "image": "image", "instruction": "instruction", "response": "response"}
    cols.update(source.columns)
    records = read_records(source.path)
    required = [cols["image"], cols["instruction"], cols["response"]]
    if records:
        keys = set().union(*(r.keys() for _, r in records))
        missing = [c for c in required if c not in keys]
        if missing:
            raise DataError(
                f"{source.path}: missing required column(s) {', '.join(repr(c) for c in missing)}"
            )
    accepted, rejected = [], []
    for row, rec in records:
        image = "" if rec.get(cols["image"]) is None else str(rec[cols["image"]])
        instruction = "" if rec.get(cols["instruction"]) is None else str(rec[cols["instruction"]])
        response = "" if rec.get(cols["response"]) is None else str(rec[cols["response"]])
        if cols["id"] and rec.get(cols["id"]) not in (None, ""):
            row_id = str(rec[cols["id"]])
        else:
            row_id = stable_id(source.label, image, instruction)

        def reject(reason, row=row, row_id=row_id, rec=rec):
            rejected.append(
                dict(
                    source=source.label,
                    row=row,
                    id=row_id,
                    reason=reason,
                    raw=json.dumps(rec, default=str, ensure_ascii=False),
                )
            )

        if not response.strip():
            reject("empty_response: the response is empty")
            continue
        if not instruction.strip() and not image:
            reject("empty_prompt: neither an instruction nor an image")
            continue
        parts = []
        image_paths = []
        if image:
            info = images.get((source.image_root, image))
            if info is None:
                reject(f"bad_image: '{image}' was not validated (re-run validate_images)")
                continue
            if not info["ok"]:
                reject(f"bad_image: '{image}': {info['reason']}")
                continue
            image_paths.append(info["resolved"])
            parts.append({"type": "image", "text": "", "image": "0"})
        if instruction:
            parts.append({"type": "text", "text": instruction, "image": None})
        messages = [
            {"role": "user", "content": parts},
            {"role": "assistant", "content": [{"type": "text", "text": response, "image": None}]},
        ]
        accepted.append(
            dict(
                id=row_id,
                source=source.label,
                messages=messages,
                images=image_paths,
                split=assign_split(row_id, split_cfg["val"], split_cfg["test"], split_cfg["seed"]),
                _row=row,
                _raw=rec,
            )
        )
    return accepted, rejected


def dedupe(accepted: list[dict], rejected: list[dict]) -> list[dict]:
    """Keep the first row of each id; later ones are rejected as duplicates."""
    seen: dict[str, tuple[str, int]] = {}
    out = []
    for row in accepted:
        if row["id"] in seen:
            src, first = seen[row["id"]]
            rejected.append(
                dict(
                    source=row["source"],
                    row=row["_row"],
                    id=row["id"],
                    reason=f"duplicate_id: same id as {src} row {first}",
                    raw=json.dumps(row["_raw"], default=str, ensure_ascii=False),
                )
            )
            continue
        seen[row["id"]] = (row["source"], row["_row"])
        out.append(row)
    return out


def check_bad_fraction(n_in: int, rejected: list[dict], max_bad_fraction: float) -> None:
    if n_in == 0:
        raise DataError("the dataset has no rows")
    frac = len(rejected) / n_in
    if frac > max_bad_fraction:
        counts = Counter(r["reason"].split(":", 1)[0] for r in rejected)
        detail = ", ".join(f"{k}: {v}" for k, v in counts.most_common())
        raise DataError(
            f"{len(rejected)} of {n_in} rows rejected ({frac:.1%} > max_bad_fraction "
            f"{max_bad_fraction:.1%}); by reason: {detail}. See rejected.parquet."
        )


def to_table(rows: list[dict]) -> pa.Table:
    clean = [{k: r[k] for k in CONVERSATION_SCHEMA.names} for r in rows]
    return pa.Table.from_pylist(clean, schema=CONVERSATION_SCHEMA)


def rejected_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=REJECTED_SCHEMA)


def read_conversations(path: str | Path) -> list[dict]:
    """Read a conversation Parquet file (checked against CONVERSATION_SCHEMA) as a list of dicts."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [n for n in CONVERSATION_SCHEMA.names if n not in table.column_names]
    if missing:
        raise DataError(f"{path}: not a conversation file (missing columns {missing})")
    return table.select(CONVERSATION_SCHEMA.names).to_pylist()
