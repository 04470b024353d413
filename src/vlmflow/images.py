"""Images: the one place that opens an image for the model (`load_rgb`), and the validation that
guarantees `load_rgb` will work on every image a dataset keeps.

Validation of one file (`inspect_file`): non-empty; identified by Pillow; format allowed; pixel
count checked from the header *before* decoding (decompression bombs); shorter side >= min_side;
animated → first frame or rejected (policy); decoded in full (`load()`, so truncated files fail);
then normalised exactly as `load_rgb` normalises it (first frame, EXIF orientation, CMYK /
palette / 16-bit / alpha → RGB with alpha composited on white). Width and height are recorded as
the model sees them (upright).

`validate_refs` runs this over every image a dataset references (files under an image root,
embedded bytes written once to a content-addressed blob store, URLs downloaded once into it), in
parallel threads, with a persistent cache keyed by (file, size, mtime, policy) so that a re-run
decodes only new or changed files.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import stat
import warnings
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import pyarrow as pa

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

ORIENTATION = ExifTags.Base.Orientation
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


@dataclass(frozen=True)
class ImagePolicy:
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
    max_pixels: int = 89_478_485
    min_side: int = 1
    animated: str = "first_frame"  # or "reject"
    fast_jpeg: bool = True
    """Decode JPEGs with libjpeg's DCT scaling (1/8 size): every entropy-coded coefficient is
    still read, so truncated or corrupt data fail exactly as in a full-size decode, at about half
    the CPU. load_rgb always decodes at full size."""

    @classmethod
    def from_config(cls, images_cfg: dict) -> ImagePolicy:
        aliases = {"JPG": "JPEG", "TIF": "TIFF"}
        formats = [aliases.get(f.upper(), f.upper()) for f in images_cfg["allowed_formats"]]
        return cls(
            allowed_formats=tuple(dict.fromkeys(formats)),
            max_pixels=images_cfg["max_pixels"],
            min_side=images_cfg["min_side"],
            animated=images_cfg["animated"],
            fast_jpeg=images_cfg["fast_jpeg"],
        )

    def fingerprint(self) -> str:
        """Changes whenever a cached verdict could change (policy or normalisation code)."""
        blob = json.dumps([asdict(self), _CHECK_VERSION], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Bump when inspect_file/to_rgb change in a way that changes verdicts or recorded fields.
_CHECK_VERSION = 4


class PathEscapeError(ValueError):
    pass


@functools.lru_cache(maxsize=1 << 16)
def _real_dir(path: str) -> str:
    return os.path.realpath(path)


def resolve_in_root(root: str | os.PathLike, rel: str) -> Path:
    """Join `rel` to `root` and refuse anything that resolves outside `root`.

    Refused: `..` components, absolute paths outside the root, and symlinks (of the file or of
    any folder on the way) whose target leaves the root. An absolute path inside the root is
    accepted (datasets written by other tools often store those). Folders are resolved once
    (cached), files with one lstat: millions of paths cost seconds.
    """
    return Path(resolve_str(os.fspath(root), rel))


def resolve_str(root: str, rel: str) -> str:
    """`resolve_in_root` returning a string (no Path objects: this runs once per image)."""
    if not rel:
        raise PathEscapeError("empty path")
    if "\0" in rel:
        raise PathEscapeError("path contains a NUL byte")
    if ".." in rel.split(os.sep):
        raise PathEscapeError(f"'{rel}' contains '..'")
    joined = rel if os.path.isabs(rel) else os.path.join(root, rel)
    root_real = _real_dir(root)
    head, tail = os.path.split(joined)
    real = os.path.join(_real_dir(head), tail) if tail else _real_dir(head)
    if tail and os.path.islink(real):
        real = os.path.realpath(real)
    if real != root_real and not real.startswith(root_real.rstrip(os.sep) + os.sep):
        if os.path.isabs(rel):
            raise PathEscapeError(
                f"absolute path '{rel}' is outside the image root '{root_real}'; give paths "
                "relative to the image root"
            )
        raise PathEscapeError(f"'{rel}' resolves to '{real}', outside the image root '{root_real}'")
    return joined


# ---------------------------------------------------------------------------------------------
# Normalisation: shared by validation and load_rgb, so that what was validated is what trains.


def to_rgb(im: Image.Image) -> tuple[Image.Image, list[str]]:
    """Normalise an opened image to what the model sees: first frame, EXIF orientation applied,
    8-bit RGB (16-bit scaled, CMYK/palette/grey converted, alpha composited on white).

    Returns (image, notes); notes name each change that alters pixels or geometry. `im` itself is
    returned (not copied) when it is already upright 8-bit RGB.
    """
    notes = []
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        im.seek(0)
        notes.append(f"animated ({frames} frames): first frame used")
    orientation = im.getexif().get(ORIENTATION, 1)
    if orientation in range(2, 9):
        im = ImageOps.exif_transpose(im)
        notes.append(f"exif_orientation {orientation} applied")
    mode = im.mode
    if mode == "RGB":
        return im, notes
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        im = _high_depth_to_l(im)
        notes.append(f"{mode} → 8-bit")
        return im.convert("RGB"), notes
    has_alpha = mode in _ALPHA_MODES or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append(f"{mode} alpha composited on white")
        return Image.alpha_composite(white, rgba).convert("RGB"), notes
    if mode == "CMYK":
        notes.append("CMYK → RGB")
    elif mode not in ("L", "P", "1"):
        notes.append(f"{mode} → RGB")
    return im.convert("RGB"), notes


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit grey → 8-bit grey by scaling (Pillow's own convert clips at 255, which
    turns a mid-grey 16-bit image white)."""
    import numpy as np

    arr = np.asarray(im).astype(np.float64)
    if im.mode in _SIXTEEN_BIT:
        top = 65535.0
    else:
        hi = float(arr.max()) if arr.size else 0.0
        top = 255.0 if hi <= 255 else 65535.0 if hi <= 65535 else hi
    out = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image for the model: first frame, EXIF orientation applied, 8-bit RGB with alpha
    composited on white. The collator opens every training image through this function."""
    im = Image.open(path)
    rgb, _ = to_rgb(im)
    rgb.load()
    if rgb is im and getattr(im, "n_frames", 1) > 1:
        rgb = im.copy()
    if rgb is not im:
        im.close()
    return rgb


# ---------------------------------------------------------------------------------------------
# One file.


def _empty_record(**kw) -> dict:
    rec = dict(
        kind="path",
        root="",
        path="",
        resolved="",
        sha256="",
        bytes=0,
        width=0,
        height=0,
        format="",
        mode="",
        frames=0,
        notes="",
        ok=False,
        status="rejected",
        reason="",
    )
    rec.update(kw)
    return rec


def _sniff(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<svg")):
        return " (the file holds HTML/XML text)"
    try:
        data[:256].decode("utf-8")
        return " (the file looks like text)"
    except UnicodeDecodeError:
        return ""


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_crc_problem(data: bytes) -> str:
    """'corrupt: ...' when a chunk of a PNG file has a CRC that does not match its bytes (bit rot,
    a bad copy), else ''. Pillow does not check the CRC of image data chunks, and a flipped byte
    there may still decode, to wrong pixels. One pass of zlib.crc32 over the bytes already read
    (no copy, no decoding); the decoder still judges truncation and the chunk contents."""
    if not data.startswith(_PNG_SIGNATURE):
        return ""
    view = memoryview(data)
    pos, end = len(_PNG_SIGNATURE), len(data)
    while pos + 12 <= end:
        length = int.from_bytes(view[pos : pos + 4], "big")
        stop = pos + 8 + length
        if stop + 4 > end:
            return ""  # truncated: left to the decoder, which names it
        stored = int.from_bytes(view[stop : stop + 4], "big")
        computed = zlib.crc32(view[pos + 4 : stop])
        if stored != computed:
            name = bytes(view[pos + 4 : pos + 8]).decode("latin-1")
            return (
                f"corrupt: PNG chunk {name!r} at byte {pos} fails its CRC check (stored "
                f"0x{stored:08x}, computed 0x{computed:08x}): the file is damaged"
            )
        if view[pos + 4 : pos + 8] == b"IEND":
            break
        pos = stop + 4
    return ""


def inspect_bytes(data: bytes, policy: ImagePolicy, path: str | os.PathLike | None = None) -> dict:
    """Validate one image's bytes. Never raises for bad input: problems come back as `reason`.

    Returns the file-level fields of an images.parquet row (sha256, bytes, width, height, format,
    mode, frames, notes, ok, status, reason). When `path` (holding `data`) is given, Pillow
    decodes from the file: its file-based decoding releases the GIL, decoding from memory much
    less, so threads scale only this way.
    """
    rec = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "width": 0,
        "height": 0,
        "format": "",
        "mode": "",
        "frames": 0,
        "notes": "",
        "ok": False,
        "status": "rejected",
        "reason": "",
    }
    if not data:
        rec["reason"] = "empty_file: zero bytes"
        return rec
    problem = png_crc_problem(data)
    if problem:
        rec["format"] = "PNG"
        rec["reason"] = problem
        return rec
    im = None
    try:
        with warnings.catch_warnings():
            # Our own pixel limit is checked below, from the header, before decoding.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path if path is not None else io.BytesIO(data))
            rec["format"] = im.format or ""
            rec["mode"] = im.mode
            rec["frames"] = getattr(im, "n_frames", 1)
            w, h = im.size
            rec["width"], rec["height"] = w, h
            problem = _policy_problem(rec, w, h, policy)
            if problem:
                rec["reason"] = problem
                return rec
            ImageFile.LOAD_TRUNCATED_IMAGES = False  # some libraries switch it on globally
            if policy.fast_jpeg and rec["format"] == "JPEG":
                im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
            im.load()  # decodes all data: catches truncated files that verify() lets through
            rgb, notes = to_rgb(im)
            rgb.load()
            if im.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8):  # quarter turns swap the sides
                w, h = h, w
            rec["width"], rec["height"] = w, h
    except Image.DecompressionBombError as e:
        rec["reason"] = f"too_many_pixels: {e}"
        return rec
    except UnidentifiedImageError:
        rec["reason"] = f"not_an_image: Pillow cannot identify the data{_sniff(data)}"
        return rec
    except Exception as e:  # Pillow raises many types for corrupt data
        rec["reason"] = f"decode_error: {type(e).__name__}: {e}"
        return rec
    finally:
        if im is not None:
            im.close()
    rec["notes"] = "; ".join(notes)
    rec["ok"] = True
    rec["status"] = "converted" if notes else "ok"
    return rec


def _policy_problem(rec: dict, w: int, h: int, policy: ImagePolicy) -> str:
    """The checks made from the header alone, before any decoding."""
    if rec["format"] not in policy.allowed_formats:
        allowed = ", ".join(policy.allowed_formats)
        return f"format_not_allowed: {rec['format'] or 'unknown'} (allowed: {allowed})"
    if w * h > policy.max_pixels:
        return f"too_many_pixels: {w}x{h} > max_pixels {policy.max_pixels}"
    if min(w, h) < policy.min_side:
        return f"too_small: shorter side {min(w, h)} < min_side {policy.min_side}"
    if rec["frames"] > 1 and policy.animated == "reject":
        return f"animated: {rec['frames']} frames (images.animated: reject)"
    return ""


def inspect_file(path: str | os.PathLike, policy: ImagePolicy) -> dict:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        return {**_empty_record(), "reason": f"unreadable: {e.strerror or e}"}
    return inspect_bytes(data, policy, path)


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
    return ImageRecord(
        path=rel,
        resolved=rec["resolved"],
        sha256=rec["sha256"],
        width=rec["width"],
        height=rec["height"],
        format=rec["format"],
        ok=rec["ok"],
        reason=rec["reason"],
        notes=rec["notes"],
        status=rec["status"],
        mode=rec["mode"],
        frames=rec["frames"],
        bytes=rec["bytes"],
    )


def check_path(root: str, rel: str, policy: ImagePolicy) -> dict:
    """A full images.parquet row for a path reference (no cache)."""
    base = _empty_record(kind="path", root=root, path=rel)
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


# ---------------------------------------------------------------------------------------------
# Many references: blob store, URL cache, incremental validation cache, threads.


@dataclass(frozen=True)
class ImageRef:
    """One image reference of a sample. `kind` path: `value` is relative to `root`; url: `value`
    is the http(s) URL; bytes: `value` is the sha256 of the embedded bytes (stored in the blob
    store by `BlobStore.put`)."""

    kind: str
    root: str
    value: str

    @property
    def key(self) -> tuple[str, str, str]:
        """(kind, root, value) as written to images.parquet: a URL without its credentials."""
        return (self.kind, self.root, self.shown)

    @property
    def shown(self) -> str:
        """`value` as it may be written out (Parquet, logs): URL userinfo and tokens removed."""
        if self.kind == "url":
            from .redact import redact_url

            return redact_url(self.value)
        return self.value

    def describe(self) -> str:
        if self.kind == "bytes":
            return f"embedded image sha256:{self.value[:12]}"
        return f"'{self.shown}'"


def record_key(rec: dict) -> tuple[str, str, str]:
    return (rec["kind"], rec["root"], rec["path"])


_MAGIC = [
    (b"\x89PNG", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"GIF8", ".gif"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
]


def guess_ext(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    return ".bin"


class BlobStore:
    """Content-addressed files: `<dir>/blobs/<sha[:2]>/<sha><ext>`, each written once, atomically.
    Embedded images and downloaded URLs land here, so that downstream steps see file paths."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.dir = Path(cache_dir) / "blobs"

    def path_for(self, sha: str, ext: str) -> Path:
        return self.dir / sha[:2] / f"{sha}{ext}"

    def put(self, data: bytes, sha: str | None = None) -> tuple[str, Path]:
        sha = sha or hashlib.sha256(data).hexdigest()
        path = self.path_for(sha, guess_ext(data))
        if not (path.is_file() and path.stat().st_size == len(data)):
            from .io import atomic_file

            with atomic_file(path) as tmp:
                tmp.write_bytes(data)
        return sha, path


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
            import pyarrow.parquet as pq

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
        import pyarrow as pa

        from .io import write_parquet

        table = pa.Table.from_pylist(list(self.fresh.values()), schema=_cache_schema())
        if self.table is not None and self.kept:
            table = pa.concat_tables([self.table.take(self.kept), table])
        write_parquet(self.path, table)


