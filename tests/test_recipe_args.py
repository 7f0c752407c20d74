"""What a recipe checks before any work: the values of its ``--config`` file (as argparse checks flags) and its run
folder ``--out`` (the overwrite rule of every save)."""

from __future__ import annotations

import argparse
import json

import pytest

from common.recipe import RUN_CARD, add_data_arguments, claim_run_folder, finish_run, parse_recipe_args
from compress.export import is_compress_output


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Recipe: a test.")
    add_data_arguments(p)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--side-layers", type=int, nargs="+", default=None)
    p.add_argument("--schedule", choices=["oneshot", "progressive"], default="progressive")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--start", default=None)
    return p


def _parse(tmp_path, text: str, *argv: str) -> argparse.Namespace:
    (tmp_path / "run.yaml").write_text(text, encoding="utf-8")
    return parse_recipe_args(_parser(), ["--config", str(tmp_path / "run.yaml"), *argv])


@pytest.mark.parametrize(("text", "message"), [
    ("batch_size: true\n", "batch_size=True is not an integer, as --batch-size expects"),
    ("steps: 2.5\n", "steps=2.5 is not an integer, as --steps expects"),
    ("lr: fast\n", "lr='fast' is not a number, as --lr expects"),
    ("group_by_length: 'no'\n", "group_by_length='no' is not true or false, as --group-by-length expects"),
    ("activation_checkpointing: 1\n", "activation_checkpointing=1 is not true or false"),
    ("side_layers: [1, 2.5]\n", "side_layers=[1, 2.5] is not an integer each, as --side-layers expects"),
    ("side_layers: []\n", "side_layers=[] is not one value or more"),
    ("seed: [1, 2]\n", "seed=[1, 2] is not a single value, as --seed expects"),
    ("steps: null\n", "steps=None is not null (it has a default: 1000)"),
    ("schedule: {a: 1}\n", "schedule={'a': 1} is not text, as --schedule expects"),
])
def test_a_config_value_of_the_wrong_type_is_one_error_naming_the_file_key_and_type(tmp_path, capsys, text, message):
    with pytest.raises(SystemExit) as exit_info:
        _parse(tmp_path, text)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{tmp_path / 'run.yaml'}: {message}" in err, err


def test_config_values_are_converted_as_the_flags_text_would_be(tmp_path):
    args = _parse(tmp_path, "lr: 1e-4\nside_layers: 3\ntrain_rows: null\nsteps: '7'\ngroup_by_length: false\n"
                            "activation_checkpointing: true\nseed: 4\n", "--seed", "5")
    assert (args.lr, args.side_layers, args.train_rows, args.steps) == (1e-4, [3], None, 7)
    assert (args.group_by_length, args.activation_checkpointing, args.seed) == (False, True, 5)


def _recipe(*argv: str) -> argparse.Namespace:
    """What a recipe does first: parse, check its own options, claim the run folder."""
    p = _parser()
    p.add_argument("--out")
    args = parse_recipe_args(p, list(argv))
    if args.steps < 1:  # a recipe's own check, after parsing
        p.error("--steps must be positive")
    claim_run_folder(args, p.description)
    return args


def _users_folder(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "metrics.json").write_text('{"mine": 1}', encoding="utf-8")
    (folder / "resolved_config.json").write_text('{"mine": 2}', encoding="utf-8")
    return folder


@pytest.mark.parametrize(("overwrite", "message"), [
    ((), "--out {} already exists; choose another folder or pass --overwrite"),
    (("--overwrite",), "--out {} exists and was not written by peft-compress"),
])
def test_a_run_refuses_a_folder_of_the_users_before_any_work(tmp_path, capsys, monkeypatch, overwrite, message):
    folder = _users_folder(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        _recipe("--out", str(folder), *overwrite)
    assert exit_info.value.code == 2 and message.format(folder) in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json", "resolved_config.json"]
    assert (folder / "metrics.json").read_text(encoding="utf-8") == '{"mine": 1}'
    # the other processes of a torchrun job leave the check to the main one (they would find its card)
    monkeypatch.setenv("RANK", "1")
    _recipe("--out", str(folder), *overwrite)
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json", "resolved_config.json"]


def test_a_run_folder_is_claimed_and_replaced_only_with_overwrite(tmp_path, capsys):
    folder = tmp_path / "run"
    args = _recipe("--out", str(folder))
    assert is_compress_output(folder) and "Recipe: a test." in (folder / RUN_CARD).read_text(encoding="utf-8")
    finish_run(folder, args, {"test_accuracy": 0.5})
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(SystemExit):
        _recipe("--out", str(folder))
    assert "pass --overwrite" in capsys.readouterr().err and (folder / "metrics.json").is_file()

    args = _recipe("--out", str(folder), "--overwrite")  # the earlier run is replaced: nothing of it is left
    assert sorted(p.name for p in folder.iterdir()) == [RUN_CARD] and args.overwrite
    finish_run(folder, args, {"test_accuracy": 0.75})
    assert "overwrite" not in json.loads((folder / "resolved_config.json").read_text(encoding="utf-8"))


def test_a_run_never_empties_a_folder_holding_one_of_its_inputs(tmp_path, capsys):
    folder = tmp_path / "run"
    _recipe("--out", str(folder))
    (folder / "dense").mkdir()  # e.g. the fine-tuned start of an earlier run
    (folder / "run.yaml").write_text("steps: 5\n", encoding="utf-8")
    for argv in (["--start", str(folder / "dense")], ["--config", str(folder / "run.yaml")]):
        with pytest.raises(SystemExit):
            _recipe("--out", str(folder), "--overwrite", *argv)
        assert "an input of this run; replacing it would delete it" in capsys.readouterr().err
    assert (folder / "dense").is_dir() and (folder / "run.yaml").is_file()


def test_a_run_refused_for_its_own_options_leaves_no_run_folder(tmp_path):
    with pytest.raises(SystemExit):
        _recipe("--out", str(tmp_path / "run"), "--steps", "0")
    assert not (tmp_path / "run").exists()
    _recipe("--out", str(tmp_path / "run"))  # corrected, the same command goes through


def test_a_run_refuses_an_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("", encoding="utf-8")
    with pytest.raises(SystemExit):
        _recipe("--out", str(tmp_path / "out"))
    assert "is a file, not a folder" in capsys.readouterr().err



def test_a_benchmark_report_is_replaced_whole(tmp_path, monkeypatch):
    import os

    from common.recipe import write_report

    report = tmp_path / "bench.md"
    write_report("recipes/bench_x.py", ["--steps", "3"], "| a |", report)
    before = report.read_text(encoding="utf-8")
    assert before.startswith("# bench_x\n\n`python recipes/bench_x.py --steps 3`")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_report("recipes/bench_x.py", [], "| b |", report)
    assert report.read_text(encoding="utf-8") == before and [p.name for p in tmp_path.iterdir()] == ["bench.md"]
