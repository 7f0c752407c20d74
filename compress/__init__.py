"""peft-compress: model compression for Hugging Face transformers, built as PEFT methods.

``import compress`` registers every PEFT method in ``compress.plugins`` with peft, and the compact (per-layer
width) and multi-exit model classes with transformers' Auto classes: at once when peft or transformers is already
imported, else as soon as either is (``compress._registration`` says how). Either way, after ``import compress``,
``PeftModel.from_pretrained`` and ``AutoModel*.from_pretrained`` load our adapters and models.

The public names are imported on first use (PEP 562), so that ``import compress`` (and with it the ``compress``
command's ``--help``) imports nothing heavy; ``compress.X`` and ``from compress import X`` work as usual.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging as _logging
from typing import Any

from compress import _registration
from compress.errors import (
    CalibrationError,
    CompressError,
    DataError,
    NothingToPruneError,
    OutputFolderError,
    UnsupportedModelError,
    UnsupportedStructureError,
)
from compress.pruning.spec import InvalidOptionError, PruningSpec

# peft imports bitsandbytes when it is installed; on CPUs with avx512_bf16 its CPU backend then warns that it
# could not fetch an optional kernel from a model hub (which this stack never does). Not actionable here.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

__version__ = "0.1.0"

#: public name -> the module that defines it, imported when the name is first used
_PUBLIC = {
    "save_pretrained": "compress.export",
    "PerplexityResult": "compress.evaluate",
    "evaluate_perplexity": "compress.evaluate",
    "supported_model_types": "compress.pruning.arch",
    "PruneReport": "compress.pruning.engine",
    "prune_model": "compress.pruning.engine",
    "warm_up_head": "compress.pruning.head_warmup",
    "Importance": "compress.pruning.importance",
    "available_importances": "compress.pruning.importance",
    "register_importance": "compress.pruning.importance",
    "METHODS": "compress.plugins",
    "LadderSideConfig": "compress.plugins.ladder_side",
    "LadderSideModel": "compress.plugins.ladder_side",
    "apply_ladder_side": "compress.plugins.ladder_side",
    "MultiExitConfig": "compress.plugins.multi_exit",
    "MultiExitModel": "compress.plugins.multi_exit",
    "apply_multi_exit": "compress.plugins.multi_exit",
    "calibrate_exit_threshold": "compress.plugins.multi_exit",
    "PruningAdapterCallback": "compress.plugins.pruning_adapter",
    "PruningAdapterConfig": "compress.plugins.pruning_adapter",
    "PruningAdapterModel": "compress.plugins.pruning_adapter",
    "apply_pruning_adapter": "compress.plugins.pruning_adapter",
    "SoupRun": "compress.plugins.sparse_soup",
    "SparseSoupConfig": "compress.plugins.sparse_soup",
    "SparseSoupModel": "compress.plugins.sparse_soup",
    "apply_sparse_soup": "compress.plugins.sparse_soup",
    "load_sparse": "compress.plugins.sparse_soup",
    "make_soup": "compress.plugins.sparse_soup",
    "run_sparse_soup": "compress.plugins.sparse_soup",
    "save_sparse": "compress.plugins.sparse_soup",
}

#: modules that moved into a plugin: the old attribute path works, with a warning, until the next release
_MOVED_MODULES = {
    "soup": "compress.plugins.sparse_soup.soup",
    "soup_cycles": "compress.plugins.sparse_soup.cycles",
    "sparse_format": "compress.plugins.sparse_soup.format",
}

__all__ = [
    "CalibrationError",
    "CompressError",
    "DataError",
    "Importance",
    "InvalidOptionError",
    "LadderSideConfig",
    "LadderSideModel",
    "METHODS",
    "MultiExitConfig",
    "MultiExitModel",
    "NothingToPruneError",
    "OutputFolderError",
    "PerplexityResult",
    "PruneReport",
    "PruningAdapterCallback",
    "PruningAdapterConfig",
    "PruningAdapterModel",
    "PruningSpec",
    "SoupRun",
    "SparseSoupConfig",
    "SparseSoupModel",
    "UnsupportedModelError",
    "UnsupportedStructureError",
    "apply_ladder_side",
    "apply_multi_exit",
    "apply_pruning_adapter",
    "apply_sparse_soup",
    "available_importances",
    "calibrate_exit_threshold",
    "evaluate_perplexity",
    "load_sparse",
    "make_soup",
    "prune_model",
    "register_importance",
    "run_sparse_soup",
    "save_pretrained",
    "save_sparse",
    "supported_model_types",
    "warm_up_head",
]


def __getattr__(name: str) -> Any:
    """The public names, the package's modules (``compress.export``, ...) and the moved modules (with a warning),
    imported on first use (PEP 562)."""
    if name in _PUBLIC:
        _registration.ensure_registered()
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif name in _MOVED_MODULES:
        import warnings

        warnings.warn(f"compress.{name} moved to {_MOVED_MODULES[name]}; the old name will be removed in the next "
                      "release (the public functions stay importable from compress)", FutureWarning, stacklevel=2)
        value = importlib.import_module(_MOVED_MODULES[name])
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    globals()[name] = value  # found directly from now on (a moved module warns once)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


_registration.register_now_or_on_import()
