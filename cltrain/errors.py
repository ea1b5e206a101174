"""Errors every layer raises: a leaf module (imports nothing of the project).

A ConfigError is bad input from the user (a config key, a value): clt-* commands print its message on one
line and exit 2 (train/lifecycle.py)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the value."""
