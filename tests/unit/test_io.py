"""Atomic writes honour the umask: a lab's group can read the outputs when its umask says so."""

import os
import stat

import pandas as pd
import pytest

from vlmflow.archive import write_tar_gz
from vlmflow.io import atomic_dir, current_umask, write_json, write_parquet


@pytest.fixture
def umask():
    old = os.umask(0o022)

    def set_(mask):
        os.umask(mask)
        return mask

    yield set_
    os.umask(old)


def mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("mask", [0o002, 0o022, 0o027, 0o077])
def test_outputs_get_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    write_json(tmp_path / "metrics.json", {"a": 1})
    write_parquet(tmp_path / "t.parquet", pd.DataFrame({"x": [1]}))
    write_tar_gz(tmp_path / "archive.tar.gz", {"run/a.txt": b"a"})
    with atomic_dir(tmp_path / "adapter") as d:
        (d / "weights.bin").write_bytes(b"w")
    for name in ("metrics.json", "t.parquet", "archive.tar.gz", "adapter/weights.bin"):
        assert mode(tmp_path / name) == 0o666 & ~mask, name
    assert mode(tmp_path / "adapter") == 0o777 & ~mask
    # Replacing an existing output keeps to the umask too.
    write_json(tmp_path / "metrics.json", {"a": 2})
    assert mode(tmp_path / "metrics.json") == 0o666 & ~mask
