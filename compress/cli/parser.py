"""The ``compress`` command's parser: flags, help and choices, with the vocabulary read from the library.

Standard library only, as are the modules it reads the vocabulary from (:mod:`compress.pruning.spec`,
:mod:`compress.pruning.arch`, :mod:`compress.tasks`), so that ``compress --help`` and a malformed command line
are answered without importing torch. Criteria (``--importance``) are checked by the library when the command
runs: a criterion added with :func:`compress.register_importance` is accepted there.
"""

from __future__ import annotations

import argparse
from typing import Any, Protocol

from compress.pruning.arch import ARCH_SPECS, supported_model_types
from compress.pruning.spec import DEFAULT_DAMPING, MODES, NORMALIZATIONS, RECONSTRUCTIONS, STRUCTURES
from compress.tasks import TASKS

from .errors import UsageError

PROG = "compress"
#: what `compress eval` reads when --data is not given: WikiText-2 (raw) from the Hub, its test split
EVAL_DATASET, EVAL_DATASET_CONFIG, EVAL_SPLIT = "wikitext", "wikitext-2-raw-v1", "test"
#: the dtypes `compress eval` loads a model in
EVAL_DTYPES = ("float32", "bfloat16", "float16")
#: tokens per calibration row of a causal LM, and per row of other calibration data (truncation)
TEXT_ROW_LENGTH, MAX_LENGTH = 512, 128


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peft-compress")
    except PackageNotFoundError:  # running from a checkout that is not installed
        return "unknown"


def _structures_by_family() -> str:
    """One line per family: the structures of uniform mode / those global mode adds (ArchSpec's tables)."""
    rows = []
    for spec in ARCH_SPECS:
        added = [s for s in spec.supported_structures if s not in spec.uniform_structures]
        text = ", ".join(spec.uniform_structures) + (f" / {', '.join(added)}" if added else "")
        if spec.uniform_only_structures:
            text += f" ({', '.join(spec.uniform_only_structures)}: equal across layers in either mode)"
        rows.append((f"{', '.join(spec.model_types)}:", text))
    width = max(len(name) for name, _ in rows)
    return "".join(f"  {name:<{width}} {text}\n" for name, text in rows)


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise :class:`UsageError` (one line, no usage block) instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=100)


def _common_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    # On subcommands the defaults are SUPPRESS so that they do not overwrite flags given before the
    # subcommand (`compress --debug prune ...`).
    default = False if top else argparse.SUPPRESS
    group = parser.add_argument_group("output and debugging")
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="log what is happening (INFO level)")
    group.add_argument("--debug", action="store_true", default=default,
                       help="show full tracebacks instead of one-line errors, and DEBUG logs")


