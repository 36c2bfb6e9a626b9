"""The one error type users see. The command line prints its message and exits with code 2."""

from __future__ import annotations


class InstructkitError(Exception):
    """A problem with the user's input (config, data file, template, model path) or environment.

    The message names the culprit: the file, line or row, column and template at fault.
    """

    exit_code = 2


class ConfigError(InstructkitError):
    """A configuration file or override is invalid."""


class TemplateError(InstructkitError):
    """A template is malformed, unknown, or fails to render."""


class DataError(InstructkitError):
    """A data file is missing, unreadable, or has rows that do not fit the schema."""


class ModelError(InstructkitError):
    """A model cannot be found or loaded."""


class TrainingError(InstructkitError):
    """Training cannot start or had to stop (lock held, NaN loss, no disk space)."""
