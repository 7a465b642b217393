"""The expected failures: bad input, damaged files, refused outputs, diverged training.

Each is printed by the CLI as one line naming the field, file or folder at fault; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class MoelabError(Exception):
    """Base of every failure moelab expects and explains in one line."""


class ConfigError(MoelabError, ValueError):
    """A configuration value or argument is missing, unknown or of the wrong type or range."""


class CheckpointError(MoelabError):
    """A checkpoint, run folder or model folder is missing, incomplete, damaged or does not fit."""


class OutputExists(MoelabError):
    """An output folder already holds something, or would overwrite the command's own input."""


class NonFiniteError(MoelabError):
    """Training produced a NaN/inf loss or gradient, or a tensor to be saved is not finite."""
