"""Data files → rows: the file type of a source, detected from its path.

`.jsonl`/`.ndjson` (one object per line), `.json` (a list of objects), `.csv`/`.tsv` (header
row), `.parquet`, `.arrow`, or a folder written by `datasets.Dataset.save_to_disk` /
`DatasetDict.save_to_disk` (its Arrow files are read directly; image features come as
`{bytes, path}` structs; the files its index lists cannot leave the folder).

A row that cannot be read (bad JSON line, invalid UTF-8) comes back as a `RowError`; a file that
cannot be read at all raises `DataError` naming the file. What a row means is
`vlmflow.layouts`.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError


@dataclass
class RowError:
    row: int
    reason: str
    raw: object


class Reader:
    """Rows of one data file as (row number, record | RowError). `columns` is the header or
    schema when the file type has one (CSV, Parquet, Arrow), else None."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        p = self.path
        if p.is_dir():
            self.kind = "hf_disk"
            self.files = _hf_disk_files(p)
        elif not p.is_file():
            raise DataError(f"{p}: data file not found")
        else:
            suffix = p.suffix.lower()
            kinds = {
                ".jsonl": "jsonl",
                ".ndjson": "jsonl",
                ".json": "json",
                ".csv": "csv",
                ".tsv": "csv",
                ".parquet": "parquet",
                ".arrow": "arrow",
            }
            if suffix not in kinds:
                raise DataError(
                    f"{p}: unsupported file type '{suffix}' (use .jsonl, .json, .csv, .tsv, "
                    ".parquet, or a datasets.save_to_disk folder)"
                )
            self.kind = kinds[suffix]
            self.files = [p]
        self.columns: list[str] | None = None
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            try:
                self.columns = pq.ParquetFile(p).schema_arrow.names
            except Exception as e:
                raise DataError(f"{p}: not a readable Parquet file ({e})") from None
        elif self.kind in ("hf_disk", "arrow"):
            self.columns = _arrow_schema(self.files[0]).names if self.files else []
        elif self.kind == "csv":
            self.columns = self._csv_header()

    def rows(self) -> Iterator[tuple[int, dict | RowError]]:
        return getattr(self, f"_rows_{'arrow' if self.kind == 'hf_disk' else self.kind}")()

    def _rows_jsonl(self):
        path = self.path
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield (
                        lineno,
                        RowError(
                            lineno,
                            f"invalid_utf8: {path}:{lineno}: byte 0x{raw[e.start]:02x} at column "
                            f"{e.start + 1} is not valid UTF-8",
                            raw[:2000].decode("utf-8", "replace"),
                        ),
                    )
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield (
                        lineno,
                        RowError(
                            lineno,
                            f"malformed_row: {path}:{lineno}:{e.colno}: {e.msg}",
                            line[:2000],
                        ),
                    )
                    continue
                if not isinstance(rec, dict):
                    yield (
                        lineno,
                        RowError(
                            lineno,
                            f"malformed_row: {path}:{lineno}: expected a JSON object, got "
                            f"{type(rec).__name__}",
                            line[:2000],
                        ),
                    )
                    continue
                yield lineno, rec

    def _rows_json(self):
        path = self.path
        data = path.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise DataError(
                f"{path}:{line}: byte 0x{data[e.start]:02x} is not valid UTF-8 (a .json file is "
                "read as a whole; use JSONL to quarantine single bad rows)"
            ) from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None
        if not isinstance(obj, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(obj).__name__}")
        for i, rec in enumerate(obj, start=1):
            if isinstance(rec, dict):
                yield i, rec
            else:
                yield (
                    i,
                    RowError(
                        i,
                        f"malformed_row: {path}: item {i} is a {type(rec).__name__}, not an object",
                        rec,
                    ),
                )

    def _csv_header(self) -> list[str]:
        delim = "\t" if self.path.suffix.lower() == ".tsv" else ","
        with open(self.path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            try:
                return next(csv.reader(f, delimiter=delim))
            except StopIteration:
                return []
            except csv.Error as e:
                raise DataError(f"{self.path}:1: malformed CSV header ({e})") from None

    def _rows_csv(self):
        path = self.path
        delim = "\t" if path.suffix.lower() == ".tsv" else ","
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            reader = csv.reader(f, delimiter=delim)
            try:
                header = next(reader)
            except StopIteration:
                return
            start = reader.line_num + 1
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    raise DataError(f"{path}:{start}: malformed CSV ({e})") from None
                row, start = start, reader.line_num + 1
                if not cells:
                    continue
                raw = dict(zip(header, cells))
                if len(cells) != len(header):
                    yield (
                        row,
                        RowError(
                            row,
                            f"malformed_row: {path}:{row}: {len(cells)} fields, header has "
                            f"{len(header)}",
                            delim.join(cells),
                        ),
                    )
                    continue
                bad = next((k for k, v in raw.items() if has_surrogates(v)), None)
                if bad is not None:
                    yield (
                        row,
                        RowError(
                            row,
                            f"invalid_utf8: {path}:{row}: column '{bad}' holds bytes that are not "
                            "valid UTF-8",
                            {
                                k: v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                                for k, v in raw.items()
                            },
                        ),
                    )
                    continue
                yield row, raw

    def _rows_parquet(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.path)
        yield from _batches_to_rows(
            self.path, (pa.Table.from_batches([b]) for b in pf.iter_batches(batch_size=256))
        )

    def _rows_arrow(self):
        import pyarrow as pa

        def tables():
            for f in self.files:
                with pa.memory_map(str(f)) as mm:
                    reader = _open_arrow(mm, f)
                    for batch in reader:
                        yield pa.Table.from_batches([batch])

        yield from _batches_to_rows(self.path, tables())


def has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _batches_to_rows(path, tables):
    i = 0
    for table in tables:
        try:
            recs = table.to_pylist()
        except UnicodeDecodeError:
            recs = []
            for j in range(table.num_rows):
                try:
                    recs.append(table.slice(j, 1).to_pylist()[0])
                except UnicodeDecodeError as e:
                    recs.append(
                        RowError(i + j + 1, f"invalid_utf8: {path}: row {i + j + 1}: {e}", None)
                    )
        for rec in recs:
            i += 1
            if isinstance(rec, RowError):
                yield i, rec
            else:
                yield i, rec


def _open_arrow(mm, f):
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(mm)
    except pa.ArrowInvalid:
        mm.seek(0)
        try:
            return pa.ipc.open_file(mm)
        except pa.ArrowInvalid as e:
            raise DataError(f"{f}: not an Arrow file ({e})") from None


def _arrow_schema(f):
    import pyarrow as pa

    with pa.memory_map(str(f)) as mm:
        return _open_arrow(mm, f).schema


def _hf_disk_files(folder: Path) -> list[Path]:
    """Arrow files of a `save_to_disk` folder (a Dataset, or every split of a DatasetDict)."""
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{folder}/dataset_dict.json: unreadable ({e})") from None
        return [
            f
            for s in splits
            for f in _hf_disk_files(_inside(folder, s, folder / "dataset_dict.json"))
        ]
    state = folder / "state.json"
    if not state.is_file():
        raise DataError(
            f"{folder}: a folder source must be written by datasets' save_to_disk "
            "(state.json or dataset_dict.json not found)"
        )
    try:
        names = [d["filename"] for d in json.loads(state.read_text())["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{state}: unreadable ({e})") from None
    files = [_inside(folder, n, state) for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{folder}: data files listed in state.json are missing: {missing}")
    return files


def _inside(folder: Path, name, listed_in: Path) -> Path:
    """`folder / name` for a file or split a save_to_disk index lists, refused when it is not a
    relative path inside `folder` (symbolic links resolved)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise DataError(f"{listed_in}: entry {name!r} is not a relative path inside {folder}")
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise DataError(f"{listed_in}: entry {name!r} points outside {folder}; refused")
    return path
