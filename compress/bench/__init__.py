"""Application code: the demo, and the training, evaluation and set-up helpers of the recipes and benchmarks.

- :mod:`compress.bench.demo`: ``python -m compress.bench.demo`` (``./run.sh demo``);
- :mod:`compress.bench.train`: load the packaged MiniLM with a seeded head, fine-tune with the ``Trainer``,
  predict with ``Trainer.predict``, accuracy and GLUE metrics;
- :mod:`compress.bench.recipe`: what every recipe shares: offline and quiet set-up, data paths
  (``../shared/data`` beside the checkout, else the shipped SST-2 sample), the latency batch;
- :mod:`compress.bench.pruning_adapter`: the Pruning-Adapter recipe's configurations and the benchmark's
  training-memory factory (importable by the measuring subprocess);
- :mod:`compress.bench.head_warmup`: ``warm_up_head``, fitting a new task head before a oneshot prune.

The library (``compress`` minus this subpackage) never imports it, and ``import compress`` does not load it.
This ``__init__`` imports nothing, so importing one module here does not load the others.
"""
