"""Pruning-Adapter tuner: adapter injection, replay of the pruning plan, saved state, merging."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from compress._allocator import map_large_cpu_allocations, release_freed_memory
from compress.distributed import check_unsharded, refresh_ddp
from compress.errors import CompressError
from compress.export import TAG, method_tag
from compress.pruning.arch import ARCH_SPECS, arch_spec, spec_class
from compress.pruning.compact import PREFIX as COMPACT_PREFIX
from compress.pruning.compact import make_compact
from compress.pruning.engine import check_support, check_uniform_result
from compress.pruning.optim import remap_optimizer
from compress.pruning.surgery import apply_checked, build_dependency_graph, check_hidden_group
from compress.tuner import CompressLoraModel, float_linear

from ..multi_exit import (
    EXIT_FIELDS,
    ExitSettings,
    active_exit_heads,
    attach_exit_heads,
    build_exit_heads,
    call_with_exits,
    check_exits,
    detach_exit_heads,
    enable_exit_heads,
    make_multi_exit,
    scoring_every_exit,
)
from .config import PruningAdapterConfig
from .distill import Distillation
from .layer import Linear, PruningAdapterLayer, dequantized_linear, quantize_linear, rebuilt
from .plan import (
    ADVICE,
    PLAN_KEY,
    SAVED_COPY,
    check_plan,
    decode_plan,
    describe_difference,
    encode_plan,
    recorded_widths,
    replay_events,
    same_events,
)
from .pruning import PruningEvent, add_compensation_biases, compensate, oneshot_event
from .schedule import SCHEDULE_PREFIX, PruningSchedule

logger = logging.getLogger(__name__)



class ArchTargetModules(Mapping):
    """``model_type`` -> the attention and FFN projections of its architecture family
    (:attr:`compress.pruning.arch.ArchSpec.projection_names`), compact types included: LoRA's
    ``target_module_mapping`` for the families :mod:`compress.pruning.arch` knows."""

    def __getitem__(self, model_type: str) -> list[str]:
        spec = spec_class(model_type)
        if spec is None or not spec.projection_names:
            raise KeyError(model_type)
        return list(spec.projection_names)

    def __iter__(self) -> Iterator[str]:
        for spec in ARCH_SPECS:
            for model_type in spec.model_types:
                yield model_type
                yield COMPACT_PREFIX + model_type

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _is_saved_state(key: str) -> bool:
    """Whether a state-dict key is one of the entries the tuner adds (plan copy, schedule statistics)."""
    return key == PLAN_KEY or key.startswith(SCHEDULE_PREFIX)


class PruningAdapterModel(CompressLoraModel):
    """Creates a Pruning-Adapter model from a pretrained transformers model.

    The backbone is frozen; its FFN neurons, attention heads, blocks and hidden channels are scored by the task
    (gradients of the loss with respect to per-structure gates, never weight gradients), physically removed, and
    LoRA adapters (peft's layers, see :mod:`.layer`) train on the smaller model. ``merge_and_unload()`` returns a
    transformers model with the pruned shapes and the adapters folded in.

    Pruning happens either with :meth:`prune` (oneshot on calibration data, before training; :mod:`.pruning`)
    or during training through :class:`~compress.plugins.pruning_adapter.PruningAdapterCallback`, which scores
    on the training batches themselves (:mod:`.schedule`). ``distill_weight > 0`` adds :mod:`.distill`.

    Saving puts a copy of the pruning plan in the adapter weights (and, while scoring, the statistics gathered
    since the last event); loading checks the config's plan against it, and replays the events a training
    checkpoint has beyond the model's, so ``Trainer.train(resume_from_checkpoint=...)`` works on a freshly
    built model.

    Example::

        >>> import compress
        >>> from peft import get_peft_model
        >>> config = compress.PruningAdapterConfig(task_type="SEQ_CLS", sparsity={"ffn": 0.5}, r=8)
        >>> model = get_peft_model(base_model, config)
        >>> model.base_model.prune(data=calibration_dataset, tokenizer=tokenizer)  # or the callback
    """

    # LoRA's prefix and saved keys, as AdaLoRA keeps them; the adapters' defaults come from the architecture
    tuner_layer_cls = PruningAdapterLayer
    target_module_mapping = ArchTargetModules()
    legacy_matrix_names = ("pa_A", "pa_B")

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None):
        self._schedule = PruningSchedule()
        # kept out of the module tree: the teacher is never saved, moved or trained with the model
        self.__dict__["distillation"] = None
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    @property
    def active_config(self) -> PruningAdapterConfig:
        return self.peft_config[self.active_adapters[0]]

    # -- injection -----------------------------------------------------------------------------------
    def _check_new_adapter_config(self, config: PruningAdapterConfig) -> None:
        super()._check_new_adapter_config(config)
        # before LoRA looks up the default targets: an unknown architecture is refused by name
        check_support(arch_spec(self.model), config.spec.sparsity, config.mode)
        if not config.pruning_plan:  # a new plan: refuse final widths the config cannot express
            check_uniform_result(arch_spec(self.model), config.spec)

    def _pre_injection_hook(self, model: nn.Module, config: PruningAdapterConfig, adapter_name: str) -> None:
        self._check_targets(model, config)
        if config.exits is not None:
            check_exits(model, config.exits.get("exit_layers"), config.exits.get("exit_loss_weights", "linear"))
        if "hidden" in config.spec.sparsity and not config.pruning_plan and not any(
                isinstance(m, BaseTunerLayer) for m in model.modules()):
            _check_hidden_stream(model)  # traced on the plain model: adapter layers would be couplings it does not know
        if hasattr(model, "add_model_tags"):  # peft's model card of the saved adapter carries them
            model.add_model_tags([TAG, method_tag(config.peft_type)])
        if config.distill_weight and not config.inference_mode and self.distillation is None:
            # before replay/pruning: the teacher is the dense original
            self.__dict__["distillation"] = Distillation.attach(self, model, config.distill_weight)
        add_compensation_biases(model, config)  # before the replay, as before the events it replays
        if config.pruning_plan:
            self._replay(model, config)

    def _prepare_adapter_config(self, peft_config: PruningAdapterConfig, model_config: dict) -> PruningAdapterConfig:
        defaults = peft_config.target_modules is None
        peft_config = super()._prepare_adapter_config(peft_config, model_config)  # from target_module_mapping
        if defaults:
            # the family's projections this model has (e.g. T5's wi, or its gated wi_0/wi_1), so that the saved
            # config names only existing modules
            names = [n for n, _ in self.model.named_modules()]
            peft_config.target_modules = {
                t for t in peft_config.target_modules if any(n == t or n.endswith("." + t) for n in names)}
        return peft_config

    @staticmethod
    def _check_targets(model: nn.Module, config: PruningAdapterConfig) -> None:
        if not isinstance(config.target_modules, (set, list, tuple)):
            return  # None (defaults) or a regex: peft resolves and reports those
        names = [n for n, _ in model.named_modules()]
        missing = sorted(t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in names))
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise CompressError(f"target_modules {missing} match no module of {type(model).__name__}; "
                                f"its linear layers are named: {', '.join(linear)}")

    @staticmethod
    def _create_new_module(lora_config: PruningAdapterConfig, adapter_name: str, target: nn.Module,
                           **kwargs) -> Linear:
        """The Pruning-Adapter layer around a target (LoRA's ``_create_and_replace`` calls this for a new one)."""
        float_linear(target, kwargs.get("target_name", ""), "Pruning-Adapter adapts float torch.nn.Linear layers "
                     "only (load the base model unquantised: quantize_backbone quantises after pruning); adjust "
                     "target_modules")
        return Linear(target, adapter_name, config=lora_config, **kwargs)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        config = self.peft_config[adapter_name]
        if config.exits is not None:
            options = self.exit_options()
            heads = build_exit_heads(model, options["exit_layers"], options["exit_head"], options["exit_pooling"])
            attach_exit_heads(self, model, adapter_name, heads, trainable=not config.inference_mode)
        if config.quantize_backbone and config.pruning_plan and config.pruning_plan[-1].get("final"):
            self.quantize_backbone(config.quantize_backbone)  # reloading a finished, quantised adapter

    def quantize_backbone(self, bits: str) -> None:
        """Keep every adapted base layer in bitsandbytes ``bits`` (``"8bit"``/``"4bit"``) from now on: each layer
        becomes peft's bitsandbytes LoRA class (with pruning added) around the quantised base, holding the same
        adapter parameters."""
        self._rebuild_layers(lambda layer: None if layer.quantized else quantize_linear(layer.get_base_layer(), bits))

    def dequantize_backbone(self) -> None:
        """Bring quantised base layers back to float32 ``nn.Linear`` layers (merging does this first)."""
        self._rebuild_layers(lambda layer: dequantized_linear(layer.get_base_layer()) if layer.quantized else None)

    def _rebuild_layers(self, new_base) -> None:
        """Replace every adapter layer for which ``new_base(layer)`` gives a base layer by :func:`.layer.rebuilt`."""
        for name, layer in [(n, m) for n, m in self.model.named_modules() if isinstance(m, PruningAdapterLayer)]:
            base = new_base(layer)
            if base is None:
                continue
            parent_name, _, child_name = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            self._replace_module(parent, child_name, rebuilt(layer, base, self.peft_config), layer)

    # -- replay: the pruned shapes on the original base model ---------------------------------------------
    def _replay(self, model: nn.Module, config: PruningAdapterConfig) -> None:
        """Re-create the pruned shapes recorded in ``config.pruning_plan`` on the original base model, checking
        every event (:func:`~compress.plugins.pruning_adapter.plan.replay_events`)."""
        plan = config.pruning_plan
        check_plan(plan)  # the config checked it when built; it may have been changed in memory since
        widths = recorded_widths(arch_spec(model), "hidden" in plan[0]["widths_before"])
        if widths == plan[-1]["widths_after"]:
            return  # this base model is already pruned as recorded
        if widths != plan[0]["widths_before"]:
            raise CompressError(
                f"the base model's layer widths {widths} match neither the original model this adapter was "
                f"trained on ({plan[0]['widths_before']}) nor its pruned form; load the adapter onto the base "
                "model it was created from")
        replay_events(model, plan)
        _finish_shapes(model)

    def finish_shapes(self) -> None:
        """After a structural change: the compact model class when widths differ per layer."""
        _finish_shapes(self.model)

    def settle_memory(self) -> None:
        """After a pruning event on CPU: uneven widths from here on, so glibc would hoard blocks of the old shapes
        (:mod:`compress._allocator`)."""
        if next(self.model.parameters()).device.type == "cpu":
            map_large_cpu_allocations()
            release_freed_memory()

    # -- saved state: the plan and the schedule's statistics travel with the adapter weights (see plan.py) ----
    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: PruningAdapterConfig, adapter_name: str,
                                state_dict: dict[str, torch.Tensor],
                                unwanted_adapter_names: list[str]) -> dict[str, torch.Tensor]:
        """The adapter's tensors, a copy of its pruning plan and, while scoring, the schedule's statistics."""
        entries = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        entries[PLAN_KEY] = encode_plan(config.pruning_plan)
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, cls) and tuner.active_adapters[:1] == [adapter_name]:
            entries.update(tuner._schedule.state_dict())
        return entries

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """peft's key translation; the plan copy and schedule statistics keep their keys."""
        if _is_saved_state(key):
            return key  # written without an adapter name; a unit key could end like one
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: PruningAdapterConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Before peft loads saved adapter weights: compare the plan saved with them to the config's (replaying
        the events a training checkpoint has beyond it), check the tensors' shapes, and hand the schedule its
        statistics. Every loading path (``PeftModel.from_pretrained``, ``load_adapter``, the ``Trainer``
        resuming from a checkpoint) goes through here."""
        ours = {k: v for k, v in state_dict.items() if _is_saved_state(k)}
        state_dict = {k: v for k, v in state_dict.items() if k not in ours}
        tuner = getattr(model, "base_model", None)
        tuner = tuner if isinstance(tuner, cls) else None
        saved_plan = decode_plan(ours[PLAN_KEY]) if PLAN_KEY in ours else None
        if tuner is not None:
            tuner._match_saved_plan(config, saved_plan)
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        cls._check_saved_tensors(model, adapter_name, state_dict, saved_plan is not None)
        schedule_state = {k: v for k, v in ours.items() if k != PLAN_KEY}
        if tuner is not None and schedule_state:
            tuner._schedule.load_state_dict(schedule_state)
        return state_dict

    def _match_saved_plan(self, config: PruningAdapterConfig, saved: list[dict] | None) -> None:
        """Refuse a config plan that differs from the copy saved with the weights; replay the events the copy
        has beyond it (a training checkpoint loaded onto a freshly built model)."""
        current = config.pruning_plan
        if saved is None:
            logger.warning("these adapter weights were saved by an older peft-compress and carry no copy of the "
                           "pruning plan: pruning_plan passed its checks, but an index changed without changing "
                           "the widths cannot be detected, and a training checkpoint's importance statistics are "
                           "missing. Save the adapter again to add them")
            return
        for index, (ours, theirs) in enumerate(zip(current, saved)):
            if same_events(ours, theirs) or (index == len(saved) - 1 and same_events({**ours, "final": False}, theirs)):
                continue  # (the last event may have been marked final after this checkpoint: same shapes)
            step = f" (step {theirs['step']})" if "step" in theirs else ""
            raise CompressError(f"pruning_plan[{index}]{step} differs from the copy saved with the adapter weights "
                                f"(adapter_model.safetensors) in {describe_difference(ours, theirs)}. {ADVICE}")
        if len(current) > len(saved):
            raise CompressError(f"the model is already pruned by {len(current)} events and these adapter weights were "
                                f"saved after {len(saved)}: pruning cannot be undone. To resume training from them, "
                                "build the model afresh (get_peft_model on the original base model); to use them, "
                                "load them onto the original base model (PeftModel.from_pretrained)")
        if len(saved) > len(current):
            self._replay_saved(config, saved, len(current))

    def _replay_saved(self, config: PruningAdapterConfig, saved: list[dict], start: int) -> None:
        """Prune the adapted model by ``saved[start:]`` (adapters included), as the checkpointed run did."""
        logger.info("replaying pruning events %d..%d saved with the adapter weights", start, len(saved) - 1)
        scoring = self._schedule.active
        self._schedule.stop(self.model, keep_checkpointing=True)  # the gates belong to the shapes before the replay
        replay_events(self.model, saved[start:], start, source=SAVED_COPY)
        config.pruning_plan.extend(saved[start:])
        self.finish_shapes()
        self.settle_memory()
        if config.pruning_plan[-1]["final"] and config.quantize_backbone:
            self.quantize_backbone(config.quantize_backbone)
        if scoring:
            self._schedule.start(self.model, config)

    @classmethod
    def _check_saved_tensors(cls, model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor],
                             had_plan: bool) -> None:
        """The saved adapter tensors must have the shapes the replayed plan built; missing ones are reported."""
        # parameters and buffers, not state_dict(): quantised base layers would serialise their weights for it
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        layers = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, PruningAdapterLayer))
        ours = {k: t for k, t in tensors.items() if k.startswith(layers) and ".base_layer." not in k
                and (f".{adapter_name}." in k or k.endswith(f".{adapter_name}"))}
        wrong = [(k, tuple(v.shape), tuple(ours[k].shape)) for k, v in state_dict.items()
                 if k in ours and tuple(v.shape) != tuple(ours[k].shape)]
        if wrong:
            key, saved, rebuilt = wrong[0]
            old = ("" if had_plan else " (these weights carry no copy of the plan: saved by an older peft-compress, "
                   "whose training checkpoints of a pruned model cannot be resumed on a freshly built one)")
            raise CompressError(f"{len(wrong)} saved adapter tensors do not have the shapes pruning_plan rebuilds, "
                                f"e.g. {key}: saved {saved}, rebuilt {rebuilt}{old}. {ADVICE}")
        missing = sorted(set(ours) - set(state_dict))
        if missing:
            logger.warning("%d adapter tensors are missing from the saved weights and keep their initial values, "
                           "e.g. %s", len(missing), missing[0])

    # -- exits (``exits``): a multi-exit model on the pruned backbone -------------------------------------------
    def exit_options(self) -> dict:
        """The active config's ``exits`` with the multi-exit defaults filled in (empty without exits)."""
        exits = self.active_config.exits
        return {} if exits is None else {**EXIT_FIELDS, **exits}

    def _exit_heads(self) -> nn.ModuleList | None:
        return active_exit_heads(self)

    def forward(self, *args, **kwargs):
        heads = self._exit_heads()
        if heads is None:
            return super().forward(*args, **kwargs)
        options = self.exit_options()
        settings = ExitSettings(options["exit_policy"], options["exit_threshold"], options["exit_loss_weights"])
        return call_with_exits(self.model, heads, options["exit_layers"], settings, args, kwargs)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        enable_exit_heads(self, enabled)

    # -- merging -------------------------------------------------------------------------------------
    def merge_adapter(self, *args, **kwargs) -> None:
        """peft's ``merge_adapter``, into float base layers (quantised ones are dequantised first)."""
        self.dequantize_backbone()
        super().merge_adapter(*args, **kwargs)

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs):
        if self.distillation is not None:
            self.distillation.release()  # merging writes into base weights the teacher may share
        if merge:
            self.dequantize_backbone()  # merging gives a float model
        options = self.exit_options()
        heads = detach_exit_heads(self)
        model = super()._unload_and_optionally_merge(merge=merge, **kwargs)
        if heads is None or not merge:
            return model
        return make_multi_exit(model, heads, options)

    # -- pruning: events planned by pruning.py and schedule.py, applied here ---------------------------------
    @property
    def pruning_finished(self) -> bool:
        """Whether the configured final sparsity has been reached (or replayed from a checkpoint)."""
        return self.active_config.pruning_finished

    def prune(self, data=None, tokenizer=None, num_batches: int = 8, batch_size: int = 16,
              optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Oneshot: score on calibration ``data`` (gate gradients only) and prune to the final sparsity.

        Args:
            data: a tokenized ``datasets.Dataset`` with labels, or an iterable of model-input dicts. Not
                needed for ``importance='magnitude'`` or ``'random'``.
            tokenizer: pads a Dataset's rows into batches.
            num_batches, batch_size: how much calibration data to use.
            optimizer: an existing optimizer to keep consistent with the pruned parameters.

        Returns:
            The recorded pruning event (structures, removed indices, widths before/after).
        """
        check_unsharded(self.model, "prune a Pruning-Adapter model")  # before scoring: its passes would fail obscurely
        config = self.active_config
        heads = self._exit_heads()
        if heads is None:
            return self.apply_event(oneshot_event(self.model, config, data, tokenizer, num_batches, batch_size),
                                    optimizer)
        options = self.exit_options()
        with scoring_every_exit(self.model, heads, options["exit_layers"], options["exit_loss_weights"]):
            return self.apply_event(oneshot_event(self.model, config, data, tokenizer, num_batches, batch_size),
                                    optimizer)

    def apply_event(self, event: PruningEvent, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Carry out a planned :class:`~.pruning.PruningEvent`: fold the removed channels' mean contribution into
        the bias buffers (``compensate_bias``), remove them from the backbone and the adapters together, slice
        ``optimizer``'s parameters and state to match, record the event in ``pruning_plan`` (quantising the
        backbone after the final one, with ``quantize_backbone``). Returns the recorded event."""
        config = self.active_config
        if event.means:
            compensate(event)
        layers = [m for m in self.model.modules() if isinstance(m, PruningAdapterLayer)]
        for layer in layers:
            layer.pruned_params.clear()
        # the adapter layers record what they replaced; the rest (e.g. peft's trained copies of norms and of the
        # classifier, on the residual stream) comes back from apply_checked
        replaced = apply_checked(event.checked)
        self.finish_shapes()
        if optimizer is not None:
            replaced.update({k: v for layer in layers for k, v in layer.pruned_params.items()})
            remap_optimizer(optimizer, replaced, list(self.model.parameters()))
        for layer in layers:
            layer.pruned_params.clear()
        replaced.clear()
        self.settle_memory()
        record = event.record(self.model)
        config.pruning_plan.append(record)
        if event.final and config.quantize_backbone:
            self.quantize_backbone(config.quantize_backbone)
        logger.info("pruned %s: widths %s", ", ".join(f"{k} {v:.0%}" for k, v in event.sparsity.items()),
                    record["widths_after"])
        return record

    def pruning_steps(self) -> list[int]:
        """Training steps (``global_step`` after the optimizer step) at which pruning happens."""
        return self._schedule.steps(self.active_config)

    def start_scoring(self) -> None:
        """Attach gates so the training loss gives importance gradients; no-op once pruning is finished."""
        self._schedule.start(self.model, self.active_config)

    def stop_scoring(self, keep_checkpointing: bool = False) -> None:
        """Detach the gates (and stop checkpointing, unless ``keep_checkpointing``: more pruning follows)."""
        self._schedule.stop(self.model, keep_checkpointing)

    def update_and_prune(self, global_step: int, optimizer: torch.optim.Optimizer | None = None) -> dict | None:
        """The schedule's one entry point per training step (as AdaLoRA's ``update_and_allocate``), after
        ``optimizer.step()``: fold this step's gate gradients into the importance estimate and, if
        ``global_step`` is a pruning step, prune (:meth:`apply_event`). Returns the recorded event, if any.

        Example::

            >>> model.base_model.start_scoring()
            >>> for step, batch in enumerate(batches, 1):
            ...     model(**batch).loss.backward()
            ...     optimizer.step()
            ...     model.base_model.update_and_prune(step, optimizer)
            ...     optimizer.zero_grad()
            >>> model.base_model.stop_scoring()
        """
        config = self.active_config
        due = self._schedule.update(self.model, config, global_step)
        if due is None:
            return None
        record = None
        if due.event is not None:
            record = self.apply_event(due.event, optimizer)
            ddp = self._schedule.ddp()
            if ddp is not None:
                refresh_ddp(ddp)
        elif due.final and config.pruning_plan:  # the widths already are the final ones
            config.pruning_plan[-1]["final"] = True
            if config.quantize_backbone:
                self.quantize_backbone(config.quantize_backbone)
        if not due.final:
            self._schedule.start(self.model, config)
        return record

    def scoring_step(self, global_step: int, optimizer: torch.optim.Optimizer | None = None) -> dict | None:
        """Deprecated name of :meth:`update_and_prune`, kept until the next release."""
        warnings.warn("PruningAdapterModel.scoring_step is deprecated and will be removed in the next release: "
                      "call update_and_prune (same arguments)", FutureWarning, stacklevel=2)
        return self.update_and_prune(global_step, optimizer)


def _finish_shapes(model: nn.Module) -> None:
    if not arch_spec(model).fits_standard_config():
        make_compact(model)


def _check_hidden_stream(model: nn.Module) -> None:
    """Refuse hidden-size pruning of a model whose residual stream reaches layers the architecture spec does not
    declare (e.g. a task head it does not know), before adapters wrap them: traced once on the plain model, as
    :func:`compress.prune_model` does, since pruning the adapted model skips the dependency graph."""
    arch = arch_spec(model)
    check_hidden_group(model, arch.hidden_site(), build_dependency_graph(model))
