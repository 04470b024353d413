import io
import struct
import zlib

import pytest
from PIL import Image

from vlmflow.images import (
    ImagePolicy,
    PathEscapeError,
    check_image,
    load_rgb,
    resolve_in_root,
    validate_images,
)


def png_header_only(width, height):
    """A PNG that declares width x height pixels but holds almost no data."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    Image.new("RGB", (40, 30), (10, 20, 30)).save(r / "ok.png")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 0, 0)).save(buf, "JPEG")
    (r / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (r / "empty.png").write_bytes(b"")
    (r / "text.jpg").write_text("not an image at all")
    (r / "bomb.png").write_bytes(png_header_only(50_000, 50_000))
    Image.new("RGB", (8, 8)).save(r / "pic.bmp")
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    (r / "link.png").symlink_to(outside)
    return r


@pytest.mark.parametrize(
    "rel, reason",
    [
        ("ok.png", ""),
        ("truncated.jpg", "decode_error"),
        ("empty.png", "empty_file"),
        ("text.jpg", "decode_error"),
        ("bomb.png", "too_many_pixels"),
        ("pic.bmp", "format_not_allowed"),
        ("missing.png", "missing"),
        ("../secret.png", "path_escape"),
        ("link.png", "path_escape"),
    ],
)
def test_check_image_reasons(root, rel, reason):
    rec = check_image(str(root), rel, ImagePolicy())
    assert rec.ok == (reason == "")
    assert rec.reason.split(":")[0] == reason
    if rec.ok:
        assert (rec.width, rec.height, rec.format) == (40, 30, "PNG")
        assert len(rec.sha256) == 64


def test_absolute_path_is_refused(root):
    with pytest.raises(PathEscapeError, match="absolute"):
        resolve_in_root(root, str(root / "ok.png"))


def test_min_side(root):
    rec = check_image(str(root), "ok.png", ImagePolicy(min_side=32))
    assert not rec.ok and rec.reason.startswith("too_small")


def test_validate_images_parallel_matches_serial(root):
    refs = [(str(root), n) for n in ("ok.png", "text.jpg", "missing.png", "ok.png")]
    serial = validate_images(refs, ImagePolicy(), threads=1, progress=False)
    parallel = validate_images(refs, ImagePolicy(), threads=2, progress=False)
    assert serial == parallel
    assert [r["path"] for r in serial] == ["ok.png", "text.jpg", "missing.png"]  # deduplicated
    assert [r["ok"] for r in serial] == [True, False, False]


def test_load_rgb_composites_alpha_on_white(tmp_path):
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    im.save(tmp_path / "a.png")
    out = load_rgb(tmp_path / "a.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)
