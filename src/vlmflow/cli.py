"""Shared plumbing of the scripts/ CLIs: logging, config arguments, clean errors (`run`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from .cluster import slurm_context
from .config import load_config_arg
from .errors import VlmflowError
from .redact import RedactingFormatter, redact_text


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:  # no credential reaches a log
        handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    sys.excepthook = _redacting_excepthook
    for noisy in ("httpx", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    where = slurm_context()  # which job, partition and GPUs this step ran on
    if where:
        logging.getLogger("vlmflow").info("%s", where)


def _redacting_excepthook(exc_type, exc, tb) -> None:
    """Uncaught exceptions are printed as usual, less any credential."""
    import traceback

    sys.stderr.write(redact_text("".join(traceback.format_exception(exc_type, exc, tb))))


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--config",
        required=True,
        type=load_config_arg,
        help="configuration: a YAML/JSON file or inline JSON (Snakemake passes the sections "
        "this step reads)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run(main: Callable[[], None]) -> None:
    """Run a CLI's main; a `VlmflowError` (bad input, a failed check) ends it with one clear
    message and exit code 1; any other exception keeps its traceback."""
    try:
        main()
    except VlmflowError as e:
        logging.getLogger("vlmflow").error("%s", e)
        print(f"error: {redact_text(str(e))}", file=sys.stderr)
        sys.exit(1)
