"""Saving artifacts: what ``overwrite`` may replace, permissions, and what an interrupted save leaves."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from transformers import AutoModelForSequenceClassification

import compress
from compress import export
from compress.errors import OutputFolderError
from compress.export import atomic_directory, is_compress_output, write_text_atomically
from tests import tiny


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_overwrite_replaces_only_our_own_outputs(tmp_path):
    model = tiny.make_model("bert")
    ours = compress.save_pretrained(model, tmp_path / "ours")
    assert is_compress_output(ours)
    compress.save_pretrained(model, ours, overwrite=True)

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "results.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(OutputFolderError, match="was not written by peft-compress"):
        compress.save_pretrained(model, theirs, overwrite=True)
    assert (theirs / "results.csv").read_text(encoding="utf-8") == "a,b\n"

    # a plain transformers folder is not ours either, whatever it holds
    model.save_pretrained(tmp_path / "plain")
    assert not is_compress_output(tmp_path / "plain")


def test_overwrite_never_deletes_the_model_being_saved_from(tmp_path, monkeypatch):
    compress.save_pretrained(tiny.make_model("bert"), tmp_path / "nest" / "source")
    (tmp_path / "nest" / "compress_report.json").write_text("{}", encoding="utf-8")  # looks like ours
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "nest" / "source")
    with pytest.raises(OutputFolderError, match="contains .*source"):
        compress.save_pretrained(model, tmp_path / "nest", overwrite=True)
    assert (tmp_path / "nest" / "source" / "model.safetensors").is_file()

    monkeypatch.chdir(tmp_path / "nest")
    with pytest.raises(OutputFolderError, match="the current directory"):
        compress.save_pretrained(tiny.make_model("bert"), tmp_path / "nest", overwrite=True)


@pytest.mark.parametrize("mask,folder_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_saved_folder_follows_the_umask(tmp_path, mask, folder_mode, file_mode):
    previous = os.umask(mask)
    try:
        out = compress.save_pretrained(tiny.make_model("bert"), tmp_path / "out")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == folder_mode
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes and set(modes.values()) == {file_mode}, modes


def test_next_save_removes_temporaries_of_a_killed_save(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".out.tmp-{dead}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".out.tmp-{os.getpid()}-live"  # a save in progress in a running process
    live.mkdir()
    compress.save_pretrained(tiny.make_model("bert"), tmp_path / "out")
    assert not stale.exists()
    assert live.exists()


def test_a_save_killed_between_its_renames_gets_the_previous_output_back(tmp_path):
    previous = compress.save_pretrained(tiny.make_model("bert"), tmp_path / "out")
    backup = tmp_path / f".out.old-{_dead_pid()}-xyz"
    backup.mkdir()
    os.replace(previous, backup / "out")  # the killed save had moved the old output aside
    with pytest.raises(OutputFolderError, match="already exists"):
        compress.save_pretrained(tiny.make_model("bert"), tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file() and not backup.exists()


def test_a_run_losing_the_race_is_told_the_option_its_caller_uses(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputFolderError, match="--overwrite"):
        with atomic_directory(out, option="--overwrite") as tmp:
            (tmp / "a").write_text("mine", encoding="utf-8")
            out.mkdir()  # another run finished first
            (out / "b").write_text("theirs", encoding="utf-8")
    assert (out / "b").read_text(encoding="utf-8") == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _tagged_card(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text("---\ntags:\n- peft-compress\n---\n# card\n", encoding="utf-8")


def test_overwrite_never_replaces_an_adapter_with_a_model_or_any_training_state(tmp_path):
    model = tiny.make_model("bert")
    adapter = tmp_path / "adapter"  # Pruning-Adapter's saved adapters carry our tag in their card
    _tagged_card(adapter)
    (adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    assert is_compress_output(adapter)
    with pytest.raises(OutputFolderError, match="holds a PEFT adapter"):
        compress.save_pretrained(model, adapter, overwrite=True)
    assert (adapter / "adapter_config.json").is_file()
    with atomic_directory(adapter, overwrite=True, writes_adapter=True) as tmp:  # a new adapter may replace it
        (tmp / "adapter_config.json").write_text('{"new": 1}', encoding="utf-8")
    assert (adapter / "adapter_config.json").read_text(encoding="utf-8") == '{"new": 1}'

    run = tmp_path / "run"  # a Trainer output folder: model card, trainer state, checkpoints
    _tagged_card(run)
    (run / "checkpoint-10").mkdir()
    for writes_adapter in (False, True):
        with pytest.raises(OutputFolderError, match="training state"):
            with atomic_directory(run, overwrite=True, writes_adapter=writes_adapter):
                pass
    assert (run / "checkpoint-10").is_dir()


def test_a_replacement_is_one_exchange_of_the_two_folders(tmp_path, monkeypatch):
    out = compress.save_pretrained(tiny.make_model("bert"), tmp_path / "out")
    (out / "marker").write_text("previous", encoding="utf-8")
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renames.append(dst) or real_replace(src, dst))
    compress.save_pretrained(tiny.make_model("bert", seed=1), out, overwrite=True)
    assert renames == [] and not (out / "marker").exists()  # no moment without a folder at `out`
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_exception_between_the_renames_puts_the_previous_output_back(tmp_path, monkeypatch):
    # where the system cannot exchange two folders, the previous one is moved aside, then the new one in
    monkeypatch.setattr(export, "_exchange", lambda a, b: False)
    out = compress.save_pretrained(tiny.make_model("bert"), tmp_path / "out")
    before = (out / "model.safetensors").read_bytes()
    real_replace = os.replace
    calls = []

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old output is aside, the new one not yet in place
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compress.save_pretrained(tiny.make_model("bert", seed=1), out, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden .tmp or .old folders


def test_a_text_file_is_replaced_whole_with_the_umask_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    path.write_text("old", encoding="utf-8")
    stale = tmp_path / f".metrics.json.tmp-{_dead_pid()}-abc"  # left by a killed write
    stale.write_text("half", encoding="utf-8")
    real_replace = os.replace

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomically(path, "new")
    assert path.read_text(encoding="utf-8") == "old" and not stale.exists()
    monkeypatch.setattr(os, "replace", real_replace)
    previous = os.umask(0o027)
    try:
        write_text_atomically(path, "new")
    finally:
        os.umask(previous)
    assert path.read_text(encoding="utf-8") == "new" and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
