"""One comparison benchmark of every method against its peers: an encoder track, a decoder track and a scaling
section, each row run in a fresh process, written to a run folder as JSON, Markdown tables and PNG plots.

- encoder: full fine-tuning, LoRA (peft), BitFit, pruning with our engine and with Torch-Pruning, Pruning-Adapter
  (with and without hidden-size pruning), Ladder Side-Tuning (and on an 8-bit backbone), a sparse soup against
  IMP at equal compute, multi-exit at a calibrated threshold; the packaged MiniLM-L6 on SST-2 and MRPC by default.
- decoder: our pruning criteria (uniform and global widths), Torch-Pruning, recovery with LoRA and with
  Pruning-Adapter, Ladder Side-Tuning against LoRA on the causal LM, a 2:4-sparse model; perplexity on WikiText-2
  (``--decoder-model``: a folder, e.g. the SmolLM2-135M folder of ``../shared/tools/smollm2_to_hf.py``, or a Hub id
  such as ``HuggingFaceTB/SmolLM2-135M``).
- scaling: the time and peak memory of ``compress prune`` on random Llama-shaped models of about 0.1B, 0.4B and 1B
  parameters, with a data-free and a calibrated criterion.

    python ../shared/tools/smollm2_to_hf.py runs/smollm2      # the decoder track's model (see that script)
    python recipes/benchmark.py --quick --decoder-model runs/smollm2 --out runs/benchmark-quick
    python recipes/benchmark.py --decoder-model runs/smollm2 --out runs/benchmark   # full size: docs/benchmark.md
    python recipes/benchmark.py --decoder-model runs/smollm2 --out runs/benchmark --jobs 2 --threads 1  # 2 rows at once
    python recipes/benchmark.py --out runs/benchmark --resume                  # after Ctrl-C: finished rows are kept

Files in ``--out``: ``results.json`` (every row's figures, errors and options; rewritten atomically after each row),
``benchmark.md`` (a table per track and group, every figure beside its ratio to the group's baseline row), one PNG
per track (quality against training peak memory and against latency, Pareto front drawn), ``resolved_config.json``.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from bench import decoder, encoder, scaling
from bench.harness import RESULTS_FILE, Row, load_results, run_rows
from bench.report import concurrency_text, markdown_report, summarise
from common.recipe import claim_run_folder, finish_run, parse_recipe_args, setup_run

REPO = Path(__file__).resolve().parents[1]
TRACKS = {"encoder": encoder, "decoder": decoder, "scaling": scaling}
REPORT_FILE = "benchmark.md"
logger = logging.getLogger("benchmark")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--out", default=str(REPO / "runs" / "benchmark"), help="the run folder (runs/benchmark)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out when it is the run folder of an earlier run (it is emptied first)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out: rows finished with the same options are not run again")
    p.add_argument("--quick", action="store_true",
                   help="small settings for every track (1 seed, few steps, short evaluation): under 15 minutes on "
                        "2 CPU cores with the default models")
    p.add_argument("--tracks", default="encoder,decoder,scaling",
                   help="comma-separated tracks to run: encoder, decoder, scaling (all)")
    p.add_argument("--rows", default=None, metavar="PATTERNS",
                   help="comma-separated shell patterns; only rows whose id (track/group/method/seedN), method or "
                        "method key matches one run, e.g. '*lora*,full*' (case-insensitive)")
    p.add_argument("--list", action="store_true", help="list the rows that would run, and exit")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each row's process (torch's default)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="rows run at the same time, each in its own process (1: one after another); rows that depend "
                        "on each other still run in order, one at a time, and the scaling rows alone. Keep N x "
                        "--threads at most the CPU cores: on 2 cores, --jobs 2 --threads 1")
    enc = p.add_argument_group("encoder track")
    enc.add_argument("--model", default=None,
                     help="sequence-classification model: a local folder or a Hub id in the cache (default: the "
                          "packaged all-MiniLM-L6-v2)")
    enc.add_argument("--data", default=None,
                     help="classification data instead of SST-2 and MRPC (--quick: SST-2 only): a folder or file "
                          "compress.data.load_task reads (train + test/dev splits), a save_to_disk folder or a "
                          "datasets name")
    enc.add_argument("--text-column", default=None, help="--data: the column holding the text (text)")
    enc.add_argument("--text-pair-column", default=None, help="--data: the column of second segments, if any")
    enc.add_argument("--label-column", default=None, help="--data: the column holding the labels (label)")
    enc.add_argument("--seeds", type=int, default=None, help="repetitions of every encoder row (3; --quick 1)")
    enc.add_argument("--steps", type=int, default=None, help="training steps of every encoder row (800; --quick 40)")
    enc.add_argument("--recovery-steps", type=int, default=None,
                     help="of --steps, the steps the pruning, soup and multi-exit rows spend after the shared dense "
                          "fine-tune (250; --quick 20)")
    enc.add_argument("--batch-size", type=int, default=None, help="encoder training batch (32; --quick 16)")
    enc.add_argument("--max-length", type=int, default=None, help="encoder tokens per row (128; --quick 64)")
    enc.add_argument("--train-rows", type=int, default=None, help="subsample the training split (all; --quick 1200)")
    enc.add_argument("--eval-rows", type=int, default=None, help="subsample the test split (all; --quick 200)")
    dec = p.add_argument_group("decoder track")
    dec.add_argument("--decoder-model", default=None, metavar="FOLDER_OR_HUB_ID",
                     help="a causal LM (Llama / Qwen2): a folder, e.g. the SmolLM2-135M folder written by "
                          "../shared/tools/smollm2_to_hf.py, or a Hub id such as HuggingFaceTB/SmolLM2-135M, loaded "
                          "as `compress eval` loads it; the rows run offline, so a Hub id must be in the Hugging Face "
                          "cache unless HF_HUB_OFFLINE=0 is exported; without it the track is skipped")
    dec.add_argument("--decoder-data", default=str(decoder.DEFAULT_EVAL_TEXT),
                     help="evaluation text for perplexity (WikiText-2's wiki.test.raw beside the checkout)")
    dec.add_argument("--calibration-text", default=str(decoder.DEFAULT_CALIBRATION_TEXT),
                     help="calibration and recovery text (WikiText-2's valid.tokens.txt beside the checkout)")
    dec.add_argument("--decoder-text-column", default=None, help="the text column of a table or dataset")
    sc = p.add_argument_group("scaling section")
    sc.add_argument("--scaling-sizes", default=None,
                    help=f"comma-separated model sizes among {', '.join(scaling.SIZES)} (0.1b,0.4b,1b; --quick 0.1b)")
    return p


def _settings(args: argparse.Namespace, track: str) -> dict[str, Any]:
    module = TRACKS[track]
    settings = dict(module.QUICK if args.quick else module.FULL)
    settings.update({"quick": args.quick, "workdir": str(Path(args.out).resolve())})
    if track == "encoder":
        for name in ("seeds", "steps", "recovery_steps", "batch_size", "max_length", "train_rows", "eval_rows"):
            if getattr(args, name) is not None:
                settings[name] = getattr(args, name)
        settings["model"] = args.model
        if args.data:
            settings["tasks"] = [{"group": Path(args.data).name or args.data, "data": args.data,
                                  "text_column": args.text_column, "text_pair_column": args.text_pair_column,
                                  "label_column": args.label_column}]
    elif track == "decoder":
        settings.update(model=args.decoder_model, eval_text=args.decoder_data,
                        calibration_text=args.calibration_text, text_column=args.decoder_text_column)
    elif track == "scaling":
        settings["calibration_text"] = args.calibration_text
        if args.scaling_sizes:
            settings["sizes"] = [s.strip() for s in args.scaling_sizes.split(",") if s.strip()]
    return settings


def _selected(row: Row, patterns: list[str] | None) -> bool:
    if not patterns:
        return True
    names = [row.id, row.method, str(row.kwargs.get("method", "")), str(row.kwargs.get("name", ""))]
    return any(fnmatch.fnmatch(name.lower(), pattern.lower()) for pattern in patterns for name in names)


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The tracks to run; a parser error for a bad option, before any work."""
    tracks = [t.strip() for t in args.tracks.split(",") if t.strip()]
    unknown = [t for t in tracks if t not in TRACKS]
    if unknown or not tracks:
        p.error(f"--tracks {args.tracks}: choose among {', '.join(TRACKS)}")
    if args.steps is not None and args.recovery_steps is not None and not 0 < args.recovery_steps < args.steps:
        p.error(f"--recovery-steps {args.recovery_steps} must be between 0 and --steps {args.steps}")
    for name in ("seeds", "steps", "recovery_steps", "batch_size", "max_length", "train_rows", "eval_rows", "threads",
                 "jobs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} {value}: give a positive number")
    if args.scaling_sizes:
        bad = [s for s in args.scaling_sizes.split(",") if s.strip() and s.strip() not in scaling.SIZES]
        if bad:
            p.error(f"--scaling-sizes: unknown size(s) {', '.join(bad)}; choose among {', '.join(scaling.SIZES)}")
    if Path(args.decoder_data).resolve() == Path(args.calibration_text).resolve():
        p.error(f"--decoder-data and --calibration-text are the same file ({args.decoder_data}): never calibrate or "
                "train on the evaluation text; give other text (e.g. WikiText-2's valid.tokens.txt) as "
                "--calibration-text")
    if args.data and not Path(args.data).exists() and "/" not in args.data and not args.data.isidentifier():
        p.error(f"--data {args.data}: not a file or folder, nor a datasets name")
    return tracks


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    resume = argparse.ArgumentParser(add_help=False)
    resume.add_argument("--resume", action="store_true")
    known, _ = resume.parse_known_args(argv)
    if known.resume:  # an earlier run folder is what --resume continues: check it as --overwrite would
        p.set_defaults(overwrite=True)
    args = parse_recipe_args(p, argv)
    tracks = check_args(p, args)
    settings = {track: _settings(args, track) for track in tracks}
    rows = [row for track in tracks for row in TRACKS[track].rows(settings[track])]
    if "decoder" in tracks and decoder.skip_reason(settings["decoder"]):
        logger.warning("decoder track skipped: %s", decoder.skip_reason(settings["decoder"]))
    patterns = [s.strip() for s in args.rows.split(",") if s.strip()] if args.rows else None
    rows = [row for row in rows if _selected(row, patterns)]
    if args.list:
        for row in rows:
            print(row.id)
        return 0
    if not rows and patterns:
        p.error(f"--rows {args.rows} matches no row of the tracks {', '.join(tracks)} (--list shows them)")
    if not rows:
        p.error(f"nothing to run: the decoder track needs a model ({decoder.skip_reason(settings['decoder'])})")
    out = Path(args.out)
    results_path = out / RESULTS_FILE
    if not (args.resume and results_path.is_file()):
        claim_run_folder(args, p.description)
    setup_run()
    started = time.time()
    interrupted = False
    # a resumed run may have run other tracks before: their settings stay, and the report covers every track
    earlier = load_results(results_path).get("settings", {}) if args.resume else {}
    settings = {**earlier.get("tracks", {}), **settings}
    _warn_oversubscription(args.jobs, args.threads)
    try:
        run_rows(rows, results_path, resume=args.resume, threads=args.threads, jobs=args.jobs,
                 settings={"argv": sys.argv[1:] if argv is None else list(argv), "tracks": settings,
                           "jobs": args.jobs, "threads": args.threads})
    except KeyboardInterrupt:
        interrupted = True
        logger.warning("interrupted: the finished rows are in %s; --resume continues the run", results_path)
    results = load_results(results_path)
    tracks = [t for t in TRACKS if t in settings]
    text = write_report(results, tracks, settings, out, argv, minutes=(time.time() - started) / 60)
    metrics = {row_id: r.get("figures", {}).get("quality") for row_id, r in results["rows"].items()
               if r.get("status") == "ok"}
    finish_run(out, args, metrics)
    print(text)
    print(f"wrote {out / REPORT_FILE}, {results_path}")
    return 130 if interrupted else 0


