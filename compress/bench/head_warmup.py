"""Deprecated import path of :func:`compress.warm_up_head` (:mod:`compress.pruning.head_warmup`), kept for one
release."""

import warnings

from compress.pruning.head_warmup import head_parameters, warm_up_head

warnings.warn("compress.bench.head_warmup is deprecated and will be removed in the next release: use "
              "`from compress import warm_up_head`", FutureWarning, stacklevel=2)

__all__ = ["head_parameters", "warm_up_head"]
