"""Images as the model sees them: the one place that opens an image for the model (`load_rgb`,
what training imports), its normalisation (`to_rgb`), and the inspection of one file
(`inspect_file`) that guarantees `load_rgb` will work on every image a dataset keeps.

Inspection of one file: non-empty; PNG chunk CRCs checked; identified by Pillow; format allowed;
pixel count checked from the header *before* decoding (decompression bombs); shorter side >=
min_side; animated → first frame or rejected (policy); decoded in full (`load()`, so truncated
files fail); then normalised exactly as `load_rgb` normalises it (first frame, EXIF orientation,
CMYK / palette / 16-bit / alpha → RGB with alpha composited on white). Width and height are
recorded as the model sees them (upright).

Running this over every image of a dataset (with a cache and threads) is
`vlmflow.image_validation`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

ORIENTATION = ExifTags.Base.Orientation
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


@dataclass(frozen=True)
class ImagePolicy:
    """What an image must be to be kept (`datasets.<name>.images`; the defaults are the
    schema's, `from_config` builds it from a resolved section)."""

    allowed_formats: tuple[str, ...]
    max_pixels: int
    min_side: int
    animated: str  # first_frame | reject
    fast_jpeg: bool
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


def empty_record(**kw) -> dict:
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
        return {**empty_record(), "reason": f"unreadable: {e.strerror or e}"}
    return inspect_bytes(data, policy, path)
