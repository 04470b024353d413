"""Fetching a base model from the Hugging Face Hub into the (shared) HF cache, on the login node.

Compute nodes often have no internet. Rule `fetch_model` (a localrule, only in the DAG when
`model.name` is a hub id) downloads the files `from_pretrained` needs into the HF cache
(`HF_HOME` / `HF_HUB_CACHE`; put it on a shared file system) and writes a small marker JSON the
GPU rules take as input; those jobs then run with HF_HUB_OFFLINE=1 and read the cache.
"""

from __future__ import annotations

import re
from pathlib import Path

# What from_pretrained reads for a transformers VLM (weights in safetensors only: no pickles).
# README.md: the model card, whose license and id the publish step copies into the run's cards.
ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.txt",
    "*.model",
    "*.jinja",
    "*.tiktoken",
    "README.md",
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class HubError(RuntimeError):
    pass


def is_hub_id(name: str) -> bool:
    """`org/name` that is not an existing local folder."""
    return bool(_HUB_ID.match(name)) and not Path(name).exists()


def marker_path(name: str, revision: str | None) -> str:
    rev = re.sub(r"[^A-Za-z0-9._-]", "_", revision) if revision else "default"
    return f"resources/hub/{name}/{rev}.json"


def fetch(name: str, revision: str | None = None, *, trust_remote_code: bool = False) -> dict:
    """Download `name` at `revision` into the HF cache; return what the marker records."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = ALLOW_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        path = Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except GatedRepoError as e:
        raise HubError(
            f"model.name '{name}' is gated: accept its licence on huggingface.co and set HF_TOKEN "
            f"(or run `hf auth login`) on the machine running snakemake ({e.__class__.__name__})"
        ) from e
    except RevisionNotFoundError as e:
        raise HubError(f"model.revision '{revision}' does not exist for '{name}'") from e
    except RepositoryNotFoundError as e:
        raise HubError(
            f"model.name '{name}' is not a model on the Hub (or it is private: set HF_TOKEN)"
        ) from e
    except LocalEntryNotFoundError as e:
        raise HubError(
            f"could not download '{name}' and it is not in the HF cache ({HF_HUB_CACHE}): "
            "run snakemake where the internet is reachable (the login node), or copy the model "
            "there and set model.name to its folder"
        ) from e
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
        raise HubError(
            f"'{name}' has no config.json or no safetensors weights (files: {files[:10]})"
        )
    return {
        "repo_id": name,
        "revision": revision,
        "commit": path.name,
        "snapshot": str(path),
        "hf_hub_cache": str(HF_HUB_CACHE),
        "files": files,
        "bytes": sum((path / f).stat().st_size for f in files),
    }
