"""Exceptions raised at the public edge. Each message names the problem and the fix."""

from __future__ import annotations

from typing import Any


class CompressError(ValueError):
    """Base class for peft-compress input errors."""


class InvalidOptionError(CompressError):
    """A pruning or method option has a bad value: ``option`` names it (``key`` the entry of a per-structure
    mapping), ``reason`` says what is wrong and what to do."""

    def __init__(self, option: str, value: Any, reason: str, key: str | None = None):
        self.option, self.value, self.reason, self.key = option, value, reason, key
        where = f"{option}[{key!r}]" if key is not None else option
        super().__init__(f"{where}={value!r}: {reason}")

    def spelled(self, spelling: str) -> str:
        """The message with the option spelled as the caller names it (e.g. ``--max-keep 0.3: ...``)."""
        value = f"{self.key}={self.value}" if self.key is not None else self.value
        return f"{spelling} {value}: {self.reason}"


class UnsupportedModelError(CompressError):
    """The model's architecture is not supported by the pruning engine."""


class UnsupportedStructureError(CompressError):
    """A structure (ffn, heads, kv_heads, layers) cannot be pruned for this architecture or mode."""


class CalibrationError(CompressError):
    """Calibration data is missing or unusable for the chosen importance criterion."""


class OutputFolderError(CompressError, FileExistsError):
    """A destination folder cannot be written or replaced without losing data (see compress.export)."""


class NothingToPruneError(CompressError):
    """The requested ratio removes nothing from a structure of this model."""


class DataError(CompressError):
    """Text or data for calibration or evaluation cannot be read, or is too short for what was asked."""
