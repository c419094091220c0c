"""Errors a subcommand raises to end with one clear line and a defined exit code."""

from __future__ import annotations


class CLIError(Exception):
    """The work failed: print the message, exit 1."""

    exit_code = 1


class UsageError(CLIError):
    """The user asked for something impossible (bad flag, missing privilege): exit 2."""

    exit_code = 2
