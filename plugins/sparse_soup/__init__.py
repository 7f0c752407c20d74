"""Sparse model soups: fine-tuning under one fixed sparsity mask, so that fine-tunes from the same sparse start
average into a soup that keeps the mask.

After "Sparse Model Soups: A Recipe for Improved Pruning via Model Averaging" (Zimmer, Spiegel, Pokutta,
ICLR 2024); ``wanda`` importance after Sun et al., "A Simple and Effective Pruning Approach for Large Language
Models" (2023). The method's adapter is ``config``/``layer``/``mask``/``importance``/``model``; averaging is
``soup`` (``make_soup``), prune-retrain cycles ``cycles`` (``run_sparse_soup``), the compact sparse file
``format`` (``save_sparse``/``load_sparse``).
"""

from __future__ import annotations

from compress.hub import register_folder_check, register_folder_format
from compress.registry import register_method

from .checks import check_saved_folder
from .config import SPARSE_SOUP, SparseSoupConfig, parse_n_m
from .cycles import SoupRun, run_sparse_soup
from .format import SPARSE_WEIGHTS, load_sparse, save_sparse
from .layer import SparseLinear, SparseLoraLinear, SparseMask
from .mask import masks_from_scores, n_m_mask
from .model import SparseSoupModel
from .soup import make_soup

__all__ = [
    "SPARSE_SOUP",
    "SoupRun",
    "SparseLinear",
    "SparseLoraLinear",
    "SparseMask",
    "SparseSoupConfig",
    "SparseSoupModel",
    "apply_sparse_soup",
    "load_sparse",
    "make_soup",
    "masks_from_scores",
    "n_m_mask",
    "parse_n_m",
    "run_sparse_soup",
    "save_sparse",
]

register_method(SPARSE_SOUP, SparseSoupConfig, SparseSoupModel, prefix=SparseSoupModel.prefix)
register_folder_check(SPARSE_SOUP, check_saved_folder)
register_folder_format("sparse", SPARSE_WEIGHTS, load_sparse)


def apply_sparse_soup(model, config: SparseSoupConfig, data=None, tokenizer=None, num_batches: int = 8,
                      batch_size: int = 8):
    """``get_peft_model`` plus, for ``importance="wanda"``, the masks from calibration ``data`` (the function
    form of the method). Returns the ``PeftModel``."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, config)
    if config.importance == "wanda":
        peft_model.base_model.prune(data=data, tokenizer=tokenizer, num_batches=num_batches, batch_size=batch_size)
    return peft_model
