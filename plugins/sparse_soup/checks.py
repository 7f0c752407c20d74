"""What ``compress push`` (:func:`compress.hub.check_folder`) checks in a saved sparse-soup adapter without the base
model: the low-rank pairs of ``train="lora"`` against ``r``, each mask against the weight it masks, and the masks
against the checksums saved with them and the config's sparsity and pattern (:func:`.model.check_saved_adapter`)."""

from __future__ import annotations

from pathlib import Path

from compress.hub import ADAPTER_WEIGHTS, low_rank_problems


def check_saved_folder(folder: Path, config, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The shape problems of a saved sparse-soup adapter, one line each (``config``: its
    :class:`~.config.SparseSoupConfig`; ``shapes``: each saved tensor's shape).

    Raises:
        CompressError: a mask disagrees with its saved checksum or with the config's sparsity or pattern.
    """
    problems = low_rank_problems(config, shapes, prefixes=("sparse", "lora"))
    if not problems:
        from safetensors.torch import load_file

        from .model import check_saved_adapter

        check_saved_adapter(load_file(folder / ADAPTER_WEIGHTS), config)
    return problems
