"""User-facing errors.

Every problem a user can cause (bad path, bad file, bad option, bad data) raises a
:class:`CurvlabError` subclass with a one-line message naming the problem. The CLI prints the
message and exits non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations


class CurvlabError(Exception):
    """Base class of errors caused by user input; the message is one line."""


class CheckpointError(CurvlabError):
    """A checkpoint file is missing, unreadable, or does not match its model."""


class DataError(CurvlabError):
    """A data source is missing, malformed, or inconsistent with the model."""


class ConfigError(CurvlabError):
    """An unknown preset, model family, block name or option value."""
