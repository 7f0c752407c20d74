"""Shared fixtures: tiny random Hugging Face models built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tests import tiny  # noqa: E402

# Tiny models compute fastest on one thread; a second OpenMP thread spin-waits, which makes them many times
# slower whenever other processes share the cores. Subprocesses get OMP_NUM_THREADS=1 from their tests.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=tiny.ARCHITECTURES)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest on one thread, which also keeps them fast when other processes share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
