"""Helpers the Snakefile calls while it builds the job graph (kept light: no torch import)."""

from __future__ import annotations

import os

from .formats import Source, iter_image_refs
from .images import PathEscapeError, resolve_str


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
    from .formats import DataError

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
