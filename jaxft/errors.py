"""The exceptions jaxft raises on bad input. Each message is one line: what was wrong, where (file, field, line),
and what to do. Catch `JaxftError` to handle them all; the command-line jobs print them as `error: ...` and exit 2.
"""

from __future__ import annotations


class JaxftError(Exception):
    """Base of every jaxft input error."""


class ConfigError(JaxftError, ValueError):
    """A configuration value is wrong (a run config, a method spec, an override)."""


class UnsupportedConfigError(JaxftError, ValueError):
    """A model config asks for something jaxft does not implement (the model would compute something else)."""


class FileFormatError(JaxftError, ValueError):
    """A file jaxft reads is missing, empty, not in its format, or lacks a field: the message names the file and,
    where there is one, the field, line and column."""


class OutputExistsError(JaxftError, FileExistsError):
    """A write would replace files the user has (a non-empty output directory): refused unless asked
    (`overwrite=True`)."""
