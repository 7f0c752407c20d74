"""peft-compress: model compression for Hugging Face transformers, built as PEFT methods.

``import compress`` registers every PEFT method in ``compress.plugins`` with peft and the compact
(per-layer width) model classes with transformers' Auto classes.
"""

from __future__ import annotations

from compress.errors import (
    CalibrationError,
    CompressError,
    UnsupportedModelError,
    UnsupportedStructureError,
)
from compress.export import save_pretrained
from compress.pruning.arch import supported_model_types
from compress.pruning.compact import register_compact_models
from compress.pruning.engine import PruneReport, prune_model
from compress.pruning.importance import Importance, available_importances, register_importance

__version__ = "0.1.0"

register_compact_models()

# Importing the plugins registers every PEFT method with peft (see compress.registry).
from compress.plugins import METHODS  # noqa: E402
from compress.plugins.pruning_adapter import (  # noqa: E402
    PruningAdapterCallback,
    PruningAdapterConfig,
    PruningAdapterModel,
    apply_pruning_adapter,
)

__all__ = [
    "CalibrationError",
    "CompressError",
    "Importance",
    "METHODS",
    "PruningAdapterCallback",
    "PruningAdapterConfig",
    "PruningAdapterModel",
    "apply_pruning_adapter",
    "PruneReport",
    "UnsupportedModelError",
    "UnsupportedStructureError",
    "available_importances",
    "prune_model",
    "register_importance",
    "save_pretrained",
    "supported_model_types",
]
