"""The application code in recipes/ (the recipes' shared package ``common``): kept apart from the library, its
shared recipe helper, and the benchmarks' memory tables (with the subprocess measurement replaced by known
figures)."""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import recipe
from common.memory import TrainingMemoryResult

ROOT = Path(__file__).resolve().parents[1]


# ---- library vs application --------------------------------------------------------------------------


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


#: what a module of recipes/ can be imported as: the shared package and every script, as ``recipes.<name>`` or, with
#: recipes/ on sys.path as the scripts have it, by its own name
APPLICATION = ("recipes", "common", "bench", *(p.stem for p in (ROOT / "recipes").glob("*.py")))


def test_library_imports_no_application_code():
    library = [p for folder in ("compress", "plugins") for p in (ROOT / folder).rglob("*.py")]
    assert len(library) > 10 and "demo" in APPLICATION and "bench_prune" in APPLICATION
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imported_modules(p)
                                                  if m.split(".")[0] in APPLICATION)
                 for p in library}
    assert {path: mods for path, mods in offenders.items() if mods} == {}
    assert not (ROOT / "compress" / "bench" / "demo.py").exists()  # the demo is a script of recipes/


@pytest.mark.slow
def test_the_library_loads_no_application_module_even_where_it_could():
    code = ("import sys, compress, compress.plugins, compress.cli.prune, compress.hub; "
            f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {APPLICATION!r} or "
            "m.startswith('compress.bench')); assert not loaded, loaded; "
            # the file formats are the command line's and the recipes': the methods' code does not load them
            "formats = sorted(m for m in sys.modules if m in ('compress.data.files', 'compress.data.glue', "
            "'compress.data.parse')); assert not formats, formats")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "recipes"), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_package_folder_is_in_the_wheel():
    """setup.py lists what the wheel ships: every package folder under compress/ and plugins/ (a new method's
    plugins/<name>/ included, with no edit anywhere), and compress/_data."""
    import runpy

    import setuptools

    captured: dict = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
        patch.chdir(ROOT)
        runpy.run_path(str(ROOT / "setup.py"))
    expected = {"compress._data"}
    for name, folder in captured["package_dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                expected.add(".".join((name, *init.parent.relative_to(ROOT / folder).parts)))
    assert {"compress.measure", "compress.data", "compress.cli", "compress.plugins.pruning_adapter"} <= expected
    assert set(captured["packages"]) == expected
    assert not [name for name in captured["packages"] if name.split(".")[0] in ("recipes", "common")]  # not shipped


# ---- the shared recipe helper ------------------------------------------------------------------------


def _write_glue(folder: Path, rows: int = 6) -> None:
    folder.mkdir(parents=True)
    for split in ("train", "dev"):
        lines = ["sentence\tlabel"] + [f"{split} sentence number {i}\t{i % 2}" for i in range(rows)]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_load_splits_falls_back_to_the_shipped_sample_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(recipe, "SHARED_DATA", tmp_path / "absent")
    with caplog.at_level(logging.WARNING, logger="common.recipe"):
        train, test, source = recipe.load_splits()
    assert (len(train), len(test)) == (2000, 872)
    assert "shipped" in source and str(tmp_path / "absent" / "sst2") in source
    assert "using the SST-2 sample shipped" in caplog.text


def test_load_splits_reads_a_glue_task_with_dev_as_test_and_subsamples_with_the_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "SHARED_DATA", tmp_path)
    _write_glue(tmp_path / "glue" / "CoLA", rows=10)
    train, test, source = recipe.load_splits("CoLA")
    assert len(train) == 10 and test[0]["text"].startswith("dev ") and str(tmp_path / "glue" / "CoLA") in source
    first, _, _ = recipe.load_splits("CoLA", train_rows=4, seed=1)
    again, _, _ = recipe.load_splits("CoLA", train_rows=4, seed=1)
    other, _, _ = recipe.load_splits("CoLA", train_rows=4, seed=2)
    assert len(first) == 4 and first["text"] == again["text"] and first["text"] != other["text"]
    with pytest.raises(FileNotFoundError, match="RTE"):
        recipe.load_splits("RTE")  # an asked-for task never falls back to the SST-2 sample
    with pytest.raises(FileNotFoundError, match="nowhere"):
        recipe.load_splits(data=tmp_path / "nowhere")


