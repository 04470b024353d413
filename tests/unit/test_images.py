import io
import os
import struct
import zlib

import numpy as np
import pytest
from helpers import image_policy
from PIL import Image, ImageFile

from vlmflow import image_validation, images
from vlmflow.image_refs import BlobStore, ImageRef
from vlmflow.image_validation import check_image, validate_images, validate_refs
from vlmflow.images import ImagePolicy, load_rgb
from vlmflow.paths import PathEscapeError, resolve_in_root


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


def upright_two_colour():
    """40x20: left half red, right half blue."""
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))
    return im


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
    (r / "page.jpg").write_text("<!DOCTYPE html><html><body>404</body></html>")
    (r / "bomb.png").write_bytes(png_header_only(50_000, 50_000))
    Image.new("RGB", (8, 8)).save(r / "pic.bmp")
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(r / "cmyk.jpg", quality=95)
    Image.fromarray(np.full((6, 10), 32896, dtype=np.uint16)).save(r / "gray16.png")
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    pal.paste(1, (5, 0, 10, 10))
    pal.save(r / "palette.png", transparency=1)
    Image.new("LA", (4, 4), (0, 0)).save(r / "la.png")
    stored = upright_two_colour().transpose(Image.Transpose.ROTATE_90)  # 20x40 on disk
    exif = Image.Exif()
    exif[images.ORIENTATION] = 6
    stored.save(r / "rotated.jpg", exif=exif, quality=95)
    frames = [Image.new("RGB", (12, 12), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(r / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    (r / "link.png").symlink_to(outside)
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "x.png")
    (r / "dirlink").symlink_to(tmp_path / "elsewhere")
    (r / "sub").mkdir()
    (r / "sub" / "inside.png").symlink_to(r / "ok.png")
    return r


@pytest.mark.parametrize(
    "rel, reason",
    [
        ("ok.png", ""),
        ("truncated.jpg", "decode_error"),
        ("empty.png", "empty_file"),
        ("text.jpg", "not_an_image"),
        ("page.jpg", "not_an_image"),
        ("bomb.png", "too_many_pixels"),
        ("pic.bmp", "format_not_allowed"),
        ("missing.png", "missing"),
        ("../secret.png", "path_escape"),
        ("link.png", "path_escape"),
        ("dirlink/x.png", "path_escape"),
        ("sub/inside.png", ""),  # a symlink that stays inside the root is fine
    ],
)
def test_check_image_reasons(root, rel, reason):
    rec = check_image(str(root), rel, image_policy())
    assert rec.ok == (reason == ""), rec.reason
    assert rec.reason.split(":")[0] == reason
    if rec.ok:
        assert (rec.width, rec.height, rec.format) == (40, 30, "PNG")
        assert len(rec.sha256) == 64 and rec.status == "ok"


def test_bad_inputs_say_what_is_wrong(root):
    html = check_image(str(root), "page.jpg", image_policy())
    assert "HTML" in html.reason
    bomb = check_image(str(root), "bomb.png", image_policy())
    assert "50000x50000" in bomb.reason or "exceeds limit" in bomb.reason
    bmp = check_image(str(root), "pic.bmp", image_policy())
    assert "BMP" in bmp.reason and "PNG, JPEG, WEBP" in bmp.reason


def test_pixel_limit_is_checked_before_decoding(root, monkeypatch):
    # 100x100 = 10,000 pixels; the header says so, and load() must never be reached.
    Image.new("RGB", (100, 100)).save(root / "big.png")
    calls = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append(1))
    rec = check_image(str(root), "big.png", image_policy(max_pixels=9_999))
    assert rec.reason.startswith("too_many_pixels: 100x100 > max_pixels 9999")
    assert calls == []


def test_absolute_paths(root, tmp_path):
    with pytest.raises(PathEscapeError, match="absolute path .* outside the image root") as e:
        resolve_in_root(root, str(tmp_path / "secret.png"))
    assert f"image_root: {tmp_path}" in str(e.value)  # the key to set, with a folder that works
    assert resolve_in_root(root, str(root / "ok.png")) == root / "ok.png"  # inside: accepted
    rec = check_image(str(root), str(tmp_path / "secret.png"), image_policy())
    assert rec.reason.startswith("path_escape")


def test_min_side(root):
    rec = check_image(str(root), "ok.png", image_policy(min_side=32))
    assert not rec.ok and rec.reason.startswith("too_small")


def test_cmyk_is_converted(root):
    rec = check_image(str(root), "cmyk.jpg", image_policy())
    assert rec.ok and rec.status == "converted" and "CMYK" in rec.notes
    px = load_rgb(root / "cmyk.jpg").getpixel((8, 4))
    assert px[0] > 220 and px[1] < 40 and px[2] < 40  # red stays red


def test_16_bit_png_is_scaled_not_clipped(root):
    rec = check_image(str(root), "gray16.png", image_policy())
    assert rec.ok and rec.mode.startswith("I") and "8-bit" in rec.notes
    # Pillow's own convert("RGB") clips 32896 to 255 (white); we scale: 32896/257 = 128.
    with Image.open(root / "gray16.png") as raw:
        assert raw.convert("RGB").getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb(root / "gray16.png").getpixel((0, 0)) == (128, 128, 128)


def test_palette_transparency_goes_on_white(root):
    rec = check_image(str(root), "palette.png", image_policy())
    assert rec.ok and "alpha composited on white" in rec.notes
    im = load_rgb(root / "palette.png")
    assert im.getpixel((1, 1)) == (0, 255, 0) and im.getpixel((8, 1)) == (255, 255, 255)
    assert load_rgb(root / "la.png").getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotated_jpeg_comes_out_upright(root):
    with Image.open(root / "rotated.jpg") as stored:
        assert stored.size == (20, 40)  # stored rotated
    rec = check_image(str(root), "rotated.jpg", image_policy())
    assert rec.ok and (rec.width, rec.height) == (40, 20) and "exif_orientation 6" in rec.notes
    im = load_rgb(root / "rotated.jpg")
    assert im.size == (40, 20)
    left, right = im.getpixel((5, 10)), im.getpixel((35, 10))
    assert left[0] > 200 and left[2] < 60, left  # red on the left
    assert right[2] > 200 and right[0] < 60, right  # blue on the right


def test_animated_gif_first_frame_or_reject(root):
    gif_ok = image_policy(allowed_formats=("PNG", "GIF"), animated="first_frame")
    rec = check_image(str(root), "anim.gif", gif_ok)
    assert rec.ok and rec.frames == 2 and "first frame" in rec.notes
    assert load_rgb(root / "anim.gif").getpixel((5, 5)) == (255, 0, 0)
    rec = check_image(
        str(root), "anim.gif", image_policy(allowed_formats=("GIF",), animated="reject")
    )
    assert not rec.ok and rec.reason.startswith("animated: 2 frames")
    assert check_image(str(root), "anim.gif", image_policy()).reason.startswith(
        "format_not_allowed"
    )


def test_validation_and_load_rgb_agree(root):
    """Every accepted image opens with load_rgb at exactly the recorded (upright) size."""
    policy = image_policy(allowed_formats=("PNG", "JPEG", "GIF"))
    names = [n for n in os.listdir(root) if (root / n).is_file()]
    recs = validate_images([(str(root), n) for n in names], policy, progress=False)
    accepted = [r for r in recs if r["ok"]]
    assert len(accepted) >= 7
    for r in accepted:
        im = load_rgb(r["resolved"])
        assert im.mode == "RGB" and im.size == (r["width"], r["height"]), r["path"]


def test_validate_images_parallel_matches_serial(root):
    refs = [(str(root), n) for n in ("ok.png", "text.jpg", "missing.png", "ok.png", "cmyk.jpg")]
    refs += [(str(root), f"copy{i}.png") for i in range(40)]
    for i in range(40):
        Image.new("RGB", (8 + i, 8), (i, i, i)).save(root / f"copy{i}.png")
    serial = validate_images(refs, image_policy(), threads=1, progress=False)
    parallel = validate_images(refs, image_policy(), threads=2, progress=False)
    assert serial == parallel
    assert [r["path"] for r in serial[:4]] == ["ok.png", "text.jpg", "missing.png", "cmyk.jpg"]
    assert [r["ok"] for r in serial[:4]] == [True, False, False, True]
    assert [r["width"] for r in serial[4:]] == [8 + i for i in range(40)]


def test_incremental_cache_decodes_only_new_or_changed_files(tmp_path, monkeypatch):
    for i in range(30):
        Image.new("RGB", (10, 10), (i, 0, 0)).save(tmp_path / f"{i}.png")
    decoded = []
    real = images.inspect_file
    monkeypatch.setattr(
        image_validation, "inspect_file", lambda p, pol: decoded.append(p) or real(p, pol)
    )
    cache = tmp_path / "cache" / "validation.parquet"

    def run(n, policy=None):
        policy = policy or image_policy()
        decoded.clear()
        refs = [ImageRef("path", str(tmp_path), f"{i}.png") for i in range(n)]
        return validate_refs(refs, policy, threads=2, cache_file=cache, progress=False)

    first = run(30)
    assert len(decoded) == 30 and all(r["ok"] for r in first)
    assert run(30) == first and decoded == []
    Image.new("RGB", (12, 10)).save(tmp_path / "31.png")
    Image.new("RGB", (10, 10)).save(tmp_path / "30.png")
    (tmp_path / "5.png").write_bytes(b"broken now")  # changed in place
    again = run(32)
    assert sorted(os.path.basename(p) for p in decoded) == ["30.png", "31.png", "5.png"]
    assert again[5]["reason"].startswith("not_an_image") and again[31]["width"] == 12
    run(32, image_policy(min_side=11))  # another policy: nothing reused
    assert len(decoded) == 32


def test_embedded_bytes_go_to_the_blob_store_once(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (9, 7), (1, 2, 3)).save(buf, "PNG")
    blobs = BlobStore(tmp_path / "cache")
    sha, path = blobs.put(buf.getvalue())
    mtime = path.stat().st_mtime_ns
    assert blobs.put(buf.getvalue()) == (sha, path) and path.stat().st_mtime_ns == mtime
    assert path.suffix == ".png" and path.parent.name == sha[:2]
    recs = validate_refs(
        [ImageRef("bytes", "", sha), ImageRef("bytes", "", "0" * 64)],
        image_policy(),
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    assert recs[0]["ok"] and recs[0]["resolved"] == str(path) and recs[0]["sha256"] == sha
    assert recs[1]["reason"].startswith("missing")


def test_policy_from_config_accepts_common_spellings():
    from vlmflow.config import resolve_dataset

    ds = resolve_dataset(
        {"sources": [{"path": "x.jsonl"}], "images": {"allowed_formats": ["jpg", "Png", "JPEG"]}}
    )
    policy = ImagePolicy.from_config(ds["images"])
    assert policy.allowed_formats == ("JPEG", "PNG") and policy.animated == "first_frame"
    assert (
        policy.fingerprint()
        != ImagePolicy.from_config({**ds["images"], "min_side": 2}).fingerprint()
    )


@pytest.mark.parametrize("progressive", [False, True])
def test_fast_jpeg_catches_what_a_full_size_decode_catches(tmp_path, progressive):
    """DCT-scaled validation reads every compressed coefficient: any cut or corrupted span
    fails as it does at full size, and sizes are the full (upright) ones."""
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG", quality=90, progressive=progressive)
    data = buf.getvalue()
    variants = {"intact": data}
    for cut in (1, 2, 10, 200, len(data) // 2, len(data) - 700):
        variants[f"cut{cut}"] = data[: len(data) - cut]
    for pos in (len(data) // 3, len(data) // 2):
        bad = bytearray(data)
        bad[pos : pos + 40] = b"\xff" * 40
        variants[f"corrupt{pos}"] = bytes(bad)
    for name, blob in variants.items():
        (tmp_path / f"{name}.jpg").write_bytes(blob)
    fast, full = image_policy(fast_jpeg=True), image_policy(fast_jpeg=False)
    for name in variants:
        a = images.inspect_file(tmp_path / f"{name}.jpg", fast)
        b = images.inspect_file(tmp_path / f"{name}.jpg", full)
        assert (a["ok"], a["reason"].split(":")[0]) == (b["ok"], b["reason"].split(":")[0]), name
        if name == "intact" or name.startswith("cut"):  # (a corrupt span may still decode)
            assert a["ok"] == (name == "intact"), name
        assert (a["width"], a["height"]) == (160, 120)
    assert sum(not images.inspect_file(tmp_path / f"{n}.jpg", fast)["ok"] for n in variants) >= 7


def _idat_offset(data: bytes) -> int:
    pos = 8
    while data[pos + 4 : pos + 8] != b"IDAT":
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    return pos


def test_png_with_a_bad_chunk_crc_is_rejected(tmp_path):
    """Bit rot inside the image data: Pillow decodes such a file (to wrong pixels) without a
    word; the chunk's CRC says the file is damaged."""
    x = np.arange(32)
    arr = np.stack(
        [np.add.outer(x, x) * 4 % 256, np.multiply.outer(x, x) % 256, np.full((32, 32), 7)], -1
    ).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    data = buf.getvalue()
    pos = _idat_offset(data)
    silent = None
    for off in range(int.from_bytes(data[pos : pos + 4], "big")):
        rotten = bytearray(data)
        rotten[pos + 8 + off] ^= 0x01
        try:
            with Image.open(io.BytesIO(bytes(rotten))) as im:
                im.load()
                if not (np.asarray(im) == arr).all():
                    silent = bytes(rotten)
                    break
        except Exception:
            continue
    assert silent is not None  # Pillow alone accepts a damaged file with wrong pixels
    (tmp_path / "rot.png").write_bytes(silent)
    rec = check_image(str(tmp_path), "rot.png", image_policy())
    assert not rec.ok
    assert rec.reason.startswith("corrupt: PNG chunk 'IDAT'") and "CRC" in rec.reason
    (tmp_path / "fine.png").write_bytes(data)
    assert check_image(str(tmp_path), "fine.png", image_policy()).ok


def test_missing_image_names_the_resolved_path(root):
    rec = check_image(str(root), "sub/nope.png", image_policy())
    assert rec.reason == f"missing: file not found: {root / 'sub' / 'nope.png'}"
    (out,) = validate_refs([ImageRef("path", str(root), "gone.png")], image_policy())
    assert out["reason"] == f"missing: file not found: {root / 'gone.png'}"
