"""Helpers the Snakefile calls while it builds the job graph (kept light: no torch import)."""

from __future__ import annotations

from .data import Source, seed_image_refs
from .images import PathEscapeError, resolve_in_root


def referenced_images(sources: list[dict]) -> list[str]:
    """Existing image files referenced by the sources, each resolved inside its root.

    Missing files and paths that escape their root are left out here (Snakemake would stop on
    them); validate_images reports them and their rows are quarantined.
    """
    out = []
    for s in sources:
        for root, rel in seed_image_refs(Source(**s)):
            try:
                path = resolve_in_root(root, rel)
            except PathEscapeError:
                continue
            if path.is_file():
                out.append(str(path))
    return sorted(set(out))