def test_load_splits_of_an_explicit_folder_prefers_its_test_split(tmp_path):
    _write_glue(tmp_path / "mine")
    (tmp_path / "mine" / "test.tsv").write_text("sentence\tlabel\ntest row\t1\n", encoding="utf-8")
    _, test, _ = recipe.load_splits(data=tmp_path / "mine")
    assert test["text"] == ["test row"]


def test_latency_inputs_fill_the_whole_batch_with_real_rows():
    from tests.test_train import make_tokenizer

    batch = recipe.latency_inputs(make_tokenizer(), ["good w1", "bad w2 w3"], pairs=["w4", "w5"], batch_size=5,
                                  seq_len=12)
    assert batch["input_ids"].shape == (5, 12) and batch["attention_mask"].shape == (5, 12)
    assert batch["input_ids"][0].tolist() == batch["input_ids"][2].tolist() != batch["input_ids"][1].tolist()
    assert batch["attention_mask"].sum(dim=1).tolist() == [6, 7, 6, 7, 6]  # [CLS] text [SEP] pair [SEP]


def test_setup_run_sets_offline_defaults_for_subprocesses_without_overriding_the_caller(monkeypatch):
    for key in recipe.OFFLINE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    recipe.setup_run(verbose=True)
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"


# ---- the Pruning-Adapter benchmark's memory table ------------------------------------------------------


def _measured(job, increase_mb: float) -> TrainingMemoryResult:
    """A memory measurement of ``job`` that found ``increase_mb`` over a 500 MB baseline."""
    return TrainingMemoryResult(factory=job.factory, steps=job.steps, peak_rss_mb=500 + increase_mb,
                                baseline_rss_mb=500, increase_mb=increase_mb, load_peak_rss_mb=500, hwm_reset=True,
                                step_time_mean_s=0.1, step_time_median_s=0.1, first_step_s=0.1, trainable_params=1,
                                total_params=1, device="cpu")


def test_benchmark_memory_ratios_are_against_the_lora_and_full_rows(tmp_path, monkeypatch, capsys):
    from recipes import bench_pruning_adapter

    monkeypatch.setattr(recipe, "SHARED_DATA", tmp_path)  # the shipped sample: quick to load
    increase = {("full", False): 300.0, ("lora", False): 200.0, ("pa-oneshot", False): 100.0,
                ("full", True): 150.0, ("lora", True): 100.0, ("pa-oneshot", True): 50.0}
    jobs = []

    def fake_measure(job):
        jobs.append(job)
        return _measured(job, increase[job.kwargs["kind"], job.kwargs["activation_checkpointing"]])

    monkeypatch.setattr(bench_pruning_adapter, "peak_training_memory", fake_measure)
    md = tmp_path / "bench.md"
    assert bench_pruning_adapter.main(["--memory-only", "--kinds", "pa-oneshot", "lora", "full", "--mem-steps", "2",
                                       "--sparsity", "ffn=0.3", "--md", str(md)]) == 0
    # each configuration measured as configured, by a factory the measuring subprocess can import
    assert {job.factory for job in jobs} == {"common.pruning_adapter:memory_job"}
    assert all(job.kwargs["sparsity"] == "ffn=0.3" and job.steps == 2 for job in jobs)
    rows = {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in md.read_text().splitlines()
             if line.startswith(("| full", "| lora", "| pa-")))}
    # columns: train mem +MB, x LoRA, x full; rows in KINDS order, +ckpt rows against the rows without it
    assert [rows[k][:3] for k in ("full", "lora", "pa-oneshot")] == [
        ["300", "1.50", "1.00"], ["200", "1.00", "0.67"], ["100", "0.50", "0.33"]]
    assert rows["pa-oneshot +ckpt"][:3] == ["50", "0.25", "0.17"]
    assert list(rows) == ["full", "lora", "pa-oneshot", "full +ckpt", "lora +ckpt", "pa-oneshot +ckpt"]
    assert "[pa-oneshot] memory: +100 MB over 500 MB" in capsys.readouterr().out


