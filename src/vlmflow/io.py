"""Atomic writes: outputs appear complete or not at all, with the permissions the umask gives (not
the 0600 / 0700 of mkstemp / mkdtemp, which would hide a lab's outputs from its group)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by setting
    and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _umask_mode(path: Path, base: int) -> None:
    """chmod `path` to what open()/mkdir() would have given it: `base` less the umask."""
    os.chmod(path, base & ~current_umask())


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        _umask_mode(tmp, 0o777)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "w"):
    """Yield a temporary path beside `final`; it is renamed onto `final` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _umask_mode(Path(tmp), 0o666)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(path: str | os.PathLike, df, schema=None) -> None:
    """Write a pandas DataFrame (or pyarrow Table) to Parquet atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = (
        df
        if isinstance(df, pa.Table)
        else pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    )
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
