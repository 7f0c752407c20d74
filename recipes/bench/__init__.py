"""The comparison benchmark's package (``recipes/benchmark.py``): application code, not installed.

- :mod:`bench.harness`: rows (one method on one task and seed), each run in a fresh process; their figures written
  to one JSON file after every row, atomically; ``--resume``; the measurements a row takes in its own process
  (training peak memory, latency at batch 1 and 32).
- :mod:`bench.report`: rows grouped over seeds, ratios to the baseline row, Markdown tables, Pareto fronts.
- :mod:`bench.plots`: quality against training peak memory and against latency, one PNG per track.
- :mod:`bench.encoder`, :mod:`bench.decoder`, :mod:`bench.scaling`: the tracks' rows and the functions that run
  them.

The scripts import it as ``bench`` (``recipes/`` is on ``sys.path``), like :mod:`common`. This ``__init__`` imports
nothing, so the measuring processes load only what their row needs.
"""
