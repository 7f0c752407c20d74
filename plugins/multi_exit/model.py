"""Multi-exit tuner: exit heads after the backbone's blocks, the joint loss, early exit, saved state, merging."""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import CompressError
from compress.export import TAG, method_tag
from compress.pruning.compact import projection_shapes, reshape_to
from compress.pruning.engine import PruneReport, prune_model
from compress.tuner import CompressTuner

from .attach import (
    active_exit_heads,
    attach_exit_heads,
    call_with_exits,
    check_exits,
    check_saved_exits,
    check_teacher,
    detach_exit_heads,
    enable_exit_heads,
    refuse_meta_weights,
    scoring_every_exit,
)
from .config import EXIT_FIELDS, MultiExitConfig
from .layer import MultiExitLayer
from .modeling import build_exit_heads, make_multi_exit
from .runner import ExitSettings


class MultiExitModel(CompressTuner):
    """Creates a multi-exit classifier from a pretrained transformers sequence classifier (BERT/RoBERTa, Llama/Qwen2).

    An :class:`~.layer.ExitHead` follows each block in ``exit_layers`` before the last; the model's own head is
    the last exit. The forward runs the model unchanged and reads the blocks' outputs through hooks: while
    training (or without ``exit_threshold``) every exit classifies and the loss combines them
    (:mod:`.loss`); in eval mode with a threshold each example leaves at its first confident exit and the rest of
    the batch runs on (:mod:`.runner`). ``train_backbone`` trains the backbone too, and its weights are saved
    with the adapter; ``merge_and_unload()`` returns a standalone
    :class:`~.modeling.MultiExitForSequenceClassification`.

    Example::

        >>> import compress
        >>> from peft import get_peft_model
        >>> config = compress.MultiExitConfig(task_type="SEQ_CLS", distill_weight=0.5)
        >>> model = get_peft_model(base_model, config)
        >>> model.base_model.set_teacher(fine_tuned_model)  # for distillation
    """

    prefix: str = "exit_"
    tuner_layer_cls = MultiExitLayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None):
        self.__dict__["_teacher"] = None  # kept out of the module tree: never trained, saved or moved with it
        # PeftModel.from_pretrained(low_cpu_mem_usage=True) creates the tuner under init_empty_weights: new
        # parameters are meta, and the exit heads cannot start from the model's head
        if low_cpu_mem_usage or nn.Linear(1, 1).weight.is_meta:
            raise CompressError("low_cpu_mem_usage=True builds the adapter on the meta device, which multi-exit "
                                "models do not support (exit heads start from the model's own head); load it "
                                "without low_cpu_mem_usage: the adapter is small")
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    @property
    def active_config(self) -> MultiExitConfig:
        return self.peft_config[self.active_adapters[0]]

    # -- injection -----------------------------------------------------------------------------------------
    def _check_new_adapter_config(self, config: MultiExitConfig) -> None:
        if len(self.peft_config) > 1:
            raise CompressError("a multi-exit model holds one set of exits; wrap a fresh base model for another "
                                "adapter")

    def _pre_injection_hook(self, model: nn.Module, config: MultiExitConfig, adapter_name: str) -> None:
        refuse_meta_weights(model)
        check_exits(model, config.exit_layers, config.exit_loss_weights)
        if hasattr(model, "add_model_tags"):
            model.add_model_tags([TAG, method_tag(config.peft_type)])

    def _create_and_replace(self, *args, **kwargs) -> None:
        raise CompressError("internal: multi-exit models replace no module")  # pragma: no cover

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        if config.slender_shapes:  # a saved slenderized adapter: its backbone weights have these shapes
            reshape_to(model, config.slender_shapes)
        # built from the model's own head before peft wraps it
        heads = build_exit_heads(model, config.exit_layers, config.exit_head, config.exit_pooling)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        attach_exit_heads(self, model, adapter_name, heads, trainable=not config.inference_mode)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        config = next(iter(self.peft_config.values()))
        if config.train_backbone and not config.inference_mode:
            for name, param in model.named_parameters():
                if "original_module" not in name:  # peft's frozen original of a modules_to_save copy
                    param.requires_grad = True

    # -- slenderization ---------------------------------------------------------------------------------------
    def slenderize(self, data=None, tokenizer=None, num_batches: int = 8, batch_size: int = 16) -> PruneReport:
        """Remove the config's ``slenderize`` fractions of heads and FFN neurons with :func:`compress.prune_model`
        (``global`` mode), scored on the loss of every exit for ``data`` (labelled calibration data; not needed
        for ``magnitude``). Call it once, before training; the shapes are recorded in the config."""
        config = self.active_config
        if not config.slenderize:
            raise CompressError("slenderize() needs MultiExitConfig(slenderize={'heads': ..., 'ffn': ...})")
        if config.slender_shapes:
            raise CompressError("this model is already slenderized (slender_shapes is set); slenderize once, on "
                                "a freshly wrapped model")
        if data is None and config.slenderize_importance != "magnitude":
            raise CompressError(f"slenderize_importance={config.slenderize_importance!r} scores on labelled data: "
                                "pass data= (e.g. a tokenized training subset), or use 'magnitude'")
        with scoring_every_exit(self.model, self._heads(), config.exit_layers, config.exit_loss_weights):
            report = prune_model(self.model, sparsity=dict(config.slenderize), structures=list(config.slenderize),
                                 importance=config.slenderize_importance, data=data, mode="global",
                                 num_batches=num_batches, batch_size=batch_size, tokenizer=tokenizer)
        config.slender_shapes = projection_shapes(self.model)
        self._mark_only_adapters_as_trainable(self.model)  # the engine replaced pruned layers' parameters
        return report

    # -- teacher ---------------------------------------------------------------------------------------------
    def set_teacher(self, teacher: nn.Module | None) -> None:
        """The model whose logits (and hidden states) the exits distil; it runs in eval mode without gradients
        and is neither trained nor saved. ``None`` removes it."""
        if teacher is not None:
            check_teacher(self.model, teacher, self.active_config)
            teacher.eval().requires_grad_(False)
        self.__dict__["_teacher"] = teacher

    # -- the forward ----------------------------------------------------------------------------------------
    def _heads(self) -> nn.ModuleList | None:
        return active_exit_heads(self)

    def settings(self) -> ExitSettings:
        config = self.active_config
        return ExitSettings(config.exit_policy, config.exit_threshold, config.exit_loss_weights,
                            config.distill_weight, config.distill_temperature, config.distill_hidden_weight)

    def forward(self, *args, **kwargs):
        heads = self._heads()
        if heads is None:
            return self.model(*args, **kwargs)
        return call_with_exits(self.model, heads, self.active_config.exit_layers, self.settings(), args, kwargs,
                               teacher=self._teacher)

    # -- saved state: with a trained backbone, its weights travel with the exits ------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: MultiExitConfig, adapter_name: str,
                                state_dict: dict[str, torch.Tensor],
                                unwanted_adapter_names: list[str]) -> dict[str, torch.Tensor]:
        """The exit heads and, with ``train_backbone`` or after ``slenderize``, every backbone tensor under its
        model key (loading puts them back in place; peft passes keys without an adapter parameter through
        unchanged)."""
        entries = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if config.train_backbone or config.slender_shapes:  # trained, or pruned: the base checkpoint lacks it
            aside = (".exit_layer.", ".original_module.", ".modules_to_save.")
            entries.update({k: v for k, v in state_dict.items() if k not in entries and not any(a in k for a in aside)})
        return entries

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: MultiExitConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft's key mapping, then a check that the saved tensors are the ones this model and config expect
        (before peft's ``load_state_dict``, whose errors name neither the config field nor the cause)."""
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_saved_exits(model, config, adapter_name, state_dict)
        return state_dict

    # -- adapters on and off, merging -----------------------------------------------------------------------
    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        enable_exit_heads(self, enabled)

    # -- merging --------------------------------------------------------------------------------------------
    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs):
        config = self.active_config
        heads = detach_exit_heads(self)
        model = super()._unload_and_optionally_merge(merge=False, **kwargs)
        if heads is None or not merge:
            return model
        return make_multi_exit(model, heads, {name: getattr(config, name) for name in EXIT_FIELDS})

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        del self.peft_config[adapter_name]
        self.exit_layer.exit_heads.pop(adapter_name, None)
        self.active_adapter = list(self.peft_config)[:1]
