"""Validation of every image a dataset references, written to images.parquet.

`validate_refs` runs `vlmflow.images.inspect_file` over every distinct reference (files under an
image root, embedded bytes written once to the blob store, URLs downloaded once into it), in
parallel threads, with a persistent `ValidationCache` keyed by (file, size, mtime, policy) so that
a re-run decodes only new or changed files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .fetch import DownloadPolicy, fetch_all
from .image_refs import BlobStore, ImageRef
from .images import ImagePolicy, empty_record, inspect_file
from .io import write_parquet
from .paths import PathEscapeError, resolve_in_root, resolve_str
from .redact import redact_text

log = logging.getLogger(__name__)

# Columns of images.parquet (one row per distinct image reference).
IMAGE_COLUMNS = [
    "kind",  # path | url | bytes
    "root",  # image root of a path reference ('' otherwise)
    "path",  # relative path as written in the data, the URL, or the sha256 of embedded bytes
    "resolved",  # the file load_rgb opens ('' when there is none)
    "sha256",
    "bytes",
    "width",  # upright (EXIF orientation applied), as the model sees it
    "height",
    "format",
    "mode",  # Pillow mode as stored (before normalisation)
    "frames",
    "notes",  # normalisation applied by load_rgb, e.g. 'CMYK → RGB; exif_orientation 6 applied'
    "ok",
    "status",  # ok | converted (ok, pixels normalised) | rejected
    "reason",  # '' when ok, else 'kind: details'
]


@dataclass
class ImageRecord:
    path: str
    resolved: str
    sha256: str
    width: int
    height: int
    format: str
    ok: bool
    reason: str
    notes: str = ""
    status: str = "rejected"
    mode: str = ""
    frames: int = 0
    bytes: int = 0


def check_image(root: str, rel: str, policy: ImagePolicy) -> ImageRecord:
    """Validate one image `rel` under `root` (no cache). Never raises for bad input."""
    rec = check_path(root, rel, policy)
    fields = [f.name for f in dataclasses.fields(ImageRecord) if f.name != "path"]
    return ImageRecord(path=rel, **{k: rec[k] for k in fields})


def check_path(root: str, rel: str, policy: ImagePolicy) -> dict:
    """A full images.parquet row for a path reference (no cache)."""
    base = empty_record(kind="path", root=root, path=rel)
    try:
        path = resolve_in_root(root, rel)
    except PathEscapeError as e:
        base["reason"] = f"path_escape: {e}"
        return base
    base["resolved"] = str(path)
    if not path.is_file():
        base["reason"] = (
            f"missing: file not found: {path}"
            if not path.exists()
            else f"missing: not a regular file: {path}"
        )
        return base
    return {**base, **inspect_file(path, policy)}


class ValidationCache:
    """Verdicts of earlier runs, keyed by (resolved file, size, mtime_ns, policy fingerprint).

    Stored as one Parquet file; rewritten atomically at the end of each run with the entries of
    the files referenced in that run (reused rows are copied column-wise, not through Python).
    """

    def __init__(self, path: str | os.PathLike | None, policy: ImagePolicy):
        self.path = Path(path) if path else None
        self.policy_fp = policy.fingerprint()
        self.table: pa.Table | None = None
        self.cols: dict[str, list] = {}
        self.index: dict[str, int] = {}
        self.kept: list[int] = []
        self.fresh: dict[str, dict] = {}
        if self.path and self.path.is_file():
            try:
                table = pq.read_table(self.path)
                if table.schema.equals(_cache_schema()):
                    self.table = table
                    self.cols = table.to_pydict()
                    fp = self.policy_fp
                    self.index = {
                        k: i
                        for i, (k, p) in enumerate(
                            zip(self.cols["resolved_key"], self.cols["policy"])
                        )
                        if p == fp
                    }
            except Exception as e:  # a damaged cache is only a slower run
                log.warning("ignoring unreadable validation cache %s: %s", self.path, e)

    @staticmethod
    def stat_key(path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def get(self, path: str, st: tuple[int, int]) -> dict | None:
        i = self.index.get(path)
        c = self.cols
        if i is None or c["size_key"][i] != st[0] or c["mtime_key"][i] != st[1]:
            return None
        self.kept.append(i)
        del self.index[path]  # a path listed twice is kept once
        return {k: c[k][i] for k in _FILE_FIELDS}

    def put(self, path: str, st: tuple[int, int], rec: dict) -> None:
        self.fresh[path] = {
            "resolved_key": path,
            "size_key": st[0],
            "mtime_key": st[1],
            "policy": self.policy_fp,
            **{k: rec[k] for k in _FILE_FIELDS},
        }

    def save(self) -> None:
        if not self.path:
            return
        table = pa.Table.from_pylist(list(self.fresh.values()), schema=_cache_schema())
        if self.table is not None and self.kept:
            table = pa.concat_tables([self.table.take(self.kept), table])
        write_parquet(self.path, table)


def _cache_schema() -> pa.Schema:
    return pa.schema(
        [
            ("resolved_key", pa.string()),
            ("size_key", pa.int64()),
            ("mtime_key", pa.int64()),
            ("policy", pa.string()),
            *[(k, _field_type(k)) for k in _FILE_FIELDS],
        ]
    )


_FILE_FIELDS = [
    "sha256",
    "bytes",
    "width",
    "height",
    "format",
    "mode",
    "frames",
    "notes",
    "ok",
    "status",
    "reason",
]


_INT_FIELDS = {"bytes", "width", "height", "frames"}


def _field_type(name: str) -> pa.DataType:
    if name == "ok":
        return pa.bool_()
    return pa.int64() if name in _INT_FIELDS else pa.string()


IMAGES_SCHEMA = pa.schema([(k, _field_type(k)) for k in IMAGE_COLUMNS])


def validate_refs(
    refs: Iterable[ImageRef],
    policy: ImagePolicy,
    *,
    threads: int = 1,
    cache_dir: str | os.PathLike | None = None,
    cache_file: str | os.PathLike | None = None,
    blob_paths: dict[str, Path] | None = None,
    download: DownloadPolicy | None = None,
    progress: bool = True,
) -> list[dict]:
    """Validate image references; one images.parquet row (dict) per distinct reference, in order
    of first occurrence.

    Path references are resolved inside their root; URL references are downloaded (once) into the
    blob store under `cache_dir` with the `download` policy (`vlmflow.fetch.DownloadPolicy`);
    bytes references must already be in the blob store (`BlobStore.put`; `blob_paths` maps their
    sha256 to the file it wrote). Files whose (path, size, mtime) and policy match an entry of
    `cache_file` are not read again. Decoding runs on `threads` threads (Pillow, hashlib and file
    reads release the GIL).
    """
    from tqdm import tqdm

    unique = list(dict.fromkeys(refs))
    blobs = BlobStore(cache_dir) if cache_dir else None
    blob_paths = blob_paths or {}
    cache = ValidationCache(cache_file, policy)
    out: list[dict] = []
    todo: list[tuple[int, str, tuple[int, int]]] = []

    fetched = {}
    urls = [r.value for r in unique if r.kind == "url"]
    if urls:
        if blobs is None:
            raise ValueError("URL images need a cache_dir")
        if download is None:
            raise ValueError("URL images need a download policy")
        fetched = fetch_all(urls, blobs, download, threads, progress)

    hits = 0
    for ref in unique:
        rec = empty_record(kind=ref.kind, root=ref.root, path=ref.shown)
        path = None
        if ref.kind == "path":
            try:
                path = resolve_str(ref.root, ref.value)
            except PathEscapeError as e:
                rec["reason"] = f"path_escape: {e}"
        elif ref.kind == "bytes":
            found = blob_paths.get(ref.value) or (blobs.find(ref.value) if blobs else None)
            if found is None:
                rec["reason"] = "missing: embedded image not in the blob store"
            else:
                path = str(found)
        elif ref.kind == "url":
            got = fetched[ref.value]
            if got.error:
                rec["reason"] = redact_text(got.error)
            else:
                path = str(got.path)
        else:
            rec["reason"] = f"bad_image_ref: unknown kind {ref.kind!r}"
        if path is not None:
            rec["resolved"] = path
            try:
                info = os.stat(path)
            except OSError:
                info = None
            if info is None or not stat.S_ISREG(info.st_mode):
                rec["reason"] = (
                    f"missing: file not found: {path}"
                    if info is None
                    else f"missing: not a regular file: {path}"
                )
            else:
                st = (info.st_size, info.st_mtime_ns)
                hit = cache.get(path, st)
                if hit is not None:
                    rec.update(hit)
                    hits += 1
                else:
                    todo.append((len(out), path, st))
        out.append(rec)

    bar = tqdm(total=len(todo), desc="decode images", unit="img", disable=not progress)

    def work(chunk):
        return [(i, path, st, inspect_file(path, policy)) for i, path, st in chunk]

    chunks = [todo[i : i + 8] for i in range(0, len(todo), 8)]
    pool = None
    if threads <= 1 or len(chunks) <= 1:
        results = map(work, chunks)
    else:
        pool = ThreadPoolExecutor(max_workers=threads)
        results = (f.result() for f in as_completed([pool.submit(work, c) for c in chunks]))
    try:
        for res in results:
            for i, path, st, file_rec in res:
                out[i].update(file_rec)
                cache.put(path, st, file_rec)
            bar.update(len(res))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
    cache.save()
    log.info(
        "%d image references: %d decoded, %d verdicts reused from the validation cache",
        len(out),
        len(todo),
        hits,
    )
    return out


def validate_images(
    refs: list[tuple[str, str]], policy: ImagePolicy, threads: int = 1, progress: bool = True
) -> list[dict]:
    """Validate (image_root, relative_path) pairs (no cache); one dict per distinct pair."""
    return validate_refs(
        [ImageRef("path", root, rel) for root, rel in refs],
        policy,
        threads=threads,
        progress=progress,
    )
