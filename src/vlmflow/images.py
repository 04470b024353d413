"""Image validation: each referenced image is resolved inside its root, size-checked before
decoding, fully decoded, and described by one row (path, sha256, size, format, ok, reason)."""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageOps

IMAGE_COLUMNS = ["root", "path", "resolved", "sha256", "width", "height", "format", "ok", "reason"]


@dataclass
class ImageRecord:
    path: str
    """The path as written in the data (relative to its image root)."""
    resolved: str
    """The path that was opened (image root joined with `path`), '' when it was refused."""
    sha256: str
    width: int
    height: int
    format: str
    ok: bool
    reason: str
    """'' when ok, else a short machine-readable reason followed by details."""


@dataclass(frozen=True)
class ImagePolicy:
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
    max_pixels: int = 89_478_485
    min_side: int = 1


class PathEscapeError(ValueError):
    pass


def resolve_in_root(root: str | os.PathLike, rel: str) -> Path:
    """Join `rel` to `root` and refuse anything that resolves outside `root`.

    Refused: absolute paths, `..` components, and symlinks whose target leaves the root.
    """
    if not rel:
        raise PathEscapeError("empty path")
    if os.path.isabs(rel):
        raise PathEscapeError(
            f"absolute path '{rel}' is not allowed; give it relative to the image root"
        )
    if ".." in Path(rel).parts:
        raise PathEscapeError(f"'{rel}' contains '..'")
    root_real = Path(root).resolve()
    candidate = (Path(root) / rel).resolve()
    if candidate != root_real and root_real not in candidate.parents:
        raise PathEscapeError(
            f"'{rel}' resolves to '{candidate}', outside the image root '{root_real}'"
        )
    return Path(root) / rel


def check_image(root: str, rel: str, policy: ImagePolicy) -> ImageRecord:
    """Validate one image. Never raises for bad input: problems come back as `reason`."""
    rec = ImageRecord(
        path=rel, resolved="", sha256="", width=0, height=0, format="", ok=False, reason=""
    )
    try:
        path = resolve_in_root(root, rel)
    except PathEscapeError as e:
        rec.reason = f"path_escape: {e}"
        return rec
    rec.resolved = str(path)
    if not path.is_file():
        rec.reason = (
            "missing: file not found" if not path.exists() else "missing: not a regular file"
        )
        return rec
    data = path.read_bytes()
    rec.sha256 = hashlib.sha256(data).hexdigest()
    if not data:
        rec.reason = "empty_file: zero bytes"
        return rec
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            rec.format = im.format or ""
            rec.width, rec.height = im.size
            if rec.format not in policy.allowed_formats:
                rec.reason = f"format_not_allowed: {rec.format or 'unknown'} (allowed: {', '.join(policy.allowed_formats)})"
                return rec
            if im.width * im.height > policy.max_pixels:
                rec.reason = (
                    f"too_many_pixels: {im.width}x{im.height} > max_pixels {policy.max_pixels}"
                )
                return rec
            if min(im.size) < policy.min_side:
                rec.reason = f"too_small: shorter side {min(im.size)} < min_side {policy.min_side}"
                return rec
            im.load()  # full decode: catches truncated files that verify() lets through
    except Image.DecompressionBombError as e:
        rec.reason = f"too_many_pixels: {e}"
        return rec
    except Exception as e:  # PIL raises many types for corrupt data
        rec.reason = f"decode_error: {type(e).__name__}: {e}"
        return rec
    rec.ok = True
    return rec


def _check_many(args):
    root, rels, policy = args
    return [{"root": root, **asdict(check_image(root, rel, policy))} for rel in rels]


def validate_images(
    refs: list[tuple[str, str]], policy: ImagePolicy, threads: int = 1, progress: bool = True
) -> list[dict]:
    """Validate (image_root, relative_path) pairs in parallel; one dict per distinct pair.

    Order follows `refs` (first occurrence). Uses `threads` processes, in chunks.
    """
    from tqdm import tqdm

    unique = list(dict.fromkeys(refs))
    chunk = 64
    jobs = []
    for i in range(0, len(unique), chunk):
        part = unique[i : i + chunk]
        by_root: dict[str, list[str]] = {}
        for root, rel in part:
            by_root.setdefault(root, []).append(rel)
        jobs += [(root, rels, policy) for root, rels in by_root.items()]
    out: list[dict] = []
    bar = tqdm(total=len(unique), desc="validate images", unit="img", disable=not progress)
    if threads <= 1 or len(jobs) <= 1:
        for job in jobs:
            res = _check_many(job)
            out += res
            bar.update(len(res))
    else:
        with ProcessPoolExecutor(max_workers=threads) as pool:
            for res in pool.map(_check_many, jobs):
                out += res
                bar.update(len(res))
    bar.close()
    return out


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image for the model: EXIF orientation applied, converted to RGB (alpha on white)."""
    im = Image.open(path)
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")
