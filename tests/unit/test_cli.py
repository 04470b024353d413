"""vlmflow.cli: expected errors end with one message and exit code 1; data CLIs stay light."""

import subprocess
import sys
from pathlib import Path

import pytest

from vlmflow import cli
from vlmflow.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_expected_error_is_one_message_and_exit_1(capsys):
    def main():
        raise ConfigError("train.lr: must be > 0")

    with pytest.raises(SystemExit) as stop:
        cli.run(main)
    assert stop.value.code == 1
    assert "error: train.lr: must be > 0" in capsys.readouterr().err


def test_unexpected_error_keeps_its_traceback():
    def main():
        raise ValueError("a bug, not bad input")

    with pytest.raises(ValueError, match="a bug"):
        cli.run(main)


def test_every_vlmflow_error_is_one_message_and_exit_1(capsys):
    from vlmflow.collate import SampleTooLongError
    from vlmflow.data import DataError
    from vlmflow.merge_check import MergeCheckError

    errors = [
        DataError("row 3: empty response"),
        SampleTooLongError("too long"),
        MergeCheckError("merged logits differ by 0.3 > 0.01"),
    ]
    for error in errors:

        def main(error=error):
            raise error

        with pytest.raises(SystemExit) as stop:
            cli.run(main)
        assert stop.value.code == 1
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {error}"

    def bug():
        raise KeyError("x")

    with pytest.raises(KeyError):
        cli.run(bug)


def test_data_cli_does_not_import_torch():
    code = (
        "import sys, runpy; sys.argv = ['validate_images.py', '--help'];\n"
        "try:\n    runpy.run_path(SCRIPT, run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    code = code.replace("SCRIPT", repr(str(ROOT / "scripts" / "validate_images.py")))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
