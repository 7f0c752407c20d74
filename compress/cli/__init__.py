"""The ``compress`` command's commands (``prune``, ``info``) and their helpers.

Parsing and dispatch live in the stand-alone :mod:`compress_cli` module, so that ``compress --help``
answers without importing this package; ``main`` is re-exported here for ``python -m compress`` and callers
that run the command line in-process.
"""

from compress_cli import UsageError, build_parser, main

__all__ = ["UsageError", "build_parser", "main"]
