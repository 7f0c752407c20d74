"""Multi-exit models: a classifier after several blocks of an encoder, trained jointly (with distillation from
a teacher), and early exit per example at inference that removes finished examples from the running batch.

After "COST-EFF: Collaborative Optimization of Spatial and Temporal Efficiency with Slenderized Multi-exit
Language Models" (Shen et al., EMNLP 2022); exit policies after DeeBERT (entropy) and PABEE (patience).
"""

from __future__ import annotations

import warnings

from compress.hub import register_folder_check
from compress.registry import register_method

from .attach import (
    active_exit_heads,
    attach_exit_heads,
    call_with_exits,
    check_exits,
    check_teacher,
    detach_exit_heads,
    enable_exit_heads,
    scoring_every_exit,
)
from .calibrate import (
    ThresholdChoice,
    calibrate_exit_threshold,
    choose_exit_threshold,
    collect_exit_logits,
    exit_block_indices,
)
from .checks import check_saved_folder
from .config import EXIT_FIELDS, MULTI_EXIT, MultiExitConfig, check_exit_fields, validate_exit_config
from .layer import ExitHead
from .model import MultiExitModel
from .modeling import (
    MultiExitClassifierConfig,
    MultiExitForSequenceClassification,
    build_exit_heads,
    make_multi_exit,
    register_multi_exit_models,
)
from .policy import POLICIES, simulate_exits
from .runner import ExitSettings, MultiExitClassifierOutput

__all__ = [
    "EXIT_FIELDS",
    "MULTI_EXIT",
    "POLICIES",
    "ExitHead",
    "ExitSettings",
    "MultiExitClassifierConfig",
    "MultiExitClassifierOutput",
    "MultiExitConfig",
    "MultiExitForSequenceClassification",
    "MultiExitModel",
    "ThresholdChoice",
    "active_exit_heads",
    "apply_multi_exit",
    "attach_exit_heads",
    "build_exit_heads",
    "calibrate_exit_threshold",
    "call_with_exits",
    "check_exit_fields",
    "check_exits",
    "choose_exit_threshold",
    "collect_exit_logits",
    "detach_exit_heads",
    "enable_exit_heads",
    "exit_block_indices",
    "make_multi_exit",
    "multi_exit_model_class",
    "register_multi_exit_models",
    "scoring_every_exit",
    "simulate_exits",
    "validate_exit_config",
]

register_method(MULTI_EXIT, MultiExitConfig, MultiExitModel, prefix=MultiExitModel.prefix)
register_folder_check(MULTI_EXIT, check_saved_folder)
register_multi_exit_models()


def apply_multi_exit(model, config: MultiExitConfig, teacher=None):
    """``get_peft_model`` plus the distillation teacher (the function form of the method). Returns the
    ``PeftModel``."""
    from peft import get_peft_model

    if teacher is not None:  # before wrapping: a refused teacher leaves the model as it was
        check_teacher(model, teacher, config)
    peft_model = get_peft_model(model, config)
    if teacher is not None:
        peft_model.base_model.set_teacher(teacher)
    return peft_model


def multi_exit_model_class(base_cls: type) -> type:
    """Deprecated: every family's multi-exit model is :class:`MultiExitForSequenceClassification` (it holds the
    family's classifier as ``backbone``); this returns that class."""
    warnings.warn("multi_exit_model_class is deprecated and will be removed: every family's multi-exit model is "
                  "MultiExitForSequenceClassification (the classifier is its `backbone`)", FutureWarning, stacklevel=2)
    return MultiExitForSequenceClassification
