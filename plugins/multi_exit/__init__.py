"""Multi-exit models: a classifier after several blocks of an encoder, trained jointly (with distillation from
a teacher), and early exit per example at inference that removes finished examples from the running batch.

After "COST-EFF: Collaborative Optimization of Spatial and Temporal Efficiency with Slenderized Multi-exit
Language Models" (Shen et al., EMNLP 2022); exit policies after DeeBERT (entropy) and PABEE (patience).
"""

from __future__ import annotations

from compress.registry import register_method

from .attach import check_teacher
from .calibrate import (
    ThresholdChoice,
    calibrate_exit_threshold,
    choose_exit_threshold,
    collect_exit_logits,
    exit_block_indices,
)
from .config import MULTI_EXIT, MultiExitConfig, check_exit_fields, validate_exit_config
from .layer import ExitHead
from .model import MultiExitModel
from .modeling import make_multi_exit, multi_exit_model_class, register_multi_exit_models
from .policy import POLICIES, simulate_exits
from .runner import MultiExitClassifierOutput

__all__ = [
    "MULTI_EXIT",
    "POLICIES",
    "ExitHead",
    "MultiExitClassifierOutput",
    "MultiExitConfig",
    "MultiExitModel",
    "ThresholdChoice",
    "apply_multi_exit",
    "calibrate_exit_threshold",
    "check_exit_fields",
    "choose_exit_threshold",
    "collect_exit_logits",
    "exit_block_indices",
    "make_multi_exit",
    "multi_exit_model_class",
    "register_multi_exit_models",
    "simulate_exits",
    "validate_exit_config",
]

register_method(MULTI_EXIT, MultiExitConfig, MultiExitModel, prefix=MultiExitModel.prefix)
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
