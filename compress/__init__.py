"""peft-compress: model compression for Hugging Face transformers, built as PEFT methods.

``import compress`` registers every PEFT method in ``compress.plugins`` with peft, and the compact (per-layer
width) and multi-exit model classes with transformers' Auto classes.
"""

from __future__ import annotations

import logging as _logging

# peft imports bitsandbytes when it is installed; on CPUs with avx512_bf16 its CPU backend then warns that it
# could not fetch an optional kernel from a model hub (which this stack never does). Not actionable here.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

from compress.errors import (  # noqa: E402
    CalibrationError,
    CompressError,
    NothingToPruneError,
    OutputFolderError,
    UnsupportedModelError,
    UnsupportedStructureError,
)
from compress.export import save_pretrained  # noqa: E402
from compress.pruning.arch import supported_model_types  # noqa: E402
from compress.pruning.compact import register_compact_models  # noqa: E402
from compress.pruning.engine import PruneReport, prune_model  # noqa: E402
from compress.pruning.head_warmup import warm_up_head  # noqa: E402
from compress.pruning.importance import Importance, available_importances, register_importance  # noqa: E402
from compress.pruning.spec import InvalidOptionError, PruningSpec  # noqa: E402

__version__ = "0.1.0"

register_compact_models()

# Importing the plugins registers every PEFT method with peft (see compress.registry).
from compress.plugins import METHODS  # noqa: E402
from compress.plugins.ladder_side import LadderSideConfig, LadderSideModel, apply_ladder_side  # noqa: E402
from compress.plugins.multi_exit import (  # noqa: E402
    MultiExitConfig,
    MultiExitModel,
    apply_multi_exit,
    calibrate_exit_threshold,
)
from compress.plugins.pruning_adapter import (  # noqa: E402
    PruningAdapterCallback,
    PruningAdapterConfig,
    PruningAdapterModel,
    apply_pruning_adapter,
)
from compress.plugins.sparse_soup import (  # noqa: E402
    SoupRun,
    SparseSoupConfig,
    SparseSoupModel,
    apply_sparse_soup,
    load_sparse,
    make_soup,
    run_sparse_soup,
    save_sparse,
)

__all__ = [
    "CalibrationError",
    "CompressError",
    "Importance",
    "InvalidOptionError",
    "LadderSideConfig",
    "LadderSideModel",
    "METHODS",
    "MultiExitConfig",
    "MultiExitModel",
    "NothingToPruneError",
    "OutputFolderError",
    "PruningAdapterCallback",
    "PruningAdapterConfig",
    "PruningAdapterModel",
    "SparseSoupConfig",
    "SoupRun",
    "SparseSoupModel",
    "apply_ladder_side",
    "apply_multi_exit",
    "apply_pruning_adapter",
    "apply_sparse_soup",
    "load_sparse",
    "make_soup",
    "PruneReport",
    "PruningSpec",
    "UnsupportedModelError",
    "UnsupportedStructureError",
    "available_importances",
    "calibrate_exit_threshold",
    "prune_model",
    "register_importance",
    "run_sparse_soup",
    "save_pretrained",
    "save_sparse",
    "supported_model_types",
    "warm_up_head",
]

#: modules that moved into a plugin: the old attribute path works, with a warning, until the next release
_MOVED_MODULES = {
    "soup": "compress.plugins.sparse_soup.soup",
    "soup_cycles": "compress.plugins.sparse_soup.cycles",
    "sparse_format": "compress.plugins.sparse_soup.format",
}


def __getattr__(name: str):
    """``compress.soup`` and the other moved modules (PEP 562), warning once each."""
    if name not in _MOVED_MODULES:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    import importlib
    import warnings

    warnings.warn(f"compress.{name} moved to {_MOVED_MODULES[name]}; the old name will be removed in the next "
                  "release (the public functions stay importable from compress)", FutureWarning, stacklevel=2)
    module = importlib.import_module(_MOVED_MODULES[name])
    globals()[name] = module  # found directly from now on: the warning is given once
    return module
