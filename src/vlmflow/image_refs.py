"""Image references of samples and the content-addressed blob store (no PIL, no pyarrow: the
readers of every source format import this).

An `ImageRef` says where one image of a sample lives: a path under an image root, an http(s) URL,
or the sha256 of embedded bytes. Embedded images and downloaded URLs are written once into the
`BlobStore`, so that every later step sees a file path.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .io import atomic_file
from .redact import redact_url


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
            with atomic_file(path) as tmp:
                tmp.write_bytes(data)
        return sha, path

    def find(self, sha: str) -> Path | None:
        """The stored file of `sha` (whatever its extension), or None."""
        folder = self.dir / sha[:2]
        for cand in folder.glob(f"{sha}.*") if folder.is_dir() else ():
            return cand
        return None
