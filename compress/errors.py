"""Exceptions raised at the public edge. Each message names the problem and the fix."""

from __future__ import annotations


class CompressError(ValueError):
    """Base class for peft-compress input errors."""


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
