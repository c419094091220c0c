"""Errors a subcommand raises to end with one clear line and a defined exit code."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class CLIError(Exception):
    """The work failed: print the message, exit 1."""

    exit_code = 1


class UsageError(CLIError):
    """The user asked for something impossible (bad flag, missing privilege): exit 2."""

    exit_code = 2


def quiet_on_epipe(command: Callable[[], int]) -> int:
    """Run `command`; if whoever reads stdout went away (`mptcpkit ... | head`), exit 0
    without a traceback: the reader had all it wanted. Output still buffered is flushed
    here, so a closed pipe cannot surface later as "Exception ignored" at exit."""
    try:
        try:
            return command()
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush goes nowhere
        os.close(devnull)
        return 0
