"""The one base class of vlmflow's expected errors (no imports: every module can use it).

A `VlmflowError` means bad input or a failed check that the user can act on (a config key, a
data file, a model folder, a merge beyond its tolerance): the message says what and where.
`vlmflow.cli.run` ends a CLI on one with that message on one line and exit code 1, without a
traceback; any other exception is a bug and keeps its traceback. Each subclass also derives from
the builtin it was before (ValueError, RuntimeError), so `except ValueError` still catches it.
"""


class VlmflowError(Exception):
    """Bad input or a failed check, with a message naming the file, row, key or step."""


class DataError(VlmflowError, ValueError):
    """Input data that cannot be used at all (names the file, line, column or split)."""
