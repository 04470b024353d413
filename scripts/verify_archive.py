#!/usr/bin/env python
"""Re-check a run archive: the sha256 of every file in its data manifest (images, sources,
Parquet files) against a data folder, and every archive member against its SHA256SUMS.

  python scripts/verify_archive.py results/runs/demo/archive.tar.gz --root .

Prints each missing or changed file; exits 1 when anything differs, 2 when the archive
cannot be read. A manifest path outside --root (`../..`, an absolute path elsewhere) is refused,
never read: give `--root /` for an archive whose config used absolute paths. Members are hashed
in bounded chunks, whatever their size.
"""

import argparse
import json
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vlmflow.archive import verify_archive  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("archive")
    p.add_argument(
        "--root",
        default=".",
        help="folder the manifest's relative paths start from; no path outside it is read",
    )
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    a = p.parse_args()
    try:
        res = verify_archive(a.archive, a.root)
    except (OSError, ValueError, tarfile.TarError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(res, indent=2))
    for path in res["refused"]:
        print(f"REFUSED  {path}  (outside --root {a.root})")
    for path in res["missing"]:
        print(f"MISSING  {path}")
    for c in res["changed"]:
        print(f"CHANGED  {c['path']}  expected {c['expected']}  found {c['actual']}")
    for name in res["archive_members_bad"]:
        print(f"CORRUPT  archive member {name}")
    verdict = "OK" if res["passed"] else "DIFFERENT"
    print(
        f"{verdict}: {res['ok']} of {res['checked']} data files match"
        + (
            f", {len(res['archive_members_bad'])} archive member(s) corrupt"
            if res["archive_members_bad"]
            else ""
        )
    )
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
