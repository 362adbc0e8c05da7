"""Errors a user can fix: every command reports them as one line and exits with status 2, before any work starts.

``ConfigError`` is a ``ValueError``; its variants are also the ``KeyError``, ``TypeError`` or ``FileNotFoundError``
that code written against the earlier exceptions expects, so ``except ConfigError`` catches them all.
"""
from __future__ import annotations

import argparse
import sys


class ConfigError(ValueError):
    """A bad configuration value, key, file or input, named in the message."""

    def __str__(self) -> str:  # KeyError would quote its message
        return str(self.args[0]) if self.args else ""


class ConfigKeyError(ConfigError, KeyError):
    """An unknown key (config, objective, option, model)."""


class ConfigTypeError(ConfigError, TypeError):
    """A value of the wrong type."""


class ConfigFileError(ConfigError, FileNotFoundError):
    """A file or folder named by the configuration that does not exist."""


class OneLineParser(argparse.ArgumentParser):
    """argparse in vilseg's message style: every command reports a problem as ``PROG COMMAND: message`` (``vilseg
    train: ...``, ``vilseg segment: ...``, ``python -m data_prep build: ...``), and a usage error prints the
    command's usage line first. Exit status 2."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: {message}\n")
