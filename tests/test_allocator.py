"""compress._allocator: CPU training on pruned (uneven) shapes does not hoard freed heap memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from compress.plugins.pruning_adapter import model as pa_model
from peft import get_peft_model

import compress
from compress import _allocator
from tests import tiny

needs_glibc = pytest.mark.skipif(_allocator._glibc() is None, reason="needs Linux with glibc")

# 40 large blocks of varied sizes (4-16 MB) with 400 KB blocks that stay alive between them; after a first
# 4 MB free has raised glibc's dynamic mmap threshold, the large blocks come from the heap by default
_PROBE = textwrap.dedent("""
    import sys, torch
    from compress._allocator import map_large_cpu_allocations
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    if sys.argv[1] == "map":
        assert map_large_cpu_allocations()
    torch.ones(1 << 20).sum()
    keep, large = [], []
    for i in range(40):
        large.append(torch.ones(1 << (20 + i % 3)))
        keep.append(torch.ones(100_000 + i))
    allocated = sum(t.numel() * 4 for t in large) / 2**20
    before = rss()
    del large
    print((before - rss()) / allocated)
""")


def _released_fraction(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         env={"PATH": "", "PYTHONPATH": ":".join(sys.path)})
    return float(out.stdout.split()[-1])


@needs_glibc
@pytest.mark.slow
def test_mapped_large_blocks_go_back_to_the_os_when_freed():
    # default glibc keeps about a sixth of these in its arenas (0.84 released); mapped blocks all go back
    assert _released_fraction("map") > 0.95


def test_without_glibc_both_calls_report_false(monkeypatch):
    monkeypatch.setattr(_allocator, "_glibc", lambda: None)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert _allocator.release_freed_memory() is False
    assert _allocator.map_large_cpu_allocations.__wrapped__(1 << 20) is False


def test_a_user_set_mmap_threshold_is_left_alone(monkeypatch):
    def no_libc_call():
        raise AssertionError("mallopt must not be called when MALLOC_MMAP_THRESHOLD_ is set")

    monkeypatch.setattr(_allocator, "_glibc", no_libc_call)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert _allocator.map_large_cpu_allocations.__wrapped__(1 << 20) is True


def test_pruning_on_cpu_maps_large_blocks_and_trims(monkeypatch):
    calls = []
    monkeypatch.setattr(pa_model, "map_large_cpu_allocations", lambda: calls.append("map"))
    monkeypatch.setattr(pa_model, "release_freed_memory", lambda: calls.append("trim"))
    config = compress.PruningAdapterConfig(task_type="SEQ_CLS", r=4, sparsity={"ffn": 0.5, "heads": 0.5},
                                           mode="global")
    model = get_peft_model(tiny.make_model("bert"), config)
    assert calls == []
    model.base_model.prune(data=tiny.make_batches("bert", 2))
    assert calls == ["map", "trim"]
