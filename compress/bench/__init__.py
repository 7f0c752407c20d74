"""Deprecated: ``compress.bench.head_warmup`` is kept for one release; ``warm_up_head`` is ``compress.warm_up_head``.

The demo and the recipes' helpers are application code in the repository's ``recipes/`` folder
(``recipes/demo.py``, ``recipes/common/``), not part of the installed package.
"""