def _cache_schema() -> pa.Schema:
    import pyarrow as pa

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
    import pyarrow as pa

    if name == "ok":
        return pa.bool_()
    return pa.int64() if name in _INT_FIELDS else pa.string()


def __getattr__(name: str):
    # IMAGES_SCHEMA is built on first use: pyarrow is imported only by the modules that write
    # tables, so the training step (which decodes images through load_rgb) does not need it
    if name == "IMAGES_SCHEMA":
        import pyarrow as pa

        return pa.schema([(k, _field_type(k)) for k in IMAGE_COLUMNS])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def validate_refs(
    refs: Iterable[ImageRef],
    policy: ImagePolicy,
    *,
    threads: int = 1,
    cache_dir: str | os.PathLike | None = None,
    cache_file: str | os.PathLike | None = None,
    blob_paths: dict[str, Path] | None = None,
    download=None,
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
        from .fetch import DownloadPolicy, fetch_all

        if blobs is None:
            raise ValueError("URL images need a cache_dir")
        fetched = fetch_all(urls, blobs, download or DownloadPolicy(), threads, progress)

    hits = 0
    for ref in unique:
        rec = _empty_record(kind=ref.kind, root=ref.root, path=ref.shown)
        path = None
        if ref.kind == "path":
            try:
                path = resolve_str(ref.root, ref.value)
            except PathEscapeError as e:
                rec["reason"] = f"path_escape: {e}"
        elif ref.kind == "bytes":
            found = blob_paths.get(ref.value) or (_find_blob(blobs, ref.value) if blobs else None)
            if found is None:
                rec["reason"] = "missing: embedded image not in the blob store"
            else:
                path = str(found)
        elif ref.kind == "url":
            got = fetched[ref.value]
            if got.error:
                from .redact import redact_text

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


def _find_blob(blobs: BlobStore, sha: str) -> Path | None:
    folder = blobs.dir / sha[:2]
    for cand in folder.glob(f"{sha}.*") if folder.is_dir() else ():
        return cand
    return None


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
