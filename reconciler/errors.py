"""Errors that stop the daemon from starting: reported as one sentence, exit code 1."""

from __future__ import annotations


class StartupError(Exception):
    """The daemon cannot start as configured; the message says what is wrong and where."""
