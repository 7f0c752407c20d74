"""peft's own save and load calls on adapters of our methods: atomic saves (also under SIGKILL), the umask, and
one clear error for a damaged adapter folder."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import peft.peft_model
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

import compress  # noqa: F401 - registers the methods
from compress.adapter_io import AdapterFolderError, UnknownPeftTypeError
from tests import tiny
from tests.methods import CASES, build, logits, one_case_per_method, perturb_adapters

REPO = Path(__file__).resolve().parents[1]
#: the sparse-soup case on BERT: the quickest to build
CASE = next(case for case in CASES if case.method == "SPARSE_SOUP" and case.arch == "bert")


def _saved(case, folder: Path, seed: int = 0):
    pristine, model = build(case)
    perturb_adapters(model, seed=seed)
    model.save_pretrained(folder)
    return pristine, model


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_save_that_fails_after_writing_the_weights_leaves_the_previous_adapter(tmp_path, monkeypatch):
    folder = tmp_path / "ad"
    pristine, _ = _saved(CASE, folder)
    before = _files(folder)
    _, model = build(CASE)
    perturb_adapters(model, seed=1)
    write = peft.peft_model.safe_save_file

    def write_then_fail(*args, **kwargs):
        write(*args, **kwargs)
        raise KeyboardInterrupt  # as a user's Ctrl-C between the weights and the config

    monkeypatch.setattr(peft.peft_model, "safe_save_file", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(folder)
    assert _files(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]  # the temporary folder is gone too
    PeftModel.from_pretrained(pristine, folder)


def test_a_save_over_a_folder_keeps_its_other_files_and_updates_its_card(tmp_path):
    folder = tmp_path / "ad"
    _saved(CASE, folder)
    card = folder / "README.md"
    card.write_text(card.read_text(encoding="utf-8") + "\nNotes of the user.\n", encoding="utf-8")
    mine = folder / "tokenizer.json"
    mine.write_text("{}", encoding="utf-8")
    os.chmod(mine, 0o600)
    (folder / "eval").mkdir()
    (folder / "eval" / "scores.csv").write_text("a,b\n", encoding="utf-8")
    os.chmod(folder, 0o750)
    _, model = build(CASE)
    perturb_adapters(model, seed=1)
    previous = os.umask(0o022)
    try:
        model.save_pretrained(folder)
    finally:
        os.umask(previous)
    assert "Notes of the user." in card.read_text(encoding="utf-8")  # peft updates the card; it is not replaced
    assert mine.read_text(encoding="utf-8") == "{}" and stat.S_IMODE(mine.stat().st_mode) == 0o600
    assert (folder / "eval" / "scores.csv").read_text(encoding="utf-8") == "a,b\n"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert stat.S_IMODE((folder / "adapter_model.safetensors").stat().st_mode) == 0o644  # written under umask 022
    reloaded = PeftModel.from_pretrained(tiny.make_model(CASE.arch), folder)
    torch.testing.assert_close(logits(reloaded, CASE.arch), logits(model, CASE.arch), rtol=0, atol=0)


@pytest.mark.parametrize("mask,folder_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_saved_adapter_files_follow_the_umask(tmp_path, mask, folder_mode, file_mode):
    _, model = build(CASE)
    previous = os.umask(mask)
    try:
        model.save_pretrained(tmp_path / "ad")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "ad").stat().st_mode) == folder_mode
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ad").iterdir()}
    assert "adapter_model.safetensors" in modes and set(modes.values()) == {file_mode}, modes


def test_the_next_save_removes_what_a_killed_save_left_behind(tmp_path):
    stale = tmp_path / f".ad.tmp-{_dead_pid()}-abc"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    _saved(CASE, tmp_path / "ad")
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]


def test_a_folder_holding_the_current_directory_is_written_in_place_with_a_warning(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "ad"
    folder.mkdir()
    monkeypatch.chdir(folder)
    _, model = build(CASE)
    with caplog.at_level(logging.WARNING, logger="compress.export"):
        model.save_pretrained(".")
    assert "not atomically: it holds the current directory" in caplog.text
    assert (folder / "adapter_model.safetensors").is_file() and Path.cwd() == folder


def test_other_methods_are_saved_by_peft_as_before(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a LoRA save went through compress")

    monkeypatch.setattr("compress.export.atomic_update", refuse)
    model = get_peft_model(tiny.make_model("bert"), LoraConfig(target_modules=["query"], r=2))
    model.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


def _truncate(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])


def _edit_config(**fields):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        config.update(fields)
        (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return edit


DAMAGE = {
    "truncated weights": (_truncate, AdapterFolderError, r"adapter_model\.safetensors is truncated or damaged"),
    "config not JSON": (lambda f: (f / "adapter_config.json").write_text("{peft_type: ", encoding="utf-8"),
                        AdapterFolderError, r"adapter_config\.json is not valid JSON"),
    "config a list": (lambda f: (f / "adapter_config.json").write_text("[1, 2]", encoding="utf-8"),
                      AdapterFolderError, r"adapter_config\.json holds a JSON list"),
    "unknown peft_type": (_edit_config(peft_type="SPARSE_SOUPS"), UnknownPeftTypeError,
                          r"adapter_config\.json: peft_type 'SPARSE_SOUPS' is neither a peft method"),
    "weights missing": (lambda f: (f / "adapter_model.safetensors").unlink(), AdapterFolderError,
                        r"holds no adapter_model\.safetensors, so this SPARSE_SOUP adapter has no weights"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_adapter_folder_is_one_error_naming_the_file_before_the_model_is_touched(tmp_path, damage):
    folder = tmp_path / "ad"
    _saved(CASE, folder)
    spoil, error, message = DAMAGE[damage]
    spoil(folder)
    base = tiny.make_model(CASE.arch)
    with pytest.raises(error, match=message) as caught:
        PeftModel.from_pretrained(base, folder)
    fix = "import the package that defines" if error is UnknownPeftTypeError else "save the adapter again"
    assert str(folder) in str(caught.value) and fix in str(caught.value)
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())  # nothing was injected
    if damage == "unknown peft_type":
        assert isinstance(caught.value, KeyError)  # what peft raises there

    wrapped = get_peft_model(tiny.make_model(CASE.arch), CASE.config_cls(task_type="SEQ_CLS", **CASE.kwargs))
    with pytest.raises(error, match=message):  # a second adapter, through load_adapter
        wrapped.load_adapter(folder, adapter_name="other")
    assert set(wrapped.peft_config) == {"default"}


KILLED_SAVE = """
import os, signal, sys
import peft.peft_model
from tests.methods import CASES, build, perturb_adapters

case = next(c for c in CASES if c.id == sys.argv[1])
_, model = build(case)
perturb_adapters(model, seed=1)
write = peft.peft_model.safe_save_file

def write_then_die(*args, **kwargs):
    write(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

peft.peft_model.safe_save_file = write_then_die
model.save_pretrained(sys.argv[2])
"""


@pytest.mark.slow
@pytest.mark.parametrize("case", one_case_per_method(), ids=lambda case: case.method)
def test_an_adapter_save_killed_after_writing_the_weights_leaves_the_previous_adapter(case, tmp_path):
    folder = tmp_path / "ad"
    pristine, _ = _saved(case, folder)
    before = _files(folder)
    expected = logits(PeftModel.from_pretrained(pristine, folder), case.arch)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", KILLED_SAVE, case.id, str(folder)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert _files(folder) == before
    reloaded = PeftModel.from_pretrained(tiny.make_model(case.arch), folder)
    assert torch.equal(logits(reloaded, case.arch), expected)
    assert len(list(tmp_path.iterdir())) == 2  # the killed save's temporary folder, until the next save
    _saved(case, folder, seed=2)
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]