def _warn_oversubscription(jobs: int, threads: int | None) -> None:
    """A warning when ``jobs`` rows of ``threads`` torch threads each (torch's default: one per core) want more
    threads than the machine has cores: they would slow each other down."""
    if jobs == 1:
        return
    import torch

    cores = os.cpu_count() or 1
    per_row = threads or torch.get_num_threads()
    if jobs * per_row > cores:
        logger.warning("--jobs %d with %d torch thread(s) per row wants %d threads on %d CPU cores: the rows slow each "
                       "other down; give --threads %d", jobs, per_row, jobs * per_row, cores, max(1, cores // jobs))


def _cpu_name() -> str:
    """The processor's model name (Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_report(results: dict[str, Any], tracks: list[str], settings: dict[str, dict[str, Any]], out: Path,
                 argv: list[str] | None, minutes: float) -> str:
    """Write ``benchmark.md`` and the tracks' PNGs into ``out``; returns the Markdown."""
    from bench.plots import plot_track
    from compress.export import write_text_atomically

    plots, notes = {}, {}
    for track in tracks:
        notes[track] = TRACKS[track].note(settings[track])
        summary = summarise(results, track)
        if track != "scaling" and summary:
            try:
                path = plot_track(summary, out / f"{track}.png", TRACKS[track].TITLE)
            except ImportError:
                logger.warning("matplotlib is not installed (pip install 'peft-compress[bench]'): no plots")
                path = None
            if path is not None:
                plots[track] = path.name
    import torch

    command = "python recipes/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"# Benchmark\n\n`{command.strip()}`\n\n{date}. Machine: {_cpu_name()}, {os.cpu_count()} CPU cores, "
              f"{torch.get_num_threads()} torch threads by default; Python {platform.python_version()}, torch "
              f"{torch.__version__}. Wall time of this invocation: {minutes:.1f} min (rows finished by an earlier "
              "invocation of a resumed run not included; each row's own time is in results.json). One row alone: "
              "the same command with `--rows 'ID'`, ID as results.json names it (track/group/method[/seedN]). "
              + concurrency_text(results))
    text = markdown_report(results, tracks, notes=notes, plots=plots, header=header)
    write_text_atomically(out / REPORT_FILE, text)
    return text


if __name__ == "__main__":
    sys.exit(main())
