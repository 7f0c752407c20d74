"""What the demo, the recipes and the benchmarks share: application code, not part of the installed package.

- :mod:`common.recipe`: offline and quiet set-up, data paths (``../shared/data`` beside the checkout, else the
  shipped SST-2 sample), the latency batch, the recipes' flags, config files and run folders;
- :mod:`common.train`: load the packaged MiniLM with a seeded head, fine-tune with the ``Trainer``,
  predict with ``Trainer.predict``, accuracy and GLUE metrics;
- :mod:`common.latency`: inference latency (medians of timed forward calls, several models interleaved);
- :mod:`common.memory`: peak training memory of a configuration, measured in a fresh subprocess;
- :mod:`common.pruning_adapter`, :mod:`common.ladder_side`, :mod:`common.multi_exit`: what each method's recipe
  and benchmark share, and their training-memory factories (importable by the measuring subprocess).

The scripts in ``recipes/`` import it as ``common`` (Python puts a script's folder first on ``sys.path``; the
test suite adds ``recipes/`` through pytest's ``pythonpath``). The library never imports it. This ``__init__``
imports nothing, so importing one module here does not load the others.
"""
