"""Confined paths (a path under a root cannot leave it) and the helpers the Snakefile calls
while it builds the job graph (kept light: no torch, PIL or pyarrow import)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from .errors import DataError
from .layouts import Source, iter_image_refs


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
                f"absolute path '{rel}' is outside the image root '{root_real}'; set the "
                f"source's image_root to a folder that holds the images (e.g. image_root: "
                f"{os.path.dirname(rel)}) or give paths relative to the image root"
            )
        raise PathEscapeError(f"'{rel}' resolves to '{real}', outside the image root '{root_real}'")
    return joined


def referenced_images(sources: list[dict]) -> list[str]:
    """Existing image files referenced by the sources (for every format: what validate_images
    checks), each resolved inside its root. Embedded and URL images are not files of their own: the
    source file (an input already) stands for them.

    Missing files and paths that escape their root are left out here (Snakemake would stop on
    them); validate_images reports them and their rows are quarantined. A source that cannot be
    read is left out too: validate_images reports it with a clear error.

    Cost: one parse of each source plus one lstat and one stat per image, each time Snakemake
    builds its job graph (about 3 s per 100,000 image files on a 2-core VM; Snakemake's own
    handling of that many inputs costs more); `track_image_files: false` turns this off.
    """
    refs = set()
    for s in sources:
        try:
            refs.update(
                (r.root, r.value)
                for r in iter_image_refs(Source(**s, hash_embedded=False))
                if r.kind == "path"
            )
        except (DataError, OSError):
            continue
    out = set()
    for root, rel in refs:
        try:
            path = resolve_str(root, rel)
        except PathEscapeError:
            continue
        if os.path.isfile(path):
            out.add(path)
    return sorted(out)


def cache_dir_of(name: str, ds: dict) -> str:
    """The folder of a dataset's blobs and validation cache."""
    return ds["cache_dir"] or f"results/data/{name}/cache"
