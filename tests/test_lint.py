"""Static checks CI runs with the suite: ruff, snakefmt and `snakemake --lint` have no findings."""

import subprocess
from pathlib import Path

import pytest
from helpers import BIN, snakemake_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "cmd",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["snakefmt", "--check", "Snakefile", "rules/"],
        ["snakemake", "--lint", "--cores", "1"],
    ],
    ids=["ruff-check", "ruff-format", "snakefmt", "snakemake-lint"],
)
def test_no_findings(cmd):
    res = subprocess.run(
        [str(BIN / cmd[0]), *cmd[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=snakemake_env(),
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    if cmd[0] == "snakemake":
        assert "Lints for" not in res.stdout + res.stderr, res.stdout + res.stderr
