"""Reproducibility archive of a run: everything needed to re-run it and check the re-run, but not
the base weights (their id and revision/hash instead).

The archive is deterministic where its contents are: members sorted by name, fixed mtimes,
owner 0/0, mode 0644, gzip without a timestamp. Two runs on the same config and data give the
same `data/manifest.json` (sha256 of every image, source file and Parquet file, paths relative to
the workflow folder); logs and timings naturally differ.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import platform
import subprocess
import sys
import tarfile
from collections.abc import Iterable
from pathlib import Path

from .io import atomic_file
from .redact import find_secrets, redact_text, redact_url

log = logging.getLogger(__name__)

MANIFEST = "data/manifest.json"
CHECKSUMS = "SHA256SUMS"
# 1980-01-01, the earliest time zip and most tools take; overridden by SOURCE_DATE_EPOCH.
DEFAULT_MTIME = 315532800
DATA_SPLITS = ("train", "val", "test", "rejected")


# ------------------------------------------------------------------------------------- hashing
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def data_manifest(
    images_parquet: str | os.PathLike,
    data_files: Iterable[str | os.PathLike],
) -> dict:
    """sha256 + size of every image (from the validation table, which hashed the exact bytes the
    run used), every source file and every Parquet file. Paths as the workflow saw them
    (relative to its folder unless the config gave absolute ones); sorted."""
    import pandas as pd

    entries: dict[str, dict] = {}
    images = pd.read_parquet(images_parquet)
    for r in images.to_dict("records"):
        if r["sha256"] and r["resolved"]:
            p = Path(r["resolved"])
            entries[str(p)] = {
                "path": str(p),
                "kind": "image",
                "sha256": r["sha256"],
                "bytes": p.stat().st_size,
            }
    for f in [images_parquet, *data_files]:
        p = Path(f)
        entries[str(p)] = {
            "path": str(p),
            "kind": "parquet" if p.suffix == ".parquet" else "source",
            "sha256": sha256_file(p),
            "bytes": p.stat().st_size,
        }
    files = [entries[k] for k in sorted(entries)]
    return {
        "format": "vlmflow-data-manifest/1",
        "files": files,
        "totals": {
            kind: sum(1 for e in files if e["kind"] == kind)
            for kind in ("image", "source", "parquet")
        },
    }


# --------------------------------------------------------------------------------- environment
def _run(cmd: list[str], cwd: str | os.PathLike | None = None) -> str | None:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def pip_freeze() -> str:
    """`pip freeze --all` of this interpreter (else the installed distributions)."""
    out = _run([sys.executable, "-m", "pip", "freeze", "--all", "--disable-pip-version-check"])
    if out is not None:
        return out
    from importlib.metadata import distributions

    return "".join(
        sorted(f"{d.metadata['Name']}=={d.version}\n" for d in distributions() if d.metadata)
    )


def platform_info() -> dict:
    """Hardware and software of the machine writing the archive (training may have run on
    another node: the adapter's train_summary.json records its device)."""
    import psutil

    info = {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_available"] = torch.cuda.is_available()
        info["cuda_version"] = torch.version.cuda
        info["cudnn"] = (
            torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        )
        info["gpus"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
            }
            for i in range(torch.cuda.device_count())
        ]
    except ImportError:
        info["torch"] = None
    smi = _run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    )
    info["nvidia_smi"] = smi.strip().splitlines() if smi else None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def git_info(repo: str | os.PathLike) -> tuple[dict, str]:
    """(commit, branch, dirty, status, remote) and the diff of uncommitted changes (tracked files,
    staged or not; untracked files are listed in `status`)."""
    commit = _run(["git", "rev-parse", "HEAD"], cwd=repo)
    if commit is None:
        return {"commit": None, "note": f"{repo} is not a git checkout"}, ""
    status = _run(["git", "status", "--porcelain"], cwd=repo) or ""
    diff = _run(["git", "diff", "HEAD", "--binary"], cwd=repo) or ""
    remote = (_run(["git", "config", "--get", "remote.origin.url"], cwd=repo) or "").strip()
    return {
        "commit": commit.strip(),
        "branch": (_run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=repo) or "").strip(),
        "remote": redact_url(remote) or None,  # no https://user:TOKEN@ in the archive
        "dirty": bool(status.strip()),
        "status": status.splitlines(),
    }, diff