def test_benchmark_runs_every_pruning_adapter_kind_once_more_per_also_sparsity(tmp_path, monkeypatch, capsys):
    from recipes import bench_pruning_adapter

    monkeypatch.setattr(recipe, "SHARED_DATA", tmp_path)
    measured = []

    def fake_measure(job):
        measured.append((job.kwargs["kind"], job.kwargs["sparsity"]))
        mb = {"lora": 200.0, "pa-oneshot": 100.0}[job.kwargs["kind"]] / (2 if "hidden" in job.kwargs["sparsity"] else 1)
        return _measured(job, mb)

    monkeypatch.setattr(bench_pruning_adapter, "peak_training_memory", fake_measure)
    md = tmp_path / "bench.md"
    assert bench_pruning_adapter.main(["--memory-only", "--kinds", "lora", "pa-oneshot", "--sparsity", "ffn=0.5",
                                       "--also-sparsity", "ffn=0.5,hidden=0.25", "--no-checkpointed-memory",
                                       "--md", str(md)]) == 0
    # LoRA once (its sparsity is unused), Pruning-Adapter once per sparsity
    assert measured == [("lora", "ffn=0.5"), ("pa-oneshot", "ffn=0.5"), ("pa-oneshot", "ffn=0.5,hidden=0.25")]
    rows = {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in md.read_text().splitlines()
             if line.startswith(("| lora", "| pa-")))}
    assert rows["pa-oneshot (ffn=0.5,hidden=0.25)"][:2] == ["50", "0.25"]
    assert rows["pa-oneshot"][:2] == ["100", "0.50"]


def test_benchmark_refuses_a_bad_also_sparsity_before_any_work(tmp_path, capsys):
    from recipes import bench_pruning_adapter

    with pytest.raises(SystemExit) as exc:
        bench_pruning_adapter.main(["--also-sparsity", "ffn=2", "--md", str(tmp_path / "b.md")])
    assert exc.value.code == 2 and "--also-sparsity ffn=2" in capsys.readouterr().err


def test_benchmark_refuses_memory_only_without_memory(tmp_path, capsys):
    from recipes import bench_pruning_adapter

    with pytest.raises(SystemExit) as exc:
        bench_pruning_adapter.main(["--memory-only", "--no-memory", "--md", str(tmp_path / "b.md")])
    assert exc.value.code == 2 and "leaves nothing to measure" in capsys.readouterr().err


# ---- the Ladder Side-Tuning benchmark's memory tables ---------------------------------------------------


def test_ladder_side_benchmark_ratios_and_sequence_length_sweep(tmp_path, monkeypatch):
    from recipes import bench_ladder_side

    monkeypatch.setattr(recipe, "SHARED_DATA", tmp_path)
    increase = {"full": 400.0, "lora": 300.0, "lst-r8": 100.0}
    jobs = []

    def fake_measure(job):
        jobs.append(job)
        return _measured(job, increase[job.kwargs["kind"]] * job.kwargs["seq_len"] / 128)

    monkeypatch.setattr(bench_ladder_side, "peak_training_memory", fake_measure)
    md = tmp_path / "bench.md"
    assert bench_ladder_side.main(["--memory-only", "--kinds", "lst-r8", "full", "lora", "--mem-steps", "2",
                                   "--seq-lens", "64", "256", "--md", str(md)]) == 0
    assert {job.factory for job in jobs} == {"common.ladder_side:memory_job"}
    assert [(j.kwargs["kind"], j.kwargs["seq_len"]) for j in jobs][3:] == [
        ("full", 64), ("full", 256), ("lora", 64), ("lora", 256), ("lst-r8", 64), ("lst-r8", 256)]
    lines = md.read_text().splitlines()
    header = next(line for line in lines if "+MB @ 64" in line)
    rows = {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[:lines.index(header)]
             if line.startswith("| "))}
    # main table (KINDS order): train mem +MB, x full, x LoRA; the sweep table: +MB per sequence length
    assert [rows[k][:3] for k in ("full", "lora", "lst-r8")] == [
        ["400", "1.00", "1.33"], ["300", "0.75", "1.00"], ["100", "0.25", "0.33"]]
    assert "+MB @ 256" in header
    sweep = [[c.strip() for c in line.strip("|").split("|")] for line in lines[lines.index(header) + 2:]
             if line.startswith("| ")]
    assert sweep == [["full", "200", "800"], ["lora", "150", "600"], ["lst-r8", "50", "200"]]


