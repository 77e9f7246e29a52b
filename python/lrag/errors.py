"""The application's error for user mistakes, shared by the CLI (which reports it) and the run (which raises it)."""
from __future__ import annotations


class UsageError(Exception):
    """A mistake in the command line or its inputs: ``lrag`` prints ``lrag: error: <message>`` (naming the option)
    and exits with status 2, without a traceback."""
