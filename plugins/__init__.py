"""PEFT methods of peft-compress, one sub-package each; installed as ``compress.plugins``.

Every method registers itself with peft when its sub-package is imported. ``METHODS`` lists them all;
the test suite requires test cases for each entry.
"""

from __future__ import annotations

from . import ladder_side, multi_exit, pruning_adapter, sparse_soup

METHODS = {
    "PRUNING_ADAPTER": pruning_adapter,
    "LADDER_SIDE": ladder_side,
    "MULTI_EXIT": multi_exit,
    "SPARSE_SOUP": sparse_soup,
}

__all__ = ["METHODS"]