@pytest.mark.slow  # trains four tiny models with the Trainer
def test_multi_exit_benchmark_rows_ratios_and_plot(tmp_path, monkeypatch):
    """The whole benchmark on a tiny 4-block BERT and toy data: a dense row, one row per chosen threshold of
    each configuration, speedups against the dense row, and the plot."""
    from recipes import bench_multi_exit
    from tests.test_multi_exit import make_encoder
    from tests.test_train import make_dataset, make_tokenizer

    def tiny_classifier(path, num_labels=2, seed=0):
        return make_encoder(seed=seed, num_labels=num_labels), make_tokenizer()

    from common import multi_exit

    for module in (bench_multi_exit, multi_exit):
        monkeypatch.setattr(module, "load_sequence_classifier", tiny_classifier)
        monkeypatch.setattr(module, "minilm_path", lambda: "unused")
    monkeypatch.setattr(bench_multi_exit, "load_splits",
                        lambda *a, **k: (make_dataset(96, seed=1), make_dataset(40, seed=2), "toy rows"))
    md, png = tmp_path / "bench.md", tmp_path / "bench.png"
    assert bench_multi_exit.main(["--steps", "80", "--student-steps", "2", "--batch-size", "8", "--calib-rows", "32",
                                  "--latency-rows", "4", "--repeats", "1", "--drops", "1", "--speedups", "1.5",
                                  "--slenderize-batches", "1", "--out", str(tmp_path / "out"), "--md", str(md),
                                  "--plot", str(png)]) == 0
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| config")]
    assert rows[0][0] == "dense" and {r[0] for r in rows[1:]} == {"me", "me-slim50", "pa-exits"}
    assert all(r[1] for r in rows[1:]) and any(r[1].startswith("every block") for r in rows[1:])
    slim = next(r for r in rows if r[0] == "me-slim50")
    assert int(slim[-1].replace(",", "")) < int(rows[0][-1].replace(",", ""))  # fewer parameters
    assert png.stat().st_size > 0
    assert (tmp_path / "out" / "me" / "config.json").is_file()
    assert "MultiExit" in (tmp_path / "out" / "pa-exits" / "config.json").read_text()


def _recipe_parser():
    import argparse

    from common.recipe import add_data_arguments

    p = argparse.ArgumentParser()
    add_data_arguments(p)
    p.add_argument("--schedule", choices=["oneshot", "progressive"], default="progressive")
    return p


def test_recipe_options_come_from_a_config_file_and_flags_win(tmp_path):
    from common.recipe import parse_recipe_args

    (tmp_path / "run.yaml").write_text("steps: 50\nbatch-size: 8\nschedule: oneshot\nglue_task: MRPC\n")
    args = parse_recipe_args(_recipe_parser(), ["--config", str(tmp_path / "run.yaml"), "--steps", "7"])
    assert (args.steps, args.batch_size, args.schedule, args.glue_task) == (7, 8, "oneshot", "MRPC")
    (tmp_path / "run.json").write_text('{"seed": 3}')
    assert parse_recipe_args(_recipe_parser(), ["--config", str(tmp_path / "run.json")]).seed == 3


@pytest.mark.parametrize(("text", "message"), [
    ("stepz: 5\n", "unknown option(s) stepz"),
    ("schedule: sometimes\n", "schedule='sometimes' is not one of oneshot, progressive"),
    ("steps: [1, 2\n", "does not parse"),
    ("- 1\n- 2\n", "expected a mapping"),
])
def test_a_bad_config_file_is_one_clear_error(tmp_path, capsys, text, message):
    from common.recipe import parse_recipe_args

    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        parse_recipe_args(_recipe_parser(), ["--config", str(tmp_path / "run.yaml")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_finish_run_writes_the_run_folder_and_the_card(tmp_path):
    import argparse
    import json

    from huggingface_hub import ModelCard

    import compress
    from common.recipe import finish_run
    from tests import tiny

    compress.save_pretrained(tiny.make_model("bert"), tmp_path / "model")
    finish_run(tmp_path, argparse.Namespace(steps=5, config=None), {"test_accuracy": 0.75},
               model_folder=tmp_path / "model", datasets=["glue"], task="text-classification")
    assert json.loads((tmp_path / "resolved_config.json").read_text()) == {"steps": 5}
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"test_accuracy": 0.75}
    card = ModelCard.load(tmp_path / "model" / "README.md")
    assert card.data.datasets == ["glue"] and "| test_accuracy | 0.75 |" in card.text