def build_parser() -> argparse.ArgumentParser:
    types = ", ".join(supported_model_types())
    parser = _Parser(
        prog=PROG,
        formatter_class=_Formatter,
        description=(
            "peft-compress: shrink Hugging Face transformers models by structured pruning.\n\n"
            "Parameters are physically removed (FFN neurons, attention heads, kv heads, whole layers), so\n"
            "the saved folder is smaller and inference is cheaper.\n"
            f"Supported model types: {types}."
        ),
        epilog=(
            "examples:\n"
            "  compress info ./bert-sst2\n"
            "  compress prune ./bert-sst2 --out ./bert-sst2-ffn50 --sparsity 0.5 --structures ffn "
            "--data sst2-sample\n"
            "  compress prune ./llama --out ./llama-ffn30 --sparsity 0.3 --importance flap "
            "--reconstruct least_squares --data valid.tokens.txt\n"
            "  compress eval ./llama-ffn30 --data wiki.test.raw\n"
            "  compress push ./bert-sst2-ffn50 my-user/bert-sst2-ffn50\n"
            "  compress prune --help\n\n"
            "exit status: 0 success, 2 bad arguments or inputs, 1 a run that failed part-way."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _common_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _prune_parser(sub, types)
    info = sub.add_parser(
        "info",
        formatter_class=_Formatter,
        help="show a model folder's type, parameters, per-layer widths and prunable structures",
        description=(
            "Describe a model folder without loading its weights: architecture, parameter count, per-layer\n"
            "widths, whether loading it needs `import compress` (a compact model from --mode global), the\n"
            "pruning record of a folder written by `compress prune`, and which --structures each --mode\n"
            "can prune from this model (a multi-exit model keeps its blocks and hidden size; a model whose\n"
            "layers differ in width is pruned in global mode); `compress prune` refuses the rest. Weights\n"
            "that disagree with config.json are an error."
        ),
        epilog="example:\n  compress info ./bert-sst2",
    )
    info.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by save_pretrained")
    _common_flags(info, top=False)
    info.set_defaults(command_module="info")
    _eval_parser(sub)
    _push_parser(sub)
    return parser


def _eval_parser(sub) -> None:
    evaluate = sub.add_parser(
        "eval",
        formatter_class=_Formatter,
        help="perplexity of a causal LM on WikiText-2 or any text, with its protocol",
        description=(
            "Perplexity of a causal language model (a folder written by save_pretrained, ours or any other,\n"
            "or a Hub model id) on a text: by default WikiText-2 from the Hub "
            f"({EVAL_DATASET}, {EVAL_DATASET_CONFIG},\n{EVAL_SPLIT} split, its rows joined with blank lines), "
            "or --data. The text is tokenised as a whole;\n"
            "the first --max-tokens tokens are scored in windows of --window tokens that start every --stride\n"
            "tokens, each token predicted once from the tokens before it in its window (with --stride equal\n"
            "to --window, the default, the first token of each window is not scored). Prints the perplexity\n"
            "with its protocol (tokens, window, stride, dtype, the text and how it was joined); --out FILE\n"
            "saves both as JSON. Models from --mode global load as well (compact classes)."
        ),
        epilog=(
            "examples:\n"
            "  # WikiText-2 from the Hub (needs the network or the datasets cache)\n"
            "  compress eval ./llama-ffn30\n\n"
            "  # a local copy of the raw test file: lines joined with blank lines, as the Hub rows are\n"
            "  compress eval ./llama-ffn30 --data wiki.test.raw --max-tokens 8192 --window 512 --out ppl.json"
        ),
    )
    evaluate.add_argument("model", metavar="MODEL", help="model folder, or a Hub model id")
    data = evaluate.add_argument_group("text")
    data.add_argument("--data", default=None, metavar="FILE_OR_DATASET",
                      help="a text file (.txt: as is; .raw, WikiText's raw files: lines joined with blank lines), a "
                           ".jsonl/.json/.csv/.tsv file or save_to_disk folder with a text column, or a Hub dataset "
                           f"id (default: {EVAL_DATASET} with --data-config {EVAL_DATASET_CONFIG})")
    data.add_argument("--data-config", default=None, metavar="NAME",
                      help="configuration of a Hub dataset, e.g. wikitext-2-raw-v1")
    data.add_argument("--split", default=EVAL_SPLIT,
                      help="split of a Hub dataset or saved DatasetDict (default: %(default)s)")
    data.add_argument("--text-column", default=None, metavar="NAME",
                      help="column holding the text (default: text, or sentence, content, ...)")
    protocol = evaluate.add_argument_group("protocol")
    protocol.add_argument("--max-tokens", type=int, default=None, metavar="N",
                          help="score the first N tokens of the text (default: all)")
    protocol.add_argument("--window", type=int, default=TEXT_ROW_LENGTH, metavar="N",
                          help="tokens per forward pass, at most the model's positions (default: %(default)s)")
    protocol.add_argument("--stride", type=int, default=None, metavar="N",
                          help="tokens between window starts, at most --window; smaller values give every scored "
                               "token more context (default: --window, no overlap)")
    protocol.add_argument("--dtype", default="float32", choices=EVAL_DTYPES,
                          help="dtype to load the model in (default: %(default)s)")
    run = evaluate.add_argument_group("running and saving")
    run.add_argument("--batch-size", type=int, default=1, metavar="N",
                     help="windows per forward pass (default: %(default)s)")
    run.add_argument("--tokenizer", default=None, metavar="DIR",
                     help="tokenizer folder, if not saved with the model (default: MODEL)")
    run.add_argument("--device", default="auto",
                     help="auto (cuda if available), cpu, cuda, cuda:1, ... (default: %(default)s)")
    run.add_argument("--out", "-o", default=None, metavar="FILE",
                     help="write the result and its protocol to FILE as JSON (a new file, or see --overwrite)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace --out if it holds an earlier result of compress eval")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _common_flags(evaluate, top=False)
    evaluate.set_defaults(command_module="evaluate")


def _push_parser(sub) -> None:
    push = sub.add_parser(
        "push",
        formatter_class=_Formatter,
        help="check a saved folder and upload it to a Hugging Face Hub model repository",
        description=(
            "Upload a folder written by peft-compress (a pruned or merged model, a compact sparse folder, a\n"
            "PEFT adapter folder) to the model repository REPO_ID, creating it if missing. The folder is\n"
            "checked first, without the base model: its README.md model card must parse with metadata, its\n"
            "config must pass its own validation, its weights must load and have the shapes its config (or\n"
            "adapter config) gives them, a Pruning-Adapter's pruning_plan must equal the copy saved with its\n"
            "weights, and no symbolic link may point outside the folder. A folder that fails is not\n"
            "uploaded. Nothing local is written. The token comes from --token, HF_TOKEN or `hf auth login`;\n"
            "HF_ENDPOINT selects another Hub."
        ),
        epilog="example:\n  compress push ./bert-ffn50 my-user/bert-sst2-ffn50 --private",
    )
    push.add_argument("folder", metavar="DIR", help="folder to upload")
    push.add_argument("repo_id", metavar="REPO_ID", help="model repository, e.g. my-user/bert-sst2-ffn50")
    push.add_argument("--private", action="store_true", help="create the repository private (if it is new)")
    push.add_argument("--revision", metavar="BRANCH", help="branch to commit to (created if missing; default main)")
    push.add_argument("--token", metavar="TOKEN", help="Hub token with write access (default: HF_TOKEN / login)")
    push.add_argument("--message", metavar="TEXT", help="commit message")
    _common_flags(push, top=False)
    push.set_defaults(command_module="push")


class _TakesArguments(Protocol):
    """An argument parser or argument group: what :func:`add_prune_options` adds to."""

    def add_argument(self, *name_or_flags: str, **kwargs: Any) -> argparse.Action: ...


def add_prune_options(group: _TakesArguments) -> list[argparse.Action]:
    """Add the options of ``compress prune`` that say what to prune and how units are scored and removed
    (``--sparsity``, ``--param-sparsity``, ``--structures``, ``--importance``, ``--mode``, ``--normalize``,
    ``--max-keep``, ``--min-keep``, ``--compensate-bias``, ``--reconstruct``, ``--damping``, ``--round-to``) to
    ``group``, an argument parser or group, and return the actions added.

    ``compress prune`` and the recipes that prune as it does (``recipes/llm_prune.py``) take them from here, so
    their flags, help, choices and defaults are one definition. The values are checked when the command runs
    (:meth:`compress.pruning.spec.PruningSpec.from_options`), not by the parser.
    """
    add = group.add_argument
    return [
        add("--sparsity", default=None, metavar="S",
            help="fraction of each structure to remove, in (0, 1); or per structure, e.g. "
                 "ffn=0.5,heads=0.25 (default: 0.5)"),
        add("--param-sparsity", type=float, default=None, metavar="F",
            help="instead of --sparsity: the fraction of all the model's parameters to remove from "
                 "--structures (ffn, heads, kv_heads); in global mode one ranking decides each structure's "
                 "and layer's share"),
        add("--structures", default=None, metavar="S[,S...]",
            help=f"comma-separated structures to prune, from: {', '.join(STRUCTURES)} "
                 "(default: ffn, or the names given in --sparsity)"),
        add("--importance", default="taylor", metavar="NAME",
            help="how units are scored (an unknown name lists them all): taylor, taylor_elementwise and "
                 "fisher use gradients of the task loss on --data; flap, wanda_sp, activation and "
                 "block_influence (layers) read activations on --data, no labels (flap or wanda_sp for "
                 "decoder LLMs); magnitude/l1/l2 (weight norms) and random need no data; or a criterion "
                 "of your own, registered with compress.register_importance by a module: MODULE:NAME "
                 "imports MODULE (from the current folder or PYTHONPATH) and uses its criterion NAME "
                 "(default: %(default)s)"),
        add("--mode", default="uniform", choices=MODES,
            help="uniform: same width in every layer, plain transformers folder; global: rank "
                 "units across layers, needs `import compress` to load (default: %(default)s)"),
        add("--normalize", default="none", choices=NORMALIZATIONS,
            help="global mode: scale each layer's scores by their mean / L2 norm, or standardize them "
                 "(minus their mean, over their standard deviation: FLAP), before ranking across layers, "
                 "so layers near the loss do not win by scale (default: %(default)s)"),
        add("--max-keep", type=float, default=None, metavar="F",
            help="global mode: the largest fraction of its FFN neurons / heads any one layer keeps, "
                 "e.g. 0.6; at least 1 - sparsity (default: no cap)"),
        add("--min-keep", type=float, default=None, metavar="F",
            help="global mode: the smallest fraction of its FFN neurons / query heads / kv heads any one "
                 "layer keeps, e.g. 0.2; at most 1 - sparsity (default: one neuron, one head per kv group)"),
        add("--compensate-bias", action="store_true",
            help="add removed neurons'/heads' mean contribution (measured on --data) to the output "
                 "projection's bias; Llama gets one through mlp_bias / attention_bias, families whose "
                 "config cannot hold one (Qwen2, T5) are refused"),
        add("--reconstruct", default="none", choices=RECONSTRUCTIONS,
            help="least_squares: prune block by block on --data and refit the kept weights of each FFN / "
                 "attention output projection by ridge least squares, with its bias where the family can "
                 "hold one (Llama: mlp_bias / attention_bias), without where it cannot (Qwen2); the "
                 "strongest option for decoder LLMs (default: %(default)s)"),
        add("--damping", type=float, default=None, metavar="F",
            help="the ridge of --reconstruct least_squares, relative to the kept channels' mean variance: "
                 f"larger stays closer to plain removal (default: {DEFAULT_DAMPING:g})"),
        add("--round-to", type=int, default=1, metavar="N",
            help="keep FFN widths a multiple of N, e.g. 8 or 64 for faster kernels "
                 "(default: %(default)s)"),
    ]


def _prune_parser(sub, types: str) -> None:
    prune = sub.add_parser(
        "prune",
        formatter_class=_Formatter,
        help="structurally prune a model folder and save the smaller model",
        description=(
            "Structurally prune a model saved with save_pretrained and save the smaller model.\n\n"
            "Scores every prunable unit (FFN neurons, attention heads, kv heads or layers) with the chosen\n"
            "importance criterion, removes the lowest-scoring --sparsity of each structure, rewrites the\n"
            "config and saves a safetensors folder with the tokenizer, a model card (README.md) and\n"
            "compress_report.json. Prints parameters, estimated FLOPs and per-layer widths before/after,\n"
            "and the sparsity achieved (whole units) where it differs from the one asked for.\n\n"
            "--mode uniform (default) removes the same number of units in every layer, so the result is a\n"
            "standard transformers folder. --mode global ranks units across layers; layers then differ in\n"
            "width and the saved folder needs `import compress` before AutoModel*.from_pretrained.\n\n"
            "--out must be a new or empty folder. --overwrite replaces only a previous output of\n"
            "peft-compress (it holds compress_report.json or our model card) that holds no PEFT adapter\n"
            "or training state and none of the run's inputs; anything else is refused before the model loads."
        ),
        epilog=(
            "examples:\n"
            "  # half of every FFN of a BERT classifier, Taylor importance on the shipped SST-2 sample\n"
            "  compress prune ./bert-sst2 --out ./bert-ffn50 --sparsity 0.5 --structures ffn --data sst2-sample\n\n"
            "  # FFN neurons and heads ranked across layers, calibrated on a GLUE folder\n"
            "  compress prune ./bert-sst2 --out ./bert-global --sparsity 0.3 --structures ffn,heads \\\n"
            "      --mode global --data glue/SST-2 --num-batches 16\n\n"
            "  # a decoder LLM: FLAP's criterion, least-squares refit, 128 rows x 512 tokens of a text file\n"
            "  compress prune ./llama --out ./llama-ffn30 --sparsity 0.3 --structures ffn --importance flap \\\n"
            "      --reconstruct least_squares --data valid.tokens.txt\n\n"
            "  # data-free: weight magnitude (fine for small encoders; it breaks real decoder LLMs)\n"
            "  compress prune ./bert-sst2 --out ./bert-pruned --sparsity 0.25 --importance magnitude\n\n"
            "  # a different sparsity per structure\n"
            "  compress prune ./bert-sst2 --out ./bert-mixed --sparsity ffn=0.5,layers=0.25 --importance l1\n\n"
            f"supported model types: {types}\n"
            "structures by family (uniform mode / also in global mode):\n"
            f"{_structures_by_family()}"
            "`compress info MODEL_DIR` lists what a given model supports."
        ),
    )
    prune.add_argument("model_dir", metavar="MODEL_DIR",
                       help="folder written by save_pretrained (config.json + safetensors weights; tokenizer if "
                            "present)")
    prune.add_argument("--out", "-o", required=True, metavar="DIR",
                       help="folder to write the pruned model to (new or empty, or see --overwrite)")
    add_prune_options(prune.add_argument_group("what to prune"))
    data = prune.add_argument_group(
        "calibration data (criteria that read activations or gradients, --compensate-bias, --reconstruct)",
        "A causal LM calibrates on text: --num-batches x --batch-size rows of exactly --max-length tokens\n"
        "(default 8 x 16 = 128 rows x 512 tokens) at seeded random offsets of the tokenised text. Other\n"
        "models read labelled rows (classification data), truncated to --max-length (default 128).")
    data.add_argument("--data", default=None, metavar="FILE_OR_DATASET",
                      help="causal LMs: a text file (.txt: as is; .raw, WikiText's raw files: lines joined with "
                           "blank lines), a .jsonl/.json/.csv/.tsv file or save_to_disk folder with a text column "
                           "(rows joined with blank lines), or a Hub dataset id. Other models: 'sst2-sample' "
                           "(shipped), a GLUE-style .tsv/.csv/.jsonl file or folder, or a save_to_disk folder")
    data.add_argument("--data-config", default=None, metavar="NAME",
                      help="configuration of a Hub dataset, e.g. wikitext-2-raw-v1")
    data.add_argument("--split", default="train",
                      help="split to read from a folder, saved DatasetDict or Hub dataset (default: %(default)s)")
    data.add_argument("--text-column", default=None, metavar="NAME",
                      help="causal LMs: the column holding the text (default: text, or sentence, content, ...)")
    data.add_argument("--num-batches", type=int, default=8, metavar="N",
                      help="calibration batches to score with (default: %(default)s)")
    data.add_argument("--batch-size", type=int, default=16, metavar="N",
                      help="rows per calibration batch (default: %(default)s)")
    data.add_argument("--max-length", type=int, default=None, metavar="N",
                      help="tokens per row, also the sequence length of the FLOPs estimate; capped at the "
                           f"model's position limit (default: {TEXT_ROW_LENGTH} for a causal LM's text rows, "
                           f"else {MAX_LENGTH})")
    data.add_argument("--seed", type=int, default=0, metavar="N",
                      help="which rows calibrate: the offsets of a causal LM's text rows, the sample of other "
                           "data's rows (default: %(default)s)")
    model = prune.add_argument_group("loading and saving")
    model.add_argument("--task-type", default="auto", choices=("auto", *TASKS),
                       help="which head to load MODEL_DIR with; auto reads `architectures` in config.json "
                            "(default: %(default)s)")
    model.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="tokenizer folder, if not saved in MODEL_DIR (default: MODEL_DIR)")
    model.add_argument("--device", default="auto",
                       help="device to prune on: auto (cuda if available), cpu, cuda, cuda:1, ... "
                            "(default: %(default)s)")
    model.add_argument("--overwrite", action="store_true",
                       help="replace --out if it is a previous output of peft-compress holding no adapter, "
                            "training state or input (atomically, after pruning succeeded)")
    model.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _common_flags(prune, top=False)
    prune.set_defaults(command_module="prune")