def base_model_info(model_cfg: dict) -> dict:
    """The base model's id and revision, with the resolved commit (hub cache) or the sha256 of
    every file (local folder). The weights themselves are not archived."""
    name = model_cfg["name"]
    info = {"name": name, "revision": model_cfg["revision"]}
    if Path(name).is_dir():
        info["kind"] = "local folder"
        info["files"] = {
            str(p.relative_to(name)): sha256_file(p)
            for p in sorted(Path(name).rglob("*"))
            if p.is_file()
        }
        return info
    info["kind"] = "hub"
    try:
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(name, revision=model_cfg["revision"], local_files_only=True)
        )
        info["commit"] = folder.name if folder.parent.name == "snapshots" else None
    except Exception as e:  # not in the local cache: keep the id and revision only
        info["commit"] = None
        info["note"] = f"commit not resolved from the local cache ({type(e).__name__})"
    return info


def seeds_of(config: dict) -> dict:
    """Every seed of the run, by config key."""
    run = config["run"]
    return {
        "train.seed": config["train"]["seed"],
        "lora.random_state": config["lora"]["random_state"],
        f"datasets.{run['dataset']}.split.seed": config["datasets"][run["dataset"]]["split"][
            "seed"
        ],
        "eval.seed": config["eval"]["seed"],
        "build_tiny_model.seed": 0
        if config["model"]["name"].startswith("resources/models/tiny-")
        else None,
    }


# --------------------------------------------------------------------------------- the archive
# Members read as text and redacted (`vlmflow.redact`) before they are archived.
TEXT_SUFFIXES = {
    ".json", ".jsonl", ".yaml", ".yml", ".md", ".txt", ".log", ".tsv", ".csv", ".diff",
    ".html", ".lock", ".rst", ".cfg", ".toml",
}  # fmt: skip


def redact_members(members: dict[str, bytes | Path]) -> dict[str, bytes | Path]:
    """Every text member (by suffix) with credentials removed: URL userinfo and token query
    parameters, token patterns (hf_, ghp_, AWS keys...) and secret environment values. Each
    member that had any is named in a warning (with the kinds found, never the values)."""
    out: dict[str, bytes | Path] = {}
    for name, value in members.items():
        out[name] = value
        if Path(name).suffix.lower() not in TEXT_SUFFIXES:
            continue
        data = value if isinstance(value, bytes) else Path(value).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        clean = redact_text(text)
        if clean != text:
            kinds = sorted(set(find_secrets(text))) or ["credential"]
            log.warning(
                "%s: credentials redacted before archiving (%s)%s",
                name,
                ", ".join(kinds),
                ": commit or remove them from the working tree" if name.endswith(".diff") else "",
            )
            out[name] = clean.encode("utf-8")
    return out


