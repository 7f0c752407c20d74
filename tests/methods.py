"""The matrix of PEFT methods under test: one row per (method, model, config) with shared helpers.

Every method in ``compress.METHODS`` must have rows here (``test_every_method_has_cases`` enforces it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

import compress
from tests import tiny


@dataclass
class MethodCase:
    method: str
    arch: str
    config_cls: type
    kwargs: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        options = "-".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.method.lower()}-{self.arch}-{options}"


TASK = {"bert": "SEQ_CLS", "roberta": "SEQ_CLS", "llama": "CAUSAL_LM", "qwen2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM",
        "llama-cls": "SEQ_CLS"}

CASES = [
    MethodCase("PRUNING_ADAPTER", "bert", compress.PruningAdapterConfig,
               {"sparsity": {"ffn": 0.5, "heads": 0.5}, "mode": "global", "compensate_bias": True, "r": 4}),
    MethodCase("PRUNING_ADAPTER", "bert", compress.PruningAdapterConfig,
               {"sparsity": 0.5, "distill_weight": 1.0, "modules_to_save": ["LayerNorm"], "r": 4}),
    MethodCase("PRUNING_ADAPTER", "roberta", compress.PruningAdapterConfig,
               {"sparsity": 0.5, "structures": ["ffn", "layers"], "r": 4}),
    MethodCase("PRUNING_ADAPTER", "llama", compress.PruningAdapterConfig,
               {"sparsity": {"ffn": 0.5, "heads": 0.5, "layers": 0.5}, "r": 4}),
    MethodCase("PRUNING_ADAPTER", "qwen2", compress.PruningAdapterConfig,
               {"sparsity": {"ffn": 0.25, "kv_heads": 0.5}, "importance": "fisher", "r": 4}),
    MethodCase("PRUNING_ADAPTER", "t5", compress.PruningAdapterConfig,
               {"sparsity": {"ffn": 0.5, "heads": 0.5}, "r": 4}),
    # the residual stream: BERT needs global mode (compact classes); peft's LayerNorm copies shrink too
    MethodCase("PRUNING_ADAPTER", "bert", compress.PruningAdapterConfig,
               {"sparsity": {"hidden": 0.25, "ffn": 0.5}, "mode": "global", "modules_to_save": ["LayerNorm"],
                "r": 4}),
    MethodCase("PRUNING_ADAPTER", "llama", compress.PruningAdapterConfig,
               {"sparsity": {"hidden": 0.25, "kv_heads": 0.5}, "r": 4}),
    # with exits after the blocks: every example leaves at the first, so the logits come from a trained exit head
    MethodCase("PRUNING_ADAPTER", "bert", compress.PruningAdapterConfig,
               {"sparsity": {"ffn": 0.5, "heads": 0.5}, "mode": "global", "r": 4,
                "exits": {"exit_policy": "max_prob", "exit_threshold": 0.0}}),
    # the side network: pruned from the backbone (BERT: compact class), random, with dropped layers
    MethodCase("LADDER_SIDE", "bert", compress.LadderSideConfig, {"r": 2}),
    MethodCase("LADDER_SIDE", "roberta", compress.LadderSideConfig, {"r": 4, "side_layers": [1]}),
    MethodCase("LADDER_SIDE", "llama", compress.LadderSideConfig, {"r": 2}),
    MethodCase("LADDER_SIDE", "qwen2", compress.LadderSideConfig, {"r": 2, "side_init": "random"}),
    MethodCase("LADDER_SIDE", "t5", compress.LadderSideConfig, {"r": 2}),
    # exits on a frozen backbone (the backbone-training mode is covered in tests/test_multi_exit.py); the
    # thresholds send every example out at the first exit, so the logits come from a trained exit head
    MethodCase("MULTI_EXIT", "bert", compress.MultiExitConfig,
               {"train_backbone": False, "exit_policy": "max_prob", "exit_threshold": 0.0}),
    MethodCase("MULTI_EXIT", "roberta", compress.MultiExitConfig,
               {"train_backbone": False, "exit_head": "linear", "exit_threshold": float("inf")}),
    MethodCase("MULTI_EXIT", "llama-cls", compress.MultiExitConfig,
               {"train_backbone": False, "exit_pooling": "last", "exit_policy": "max_prob", "exit_threshold": 0.0}),
    # sparse fine-tuning: dense updates or masked LoRA, unstructured (per layer, global) or n:m, magnitude or wanda
    MethodCase("SPARSE_SOUP", "bert", compress.SparseSoupConfig, {"sparsity": 0.5}),
    MethodCase("SPARSE_SOUP", "roberta", compress.SparseSoupConfig, {"pattern": "2:4", "train": "lora", "r": 4}),
    MethodCase("SPARSE_SOUP", "llama", compress.SparseSoupConfig, {"sparsity": 0.6, "importance": "wanda"}),
    MethodCase("SPARSE_SOUP", "llama", compress.SparseSoupConfig, {"sparsity": 0.6, "scope": "global"}),
    MethodCase("SPARSE_SOUP", "qwen2", compress.SparseSoupConfig,
               {"sparsity": 0.5, "train": "lora", "r": 4, "importance": "wanda"}),
    MethodCase("SPARSE_SOUP", "t5", compress.SparseSoupConfig, {"pattern": "4:8", "importance": "wanda"}),
]


def one_case_per_method() -> list[MethodCase]:
    """The first case of each method in ``compress.METHODS``, for tests too slow to run on every case (a method
    without cases is an error in itself: ``test_every_method_has_cases``)."""
    return [next(case for case in CASES if case.method == method) for method in compress.METHODS
            if any(case.method == method for case in CASES)]


def _prepare_pruning_adapter(peft_model, arch):
    peft_model.base_model.prune(data=tiny.make_batches(arch, 2))


def _prepare_ladder_side(peft_model, arch):
    if peft_model.peft_config["default"].side_init == "pruned":
        peft_model.base_model.init_side(data=tiny.make_batches(arch, 2))  # the fisher initialisation


def _prepare_sparse_soup(peft_model, arch):
    if peft_model.peft_config["default"].importance == "wanda":
        peft_model.base_model.prune(data=tiny.make_batches(arch, 2))  # masks from the calibration inputs


#: per method: what turns a freshly wrapped model into its trained-shape form (e.g. oneshot pruning)
PREPARE = {"PRUNING_ADAPTER": _prepare_pruning_adapter, "LADDER_SIDE": _prepare_ladder_side,
           "MULTI_EXIT": lambda peft_model, arch: None, "SPARSE_SOUP": _prepare_sparse_soup}
#: methods whose adapters fold into the base model (``merge_and_unload``); the others refuse to merge
MERGES = {"PRUNING_ADAPTER": True, "LADDER_SIDE": False, "MULTI_EXIT": True, "SPARSE_SOUP": True}


def build(case: MethodCase, init_weights: bool = True):
    """A tiny base model, its deep copy (for reloads), and the prepared PEFT model."""
    base = tiny.make_model(case.arch)
    pristine = tiny.make_model(case.arch)
    kwargs = dict(case.kwargs)
    if "init_lora_weights" in case.config_cls.__dataclass_fields__:
        kwargs["init_lora_weights"] = init_weights
    config = case.config_cls(task_type=TASK[case.arch], **kwargs)
    peft_model = get_peft_model(base, config)
    PREPARE[case.method](peft_model, case.arch)
    return pristine, peft_model


def adapter_parameter_names(model) -> set[str]:
    """Names of the parameters peft's tuner layers add (everything on a tuner layer but its base layer)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            names |= {f"{module_name}.{n}" for n, _ in module.named_parameters() if not n.startswith("base_layer.")}
    return names


def perturb_adapters(peft_model, seed: int = 0) -> None:
    """Give every trainable parameter random values, so reload/merge tests compare non-trivial adapters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def logits(model, arch: str, seed: int = 1) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**tiny.make_batch(arch, labels=False, seed=seed)).logits
