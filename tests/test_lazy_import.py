"""``import compress`` imports nothing heavy, yet registers our PEFT methods and model classes before peft or
transformers can look for them (``compress._registration``); every public name resolves on first use."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import compress

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "datasets")


def test_every_public_name_resolves_and_is_listed():
    for name in compress.__all__:
        assert getattr(compress, name) is not None, name
    assert set(compress.__all__) <= set(dir(compress))
    assert compress.export.save_pretrained is compress.save_pretrained  # the package's modules, as attributes
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        compress.nothing_here  # noqa: B018


def _python(code: str) -> subprocess.CompletedProcess:
    script = "import sys, warnings\nwarnings.simplefilter('error', RuntimeWarning)\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_import_compress_is_light_and_registers_when_peft_is_imported():
    done = _python(f"""
        import compress
        heavy = [name for name in {HEAVY!r} if name in sys.modules]
        assert not heavy, heavy
        from peft import PeftConfig
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        assert {{"PRUNING_ADAPTER", "LADDER_SIDE", "MULTI_EXIT", "SPARSE_SOUP"}} <= set(PEFT_TYPE_TO_CONFIG_MAPPING)
        from transformers import AutoConfig
        assert type(AutoConfig.for_model("compressed_bert")).__name__ == "CompressedBertConfig"
        assert type(AutoConfig.for_model("multi_exit")).__name__ == "MultiExitClassifierConfig"
    """)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_registration_follows_transformers_and_compress_modules_whatever_the_order():
    """transformers alone (the compact Auto classes are needed before any peft import); a module of compress that
    imports transformers itself (registration waits until that module is complete); compress after transformers."""
    for code in ("import compress\nfrom transformers import AutoConfig",
                 "import compress.export\nfrom transformers import AutoConfig",
                 "from transformers import AutoConfig\nimport compress"):
        done = _python(code + textwrap.dedent("""
            from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
            from compress import _registration
            assert _registration.is_registered() and "SPARSE_SOUP" in PEFT_TYPE_TO_CONFIG_MAPPING
            assert type(AutoConfig.for_model("compressed_llama")).__name__ == "CompressedLlamaConfig"
            assert _registration._FINDER not in sys.meta_path  # nothing left behind once registered
        """))
        assert done.returncode == 0, (code, done.stderr[-3000:])


def test_the_former_path_of_warm_up_head_warns_and_gives_the_same_function():
    sys.modules.pop("compress.bench.head_warmup", None)
    with pytest.warns(FutureWarning, match=r"compress\.bench\.head_warmup is deprecated .*from compress import "
                                           "warm_up_head"):
        from compress.bench.head_warmup import warm_up_head
    assert warm_up_head is compress.warm_up_head
