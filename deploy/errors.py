"""Errors the CLI turns into exit code 2 (usage/config) with one line on stderr."""


class UsageError(Exception):
    """A mistake in how a command was called (exit 2)."""