def write_tar_gz(path: str | os.PathLike, members: dict[str, bytes | Path]) -> None:
    """A deterministic .tar.gz: sorted members, fixed mtime/owner/mode, no gzip timestamp."""
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_MTIME))
    with (
        atomic_file(path) as tmp,
        open(tmp, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name in sorted(members):
            value = members[name]
            data = value if isinstance(value, bytes) else Path(value).read_bytes()
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = mtime
            ti.mode = 0o644
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            tar.addfile(ti, io.BytesIO(data))


def with_checksums(members: dict[str, bytes | Path], prefix: str) -> dict[str, bytes | Path]:
    """Add SHA256SUMS (sha256sum format, paths relative to `prefix`) over every member."""
    lines = []
    for name in sorted(members):
        v = members[name]
        digest = sha256_bytes(v) if isinstance(v, bytes) else sha256_file(v)
        lines.append(f"{digest}  {name.removeprefix(prefix + '/')}\n")
    return {**members, f"{prefix}/{CHECKSUMS}": "".join(lines).encode()}


def read_members(archive: str | os.PathLike) -> dict[str, bytes]:
    with tarfile.open(archive, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


# The manifest and SHA256SUMS are the only members verify_archive keeps in memory.
MAX_INDEX_BYTES = 512 << 20


def _hash_members(archive: str | os.PathLike) -> tuple[dict[str, str], dict[str, bytes]]:
    """(sha256 of every file member, the bytes of the manifest and SHA256SUMS members), in one
    streamed pass: members are read in 1 MiB chunks, so memory stays bounded whatever their
    size (a small .tar.gz may unpack to gigabytes)."""
    digests: dict[str, str] = {}
    kept: dict[str, bytes] = {}
    with tarfile.open(archive, "r|gz") as tar:
        for m in tar:
            if not m.isfile():
                continue
            keep = m.name.endswith("/" + MANIFEST) or m.name.endswith("/" + CHECKSUMS)
            if keep and m.size > MAX_INDEX_BYTES:
                raise ValueError(
                    f"{archive}: member {m.name} has {m.size} bytes (at most {MAX_INDEX_BYTES})"
                )
            f = tar.extractfile(m)
            h, parts = hashlib.sha256(), []
            while block := f.read(1 << 20):
                h.update(block)
                if keep:
                    parts.append(block)
            digests[m.name] = h.hexdigest()
            if keep:
                kept[m.name] = b"".join(parts)
    return digests, kept


def confined_path(path: str, root: str | os.PathLike) -> Path | None:
    """`path` (relative: joined to `root`) when it lies inside `root`, else None. Lexical:
    `..` and absolute paths outside `root` are refused (use `--root /` for absolute paths)."""
    base = Path(os.path.abspath(root))
    p = Path(path)
    full = Path(os.path.normpath(p if p.is_absolute() else base / p))
    return full if full.is_relative_to(base) else None


def verify_archive(archive: str | os.PathLike, root: str | os.PathLike = ".") -> dict:
    """Re-hash every file of the archive's data manifest under `root` (relative paths are joined
    to it; a path outside `root` is refused, not read) and every archive member against
    SHA256SUMS. Returns the differences."""
    digests, kept = _hash_members(archive)
    manifest_name = next((n for n in kept if n.endswith("/" + MANIFEST)), None)
    if manifest_name is None:
        raise ValueError(f"{archive}: no {MANIFEST} inside; not a vlmflow run archive")
    prefix = manifest_name[: -len(MANIFEST) - 1]
    try:
        manifest = json.loads(kept[manifest_name])
        entries = [(str(e["path"]), str(e["sha256"])) for e in manifest["files"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{archive}: {manifest_name} is malformed ({e})") from None
    missing, changed, refused, ok = [], [], [], 0
    for path, expected in entries:
        p = confined_path(path, root)
        if p is None:
            refused.append(path)
            continue
        if not p.is_file():
            missing.append(path)
            continue
        digest = sha256_file(p)
        if digest != expected:
            changed.append({"path": path, "expected": expected, "actual": digest})
        else:
            ok += 1
    bad_members = []
    sums = kept.get(f"{prefix}/{CHECKSUMS}", b"").decode("utf-8", "replace").splitlines()
    for line in sums:
        digest, _, name = line.partition("  ")
        if digests.get(f"{prefix}/{name}") != digest:
            bad_members.append(name)
    return {
        "archive": str(archive),
        "root": str(root),
        "checked": len(entries),
        "ok": ok,
        "missing": missing,
        "changed": changed,
        "refused": refused,
        "archive_members_bad": bad_members,
        "passed": not (missing or changed or refused or bad_members) and bool(sums),
    }


# ------------------------------------------------------------------------------- REPRODUCE.md
def reproduce_md(
    *,
    run: str,
    archive_name: str,
    git: dict,
    base: dict,
    has_diff: bool,
    manifest: dict,
    save_method: str,
) -> str:
    commit = git.get("commit")
    remote = git.get("remote") or "<the vlmflow repository>"
    revision = base.get("commit") or base.get("revision")
    lines = [
        f"# Reproduce run `{run}`",
        "",
        "Everything below runs from a checkout of the workflow; paths are relative to it.",
        "",
        "## 1. Code",
        "",
        "```bash",
        f"git clone {remote} vlmflow && cd vlmflow",
        f"git checkout {commit}" if commit else "# (the run was not made from a git checkout)",
    ]
    if has_diff:
        lines.append(f"tar -xzf {archive_name} {run}/env/git.diff && git apply {run}/env/git.diff")
    lines += [
        "```",
        "",
        "## 2. Environment",
        "",
        "```bash",
        f"tar -xzf {archive_name}",
        "python3 -m venv .venv",
        f".venv/bin/pip install -r {run}/env/requirements.lock",
        ".venv/bin/pip install --no-deps -e .",
        "```",
        "",
        f"`{run}/env/pip-freeze.txt` lists every package of the original run, "
        f"`{run}/env/platform.json` its hardware, CUDA and driver.",
        "",
        "## 3. Data",
        "",
        f"Put the {manifest['totals']['image']} images and {manifest['totals']['source']} source "
        f"file(s) of `{run}/{MANIFEST}` at the same paths, then check every hash:",
        "",
        "```bash",
        f".venv/bin/python scripts/verify_archive.py {archive_name} --root .",
        "```",
        "",
        "## 4. Base model (not archived)",
        "",
        f"`{base['name']}` at revision `{revision}`"
        + (
            " (a local folder: the sha256 of each of its files is in "
            if base.get("kind") == "local folder"
            else " ("
        )
        + f"`{run}/model/base_model.json`).",
    ]
    if base.get("kind") == "hub":
        lines += [
            "",
            "```bash",
            f".venv/bin/huggingface-cli download {base['name']} --revision {revision}",
            "```",
        ]
    lines += [
        "",
        "## 5. Run",
        "",
        "```bash",
        f"PATH=$PWD/.venv/bin:$PATH snakemake --cores all --configfile {run}/config/config.yaml",
        "# every step's exact command line:",
        f"PATH=$PWD/.venv/bin:$PATH snakemake -n -p --forceall --configfile {run}/config/config.yaml",
        "```",
        "",
        f"`{run}/config/config.yaml` is the resolved configuration (every default filled in), "
        f"`{run}/config/seeds.json` its seeds. Add your cluster profile "
        "(`--profile profiles/slurm`) as you would for any run.",
        "",
        "## 6. Compare",
        "",
        f"- per-step training log: `{run}/adapter/train_log.jsonl` (loss, learning rate, grad norm). "
        "On the CPU, with the same seeds and thread count, a re-run gives the same losses; on "
        "GPUs they agree closely but not bit for bit (non-deterministic kernels).",
        f"- evaluation: `{run}/eval/metrics.json` and `{run}/eval/predictions.parquet`.",
    ]
    if save_method != "lora":
        lines.append(f"- merge check and model card: `{run}/export/`.")
    lines += [
        f"- log and time/memory of every step: `{run}/logs/`, `{run}/benchmarks/`.",
        f"- the report's figures and pages: `{run}/report/`.",
        f"- integrity of this archive: `cd <extracted folder>/{run} && sha256sum -c {CHECKSUMS}`.",
    ]
    return "\n".join(lines) + "\n"


def run_logs(
    log_dirs: Iterable[str | os.PathLike], names: set[str], skip_steps: set[str] = frozenset()
) -> dict[str, Path]:
    """Log and benchmark files of this run: `<dir>/<step>/[<dataset>/]<name>.<ext>` with name
    in `names` (the archive's own, still being written, is left out)."""
    out = {}
    for d in log_dirs:
        d = Path(d)
        if not d.is_dir():
            continue
        for p in sorted([*d.glob("*/*"), *d.glob("*/*/*")]):
            step = p.relative_to(d).parts[0]
            if p.is_file() and p.stem in names and step not in skip_steps:
                out[f"{d.name}/{p.relative_to(d)}"] = p
    return out


def _files_under(folder: str | os.PathLike) -> list[Path]:
    """Files of a folder, without hidden ones (e.g. Snakemake's .snakemake_timestamp)."""
    folder = Path(folder)
    return [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]


def build_archive(
    out: str | os.PathLike,
    *,
    config: dict,
    images_parquet: str | os.PathLike,
    data_files: list[str],
    summary: str | os.PathLike,
    adapter: str | os.PathLike,
    metrics: str | os.PathLike,
    predictions: str | os.PathLike,
    merged: str | os.PathLike | None = None,
    merge_check: str | os.PathLike | None = None,
    lock: str | os.PathLike | None = None,
    report_files: Iterable[str | os.PathLike] = (),
    repo: str | os.PathLike = ".",
    log_dirs: Iterable[str | os.PathLike] = ("logs", "benchmarks"),
) -> dict:
    """Write the run's archive to `out`. Returns the data manifest."""
    import yaml

    run = config["run"]["name"]
    manifest = data_manifest(images_parquet, data_files)
    git, diff = git_info(repo)
    base = base_model_info(config["model"])
    members: dict[str, bytes | Path] = {
        f"{run}/config/config.yaml": yaml.safe_dump(config, sort_keys=True).encode(),
        f"{run}/config/seeds.json": _json(seeds_of(config)),
        f"{run}/{MANIFEST}": _json(manifest),
        f"{run}/data/summary.json": Path(summary),
        f"{run}/env/pip-freeze.txt": pip_freeze().encode(),
        f"{run}/env/platform.json": _json(platform_info()),
        f"{run}/env/git.json": _json(git),
        f"{run}/model/base_model.json": _json(base),
        f"{run}/eval/metrics.json": Path(metrics),
        f"{run}/eval/predictions.parquet": Path(predictions),
    }
    if diff:
        members[f"{run}/env/git.diff"] = diff.encode()
    if lock and Path(lock).is_file():
        members[f"{run}/env/requirements.lock"] = Path(lock)
    for p in _files_under(adapter):
        members[f"{run}/adapter/{p.relative_to(adapter)}"] = p
    for f in report_files:
        p = Path(f)
        for q in _files_under(p) if p.is_dir() else [p]:
            members[f"{run}/report/{q.relative_to(p.parent)}"] = q
    if merge_check:
        members[f"{run}/export/merge_check.json"] = Path(merge_check)
    if merged:
        for name in ("README.md", "vlmflow_export.json", "config.json"):
            if (Path(merged) / name).is_file():
                members[f"{run}/export/{name}"] = Path(merged) / name
    from .experiments import base_eval_key, budget_key

    # the shared jobs' logs too: the token budget and the base evaluation this run used
    names = {run, config["run"]["dataset"], budget_key(config), base_eval_key(config)}
    if config["model"]["name"].startswith("resources/models/tiny-"):
        names.add(config["model"]["name"].removeprefix("resources/models/tiny-"))
    names.add("demo_digits")
    for arc, p in run_logs(log_dirs, names, skip_steps={"archive"}).items():
        members[f"{run}/{arc}"] = p
    archive_name = Path(out).name
    members[f"{run}/REPRODUCE.md"] = reproduce_md(
        run=run,
        archive_name=archive_name,
        git=git,
        base=base,
        has_diff=bool(diff),
        manifest=manifest,
        save_method=config["export"]["save_method"],
    ).encode()
    write_tar_gz(out, with_checksums(redact_members(members), run))
    return manifest


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
