"""Fetching a base model from the Hugging Face Hub into the (shared) HF cache, on the login node.

Compute nodes often have no internet. Rule `fetch_model` (a localrule, only in the DAG when
`model.name` is a hub id) downloads the files `from_pretrained` needs into the HF cache
(`HF_HOME` / `HF_HUB_CACHE`; put it on a shared file system) and writes a small marker JSON the
GPU rules take as input; those jobs then run with HF_HUB_OFFLINE=1 and read the cache.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import VlmflowError

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


class HubError(VlmflowError, RuntimeError):
    pass


class ModelSourceError(VlmflowError, ValueError):
    """model.name names a local folder that is missing or cannot be trained from (checked when
    the workflow starts, and by every CLI that loads the model)."""


# Files a VLM's tokenizer and processor are read from (any one of each group suffices).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "tekken.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def model_location(name: str) -> str:
    """'local' or 'hub' for a model.name, without touching the network.

    An existing folder is local. So is anything written as a path: absolute, `./` or `../`,
    `~`, more than one `/`, or `dir/name` whose `dir` is a folder here (a local models folder,
    not a Hub organisation). Only the rest of the `org/name` shape is a Hub id."""
    p = Path(name).expanduser()
    if p.is_dir():
        return "local"
    if name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.endswith("/"):
        return "local"
    if not _HUB_ID.match(name):
        return "local"
    if p.parent.is_dir() and str(p.parent) not in ("", "."):
        return "local"
    return "hub"


def is_hub_id(name: str) -> bool:
    """`org/name` that is not a local folder, nor written as a path (see model_location)."""
    return model_location(name) == "hub"


def check_model_folder(folder: str | Path, what: str = "model.name") -> None:
    """A model folder's cheap checks (a few stats, no loading): config.json, a tokenizer and a
    processor, safetensors weights (pickle-only weights are refused: loading them runs code)."""
    folder = Path(folder)
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if "config.json" not in names:
        raise ModelSourceError(
            f"{what} '{folder}' is not a model folder: it has no config.json (a model saved with "
            "save_pretrained, or downloaded from the Hub, has one)"
        )
    if not any(n.endswith(".safetensors") for n in names):
        pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise ModelSourceError(
                f"{what} '{folder}' has only pickle weights ({', '.join(pickles[:4])}), which "
                "vlmflow does not load (unpickling runs code): convert them to safetensors once, "
                "e.g. load the model with transformers and save_pretrained it (safetensors is "
                "the default)"
            )
        raise ModelSourceError(f"{what} '{folder}' has no weights (*.safetensors)")
    missing = []
    if not names & set(TOKENIZER_FILES):
        missing.append(f"tokenizer (one of {', '.join(TOKENIZER_FILES[:3])}, ...)")
    if not names & set(PROCESSOR_FILES):
        missing.append(f"image processor ({' or '.join(PROCESSOR_FILES)})")
    if missing:
        raise ModelSourceError(
            f"{what} '{folder}' has no {' and no '.join(missing)}: save the processor next to "
            "the model (AutoProcessor.from_pretrained(<original>).save_pretrained(folder))"
        )


def check_model_source(model_cfg: dict, *, built_by_rule: str | None = None) -> str:
    """Where the base model comes from ('local' or 'hub'), checked before any job runs: a local
    name that is not a folder is a missing folder (never sent to the Hub as a repo id), a local
    folder passes check_model_folder. Hub ids are checked by fetch_model. A name starting with
    `built_by_rule` (the tiny test models) is made by a rule: checked once it exists."""
    name = model_cfg["name"]
    where = model_location(name)
    if where == "hub":
        return where
    if built_by_rule and name.startswith(built_by_rule) and not Path(name).exists():
        return where
    path = Path(name).expanduser()
    if not path.is_dir():
        why = "no such folder" if not path.exists() else "not a folder"
        raise ModelSourceError(
            f"model.name '{name}' is a local path ({why}: {path.absolute()}); give the folder "
            "of a model saved with save_pretrained, or a Hugging Face Hub id 'org/name' (a name "
            "written as a path, or whose first part is a folder here, is never looked up on "
            "the Hub)"
        )
    check_model_folder(path)
    return where


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

    if model_location(name) != "hub":
        raise HubError(f"model.name '{name}' is a local path, not a Hub id: nothing to download")
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
    try:
        check_model_folder(path, what=f"the Hub model '{name}', downloaded to")
    except ModelSourceError as e:
        raise HubError(str(e)) from None
    return {
        "repo_id": name,
        "revision": revision,
        "commit": path.name,
        "snapshot": str(path),
        "hf_hub_cache": str(HF_HUB_CACHE),
        "files": files,
        "bytes": sum((path / f).stat().st_size for f in files),
    }
