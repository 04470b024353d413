import hashlib
import io
import json
import os
import tarfile

import pandas as pd

from vlmflow.archive import (
    data_manifest,
    read_members,
    verify_archive,
    with_checksums,
    write_tar_gz,
)


def _data(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / f"imgs/{i}.png").write_bytes(bytes([i]) * 10)
    images = pd.DataFrame(
        {
            "root": ["imgs"] * 4,
            "path": ["0.png", "1.png", "2.png", "gone.png"],
            "resolved": ["imgs/0.png", "imgs/1.png", "imgs/2.png", ""],
            "sha256": [hashlib.sha256(bytes([i]) * 10).hexdigest() for i in range(3)] + [""],
        }
    )
    images.to_parquet(tmp_path / "images.parquet")
    (tmp_path / "train.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "data.jsonl").write_text('{"image": "0.png"}\n')


def test_manifest_lists_images_sources_and_parquet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _data(tmp_path)
    m = data_manifest("images.parquet", ["train.parquet", "data.jsonl"])
    paths = [e["path"] for e in m["files"]]
    assert paths == sorted(paths)
    assert m["totals"] == {"image": 3, "source": 1, "parquet": 2}  # the missing image is not listed
    assert {e["path"]: e["bytes"] for e in m["files"]}["imgs/1.png"] == 10


def test_archive_is_byte_identical_whatever_the_order_and_mtimes(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha")
    b.write_text("beta")
    members = {"run/b.txt": b, "run/a.txt": a, "run/x.json": b"{}"}
    write_tar_gz(tmp_path / "one.tar.gz", with_checksums(members, "run"))
    os.utime(a, (1, 1))
    reordered = dict(reversed(list(members.items())))
    write_tar_gz(tmp_path / "two.tar.gz", with_checksums(reordered, "run"))
    assert (tmp_path / "one.tar.gz").read_bytes() == (tmp_path / "two.tar.gz").read_bytes()
    with tarfile.open(tmp_path / "one.tar.gz") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == ["run/SHA256SUMS", "run/a.txt", "run/b.txt", "run/x.json"]
    assert {(i.mtime, i.uid, i.gid, i.mode) for i in infos} == {(315532800, 0, 0, 0o644)}


def test_verify_reports_changed_missing_and_corrupt_members(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _data(tmp_path)
    manifest = data_manifest("images.parquet", ["train.parquet", "data.jsonl"])
    members = with_checksums(
        {"run/data/manifest.json": json.dumps(manifest).encode(), "run/note.txt": b"ok"}, "run"
    )
    write_tar_gz(tmp_path / "good.tar.gz", members)
    assert verify_archive(tmp_path / "good.tar.gz", tmp_path)["passed"]

    (tmp_path / "imgs/2.png").write_bytes(b"tampered")
    (tmp_path / "data.jsonl").unlink()
    members["run/note.txt"] = b"changed after the checksums"
    write_tar_gz(tmp_path / "bad.tar.gz", members)
    res = verify_archive(tmp_path / "bad.tar.gz", tmp_path)
    assert not res["passed"]
    assert [c["path"] for c in res["changed"]] == ["imgs/2.png"]
    assert res["missing"] == ["data.jsonl"]
    assert res["archive_members_bad"] == ["note.txt"]
    assert set(read_members(tmp_path / "bad.tar.gz")) == set(members)


def _archive_with_manifest(tmp_path, entries, name="crafted.tar.gz"):
    manifest = {"format": "vlmflow-data-manifest/1", "files": entries, "totals": {}}
    members = with_checksums({"run/data/manifest.json": json.dumps(manifest).encode()}, "run")
    write_tar_gz(tmp_path / name, members)
    return tmp_path / name


def test_verify_reads_no_path_outside_root(tmp_path):
    """A crafted manifest naming /etc/hostname or ../../.. (with the right hashes, so that
    hashing them would pass) is refused without reading those files."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "ok.png").write_bytes(b"fine")
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"not yours")
    digest = hashlib.sha256(b"not yours").hexdigest()
    entries = [
        {"path": "ok.png", "sha256": hashlib.sha256(b"fine").hexdigest()},
        {"path": str(outside), "sha256": digest},
        {"path": "../secret.txt", "sha256": digest},
        {"path": "sub/../../secret.txt", "sha256": digest},
    ]
    res = verify_archive(_archive_with_manifest(tmp_path, entries), root)
    assert res["refused"] == [str(outside), "../secret.txt", "sub/../../secret.txt"]
    assert res["ok"] == 1 and not res["passed"]
    # Absolute paths inside the root are fine; `--root /` allows them anywhere.
    inside = [{"path": str(root / "ok.png"), "sha256": entries[0]["sha256"]}]
    assert verify_archive(_archive_with_manifest(tmp_path, inside, "abs.tar.gz"), root)["passed"]
    res = verify_archive(_archive_with_manifest(tmp_path, entries[1:2], "any.tar.gz"), "/")
    assert res["passed"]


def test_verify_hashes_members_in_bounded_memory(tmp_path):
    """A 128 MiB member (a few hundred KB compressed) is hashed in chunks: Python's peak
    allocation stays far below the member's size."""
    import tracemalloc

    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(128 << 20)
    manifest = {"format": "vlmflow-data-manifest/1", "files": [], "totals": {}}
    sums = f"{hashlib.sha256(b'').hexdigest()}  wrong.bin\n"
    out = tmp_path / "bomb.tar.gz"
    with tarfile.open(out, "w:gz", compresslevel=1) as tar:
        tar.add(big, "run/big.bin")
        for name, data in (
            ("run/data/manifest.json", json.dumps(manifest)),
            ("run/SHA256SUMS", sums),
        ):
            ti = tarfile.TarInfo(name)
            ti.size = len(data.encode())
            tar.addfile(ti, io.BytesIO(data.encode()))
    assert out.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        res = verify_archive(out, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res["archive_members_bad"] == ["wrong.bin"]
    assert peak < 16 << 20, peak
