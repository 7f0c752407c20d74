"""Pruning-Adapter tuner: prune the frozen backbone by task importance, train low-rank adapters on it."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from compress._allocator import map_large_cpu_allocations, release_freed_memory
from compress.errors import CompressError
from compress.pruning.arch import get_adapter
from compress.pruning.compact import make_compact
from compress.pruning.compensate import bias_shifts, output_projection, record_input_means
from compress.pruning.distill import (
    HIDDEN_STATE_FIELDS,
    follow_student,
    frozen_teacher,
    hidden_state_loss,
    hidden_state_masks,
    hidden_states_of,
)
from compress.pruning.engine import (
    apply_removals,
    check_support,
    forward_passes,
    plan_removals,
    score_units,
    width_cap,
)
from compress.pruning.importance import Unit, get_importance, task_loss, units_for
from compress.pruning.optim import remap_optimizer

from .config import PruningAdapterConfig
from .layer import Linear, PruningAdapterLayer
from .plan import (
    ADVICE,
    PLAN_KEY,
    SAVED_COPY,
    check_plan,
    decode_plan,
    describe_difference,
    encode_plan,
    replay_events,
    same_events,
)
from .schedule import SCHEDULE_PREFIX, PruningSchedule, total_width
from .schedule import cubic_sparsity as cubic_sparsity  # re-exported: it lived here before schedule.py

logger = logging.getLogger(__name__)


def _is_saved_state(key: str) -> bool:
    """Whether a state-dict key is one of the entries the tuner adds (plan copy, schedule statistics)."""
    return key == PLAN_KEY or key.startswith(SCHEDULE_PREFIX)


_ATTN_FFN = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "t5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
}
TARGET_MODULES = {
    model_type: _ATTN_FFN[family]
    for family, types in {"bert": ("bert", "roberta"), "llama": ("llama", "qwen2"), "t5": ("t5",)}.items()
    for base in types
    for model_type in (base, f"compressed_{base}")
}


class PruningAdapterModel(BaseTuner):
    """Creates a Pruning-Adapter model from a pretrained transformers model.

    The backbone is frozen; its FFN neurons, attention heads and blocks are scored by the task
    (gradients of the loss with respect to per-structure gates, never weight gradients), physically
    removed, and low-rank adapters train on the smaller model. ``merge_and_unload()`` returns a plain
    transformers model with the pruned shapes and the adapters folded in.

    Pruning happens either with :meth:`prune` (oneshot on calibration data, before training) or during
    training through :class:`~compress.plugins.pruning_adapter.PruningAdapterCallback`, which scores on
    the training batches themselves.

    Saving puts a copy of the pruning plan in the adapter weights (and, while scoring, the statistics gathered
    since the last event); loading checks the config's plan against it, and replays the events a training
    checkpoint has beyond the model's, so ``Trainer.train(resume_from_checkpoint=...)`` works on a freshly
    built model.

    Example::

        >>> import compress
        >>> from peft import get_peft_model
        >>> config = compress.PruningAdapterConfig(task_type="SEQ_CLS", ffn_sparsity=0.5, r=8)
        >>> model = get_peft_model(base_model, config)
        >>> model.base_model.prune(data=calibration_dataset, tokenizer=tokenizer)  # or the callback
    """

    prefix: str = "pa_"
    tuner_layer_cls = PruningAdapterLayer
    target_module_mapping = TARGET_MODULES

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None):
        self._schedule = PruningSchedule(self)
        # the distillation teacher is kept out of the module tree: never saved, moved or trained with the model
        self.__dict__["_teacher"] = None
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # -- injection -----------------------------------------------------------------------------------
    def _pre_injection_hook(self, model: nn.Module, config: PruningAdapterConfig, adapter_name: str) -> None:
        adapter = get_adapter(model)
        check_support(adapter, config.ratios, config.mode)
        self._check_targets(model, config)
        if config.distill_weight and not config.inference_mode and self._teacher is None:
            self.__dict__["_teacher"] = frozen_teacher(model)  # before replay/pruning: the dense original
        if config.pruning_plan:
            self._replay(model, config)

    def _prepare_adapter_config(self, peft_config: PruningAdapterConfig, model_config: dict) -> PruningAdapterConfig:
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        if isinstance(peft_config.target_modules, (set, list)):
            # the family default lists every variant (e.g. T5's wi and gated wi_0/wi_1); keep those present,
            # so the saved config names only modules this model has
            names = [n for n, _ in self.model.named_modules()]
            defaults = set(TARGET_MODULES.get(model_config.get("model_type", ""), []))
            peft_config.target_modules = {
                t for t in peft_config.target_modules
                if t not in defaults or any(n == t or n.endswith("." + t) for n in names)}
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

    def _replay(self, model: nn.Module, config: PruningAdapterConfig) -> None:
        """Re-create the pruned shapes recorded in ``config.pruning_plan`` on the original base model, checking
        every event (:func:`~compress.plugins.pruning_adapter.plan.replay_events`)."""
        widths = get_adapter(model).widths()
        plan = config.pruning_plan
        check_plan(plan)  # the config checked it when built; it may have been changed in memory since
        if widths == plan[-1]["widths_after"]:
            return  # this base model is already pruned as recorded
        if widths != plan[0]["widths_before"]:
            raise CompressError(
                f"the base model's layer widths {widths} match neither the original model this adapter was "
                f"trained on ({plan[0]['widths_before']}) nor its pruned form; load the adapter onto the base "
                "model it was created from")
        replay_events(model, plan)
        self._finish_shapes(model, config)

    @staticmethod
    def _finish_shapes(model: nn.Module, config: PruningAdapterConfig) -> None:
        if not get_adapter(model).fits_standard_config():
            make_compact(model)

    # -- the plan and the schedule's statistics travel with the adapter weights (see plan.py) ------------
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
        cls._check_saved_shapes(model, state_dict, saved_plan is not None)
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
        self._schedule.stop(keep_checkpointing=True)  # the gates belong to the shapes before the replay
        replay_events(self.model, saved[start:], start, source=SAVED_COPY)
        config.pruning_plan.extend(saved[start:])
        self._finish_shapes(self.model, config)
        if next(self.model.parameters()).device.type == "cpu":
            map_large_cpu_allocations()  # as after a pruning event (compress._allocator)
            release_freed_memory()
        if config.pruning_plan[-1]["final"] and config.quantize_backbone:
            self.quantize_backbone(config.quantize_backbone)
        if scoring:
            self._schedule.start()

    @classmethod
    def _check_saved_shapes(cls, model: nn.Module, state_dict: dict[str, torch.Tensor], had_plan: bool) -> None:
        # parameters and buffers, not state_dict(): quantised base layers would serialise their weights for it
        expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state_dict.items()
                 if cls.prefix in k and k in expected and tuple(v.shape) != tuple(expected[k].shape)]
        if wrong:
            key, saved, rebuilt = wrong[0]
            old = ("" if had_plan else " (these weights carry no copy of the plan: saved by an older peft-compress, "
                   "whose training checkpoints of a pruned model cannot be resumed on a freshly built one)")
            raise CompressError(f"{len(wrong)} saved adapter tensors do not have the shapes pruning_plan rebuilds, "
                                f"e.g. {key}: saved {saved}, rebuilt {rebuilt}{old}. {ADVICE}")

    def _create_and_replace(self, config: PruningAdapterConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **optional_kwargs) -> None:
        kwargs = {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
                  "init_weights": config.init_weights, "compensate_bias": config.compensate_bias}
        if isinstance(target, PruningAdapterLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise CompressError(f"target module {current_key!r} is a {type(base).__name__}; Pruning-Adapter adapts "
                                "torch.nn.Linear layers only: adjust target_modules")
        new_module = Linear(target, adapter_name, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        config = self.peft_config[adapter_name]
        if config.quantize_backbone and config.pruning_plan and config.pruning_plan[-1].get("final"):
            self.quantize_backbone(config.quantize_backbone)  # reloading a finished, quantised adapter

    def quantize_backbone(self, bits: str) -> None:
        """Keep every adapted base layer in bitsandbytes ``bits`` (``"8bit"``/``"4bit"``) from now on."""
        for module in self.model.modules():
            if isinstance(module, PruningAdapterLayer):
                module.quantize_base(bits)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # BaseTuner's version re-ties `weight`/`bias` from the old child, which fails for unloaded modules
        # without a weight (e.g. RobertaClassificationHead in modules_to_save) and is unnecessary here:
        # adapter layers wrap their base layer, and update_layer already placed adapters on its device.
        setattr(parent, child_name, new_module)

    # -- distillation --------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """The wrapped model's forward; while training with ``distill_weight > 0`` and a loss, the loss also
        gets ``distill_weight`` x the mean squared error between every layer's hidden states and the frozen
        dense teacher's (:mod:`compress.pruning.distill`)."""
        teacher, weight = self._teacher, self._config.distill_weight
        if teacher is None or not weight or not self.model.training or not torch.is_grad_enabled():
            return self.model.forward(*args, **kwargs)
        if kwargs.get("return_dict") is False or (kwargs.get("labels") is None and not args):
            self._warn_no_distillation("the forward gets no labels (so returns no loss to add to)"
                                       if kwargs.get("return_dict") is not False else "return_dict=False")
            return self.model.forward(*args, **kwargs)
        wanted_hidden = kwargs.get("output_hidden_states")
        outputs = self.model.forward(*args, **{**kwargs, "output_hidden_states": True})
        if not isinstance(outputs, Mapping):  # tuples by the model config's own choice (use_return_dict)
            self._warn_no_distillation("the model returns tuples")
            return outputs
        if outputs.get("loss") is None:
            self._warn_no_distillation("the model returned no loss")
        else:
            student = next(p for p in self.model.parameters() if p.is_floating_point())
            follow_student(teacher, student.device, student.dtype)
            with torch.no_grad():
                target = teacher(*args, **{**kwargs, "output_hidden_states": True})
            masks = hidden_state_masks(outputs, kwargs.get("attention_mask"), kwargs.get("decoder_attention_mask"))
            outputs.loss = outputs.loss + weight * hidden_state_loss(hidden_states_of(outputs),
                                                                     hidden_states_of(target), masks)
        if not wanted_hidden:  # give the caller the output it asked for, and free the states early
            outputs = type(outputs)(**{k: v for k, v in outputs.items() if k not in HIDDEN_STATE_FIELDS})
        return outputs

    def _warn_no_distillation(self, why: str) -> None:
        if not self.__dict__.get("_warned_no_distillation"):
            self.__dict__["_warned_no_distillation"] = True
            logger.warning("distill_weight=%s is set, but %s: this step trains without the distillation term "
                           "(pass labels in the batch; with the Trainer, label smoothing and compute_loss_func "
                           "take them away)", self._config.distill_weight, why)

    def release_teacher(self) -> None:
        """Drop the distillation teacher (and the dense weights only it still holds); merging does this."""
        self.__dict__["_teacher"] = None

    def _unload_and_optionally_merge(self, *args, **kwargs):
        self.release_teacher()  # merging writes into base weights the teacher may share
        return super()._unload_and_optionally_merge(*args, **kwargs)

    # -- pruning -------------------------------------------------------------------------------------
    @property
    def _config(self) -> PruningAdapterConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def pruning_finished(self) -> bool:
        """Whether the configured final sparsity has been reached (or replayed from a checkpoint)."""
        plan = self._config.pruning_plan
        return bool(plan) and plan[-1].get("final", False)

    def _units(self) -> list[Unit]:
        return units_for(get_adapter(self.model), self._config.ratios)

    def prune(self, data=None, tokenizer=None, num_batches: int = 8, batch_size: int = 16,
              optimizer: torch.optim.Optimizer | None = None, head_warmup_steps: int = 0,
              head_lr: float = 1e-3) -> dict:
        """Oneshot: score on calibration ``data`` (gate gradients only) and prune to the final sparsity.

        Args:
            data: a tokenized ``datasets.Dataset`` with labels, or an iterable of model-input dicts. Not
                needed for ``importance='magnitude'`` or ``'random'``.
            tokenizer: pads a Dataset's rows into batches.
            num_batches, batch_size: how much calibration data to use.
            optimizer: an existing optimizer to keep consistent with the pruned parameters.
            head_warmup_steps: first train the task head (``modules_to_save``, e.g. a new classifier) for this
                many steps on the calibration batches, so the task loss that scores the backbone comes from a
                head that knows the task rather than a random one. Only the head gets gradients: backprop
                never enters the backbone, so this costs about as little memory as inference.
            head_lr: learning rate of that warm-up (AdamW).

        Returns:
            The recorded pruning event (structures, removed indices, widths before/after).
        """
        if self.pruning_finished:
            raise CompressError("this model is already pruned to its configured sparsity")
        criterion = get_importance(self._config.importance)
        batches = None
        if criterion.needs_calibration and data is None:
            raise CompressError(f"importance={self._config.importance!r} needs calibration data: pass data=, "
                                "or train with PruningAdapterCallback to score on the training batches")
        if data is not None:
            from compress.data import calibration_batches

            batches = calibration_batches(data, batch_size=batch_size, num_batches=num_batches, tokenizer=tokenizer)
        if head_warmup_steps:
            if batches is None:
                raise CompressError("head_warmup_steps needs calibration data: pass data=")
            self._warm_up_head(batches, head_warmup_steps, head_lr)
        units = self._units()
        means = None
        recording = record_input_means(self.model, units) if self._config.compensate_bias and batches else None
        with recording or contextlib.nullcontext() as recorder:
            scores = score_units(self.model, units, criterion, batches if criterion.needs_calibration else None)
            if recorder is not None and not criterion.needs_calibration:
                forward_passes(self.model, batches)  # magnitude/random scores ran no pass: measure the means anyway
        if recorder is not None:
            means = recorder.means()
        return self._prune_event(self._config.ratios, scores, optimizer, final=True, means=means)

    def _warm_up_head(self, batches: list[dict], steps: int, lr: float) -> None:
        # the head is what modules_to_save trains, minus normalisation layers: those sit inside the backbone,
        # and training them here would send gradients through it
        in_norms = {id(p) for m in self.model.modules() if "Norm" in type(m).__name__ for p in m.parameters()}
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        head = [p for n, p in named if self.prefix not in n and id(p) not in in_norms]
        adapters = [p for n, p in named if self.prefix in n or id(p) in in_norms]
        if not head:
            raise CompressError("head_warmup_steps needs a trainable task head: set modules_to_save (task_type="
                                "'SEQ_CLS' adds the classifier automatically)")
        device = head[0].device
        optimizer = torch.optim.AdamW(head, lr=lr)
        was_training = self.model.training
        self.model.eval()
        try:
            for p in adapters:
                p.requires_grad_(False)
            for step in range(steps):
                batch = {k: v.to(device) for k, v in batches[step % len(batches)].items()}
                task_loss(self.model, batch).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        finally:
            for p in adapters:
                p.requires_grad_(True)
            self.model.train(was_training)

    def _prune_event(self, ratios: dict[str, float], scores: dict[str, torch.Tensor],
                     optimizer: torch.optim.Optimizer | None, final: bool,
                     means: dict[str, torch.Tensor] | None = None, step: int | None = None) -> dict:
        config = self._config
        adapter = get_adapter(self.model)
        units = units_for(adapter, ratios)
        removals = plan_removals(adapter, units, scores, ratios, config.mode, round_to=config.round_to,
                                 normalize=config.score_normalization, max_widths=self._width_caps(ratios))
        if means:
            self._compensate(units, removals, means)
        layers = [m for m in self.model.modules() if isinstance(m, PruningAdapterLayer)]
        for layer in layers:
            layer.pruned_params.clear()
        widths_before = adapter.widths()
        apply_removals(self.model, adapter, units, removals)
        self._finish_shapes(self.model, config)
        if optimizer is not None:
            remap_optimizer(optimizer, {k: v for layer in layers for k, v in layer.pruned_params.items()},
                            list(self.model.parameters()))
        for layer in layers:
            layer.pruned_params.clear()
        if next(self.model.parameters()).device.type == "cpu":
            # uneven widths from here on: glibc would hoard blocks of the old shapes (compress._allocator)
            map_large_cpu_allocations()
            release_freed_memory()
        event = {"structures": sorted(ratios), "removed": {k: v for k, v in removals.items() if v},
                 "widths_before": widths_before, "widths_after": get_adapter(self.model).widths(), "final": final}
        if step is not None:  # pruned by the schedule: errors about this event can name its training step
            event["step"] = step
        config.pruning_plan.append(event)
        if final and config.quantize_backbone:
            self.quantize_backbone(config.quantize_backbone)
        logger.info("pruned %s: widths %s", ", ".join(f"{k} {v:.0%}" for k, v in ratios.items()),
                    event["widths_after"])
        return event

    def _width_caps(self, ratios: dict[str, float]) -> dict[str, int] | None:
        """``max_keep`` as per-layer channel caps for one pruning step, against the widths before the first.

        A step that keeps more than ``max_keep`` overall caps each layer at what the step keeps overall, so
        every layer leaves it with the same width and the final cap stays reachable by later steps.
        """
        config = self._config
        if config.max_keep is None:
            return None
        current = get_adapter(self.model).widths()
        original = config.pruning_plan[0]["widths_before"] if config.pruning_plan else current
        caps = {}
        for structure, ratio in ratios.items():
            if structure == "layers":
                continue
            width_key = "kv_heads" if structure == "kv_heads" and "kv_heads" in original else "heads"
            widths = original["ffn"] if structure == "ffn" else original[width_key]
            now = total_width(current, structure)
            kept_overall = (now - math.floor(ratio * now + 0.5)) / total_width(original, structure)
            caps[structure] = width_cap(max(widths), 1.0 - kept_overall, config.max_keep)
        return caps

    def _compensate(self, units: list[Unit], removals: dict[str, list[int]], means: dict[str, torch.Tensor]) -> None:
        """Put the removed channels' mean contribution into the adapters' bias buffers (before removal)."""
        channel_units = [u for u in units if u.structure in ("ffn", "heads")]
        held = [u for u in channel_units if isinstance(output_projection(u), PruningAdapterLayer)]
        unheld = sorted({u.key for u in channel_units if removals.get(u.key)} - {u.key for u in held})
        if unheld:
            logger.warning("compensate_bias: %d pruned blocks have no adapter on their output projection (e.g. %s); "
                           "add it to target_modules to compensate them", len(unheld), unheld[0])
        shifts, no_bias = bias_shifts(held, removals, means)
        if no_bias:
            logger.info("compensate_bias: %d output projections have no bias and stay uncompensated", len(no_bias))
        for unit in held:
            if unit.key in shifts:
                output_projection(unit).add_bias_shift(shifts[unit.key])

    # -- scoring on training batches (driven by PruningAdapterCallback, see schedule.py) -----------------
    def pruning_steps(self) -> list[int]:
        """Training steps (``global_step`` after the optimizer step) at which pruning happens."""
        return self._schedule.steps()

    def start_scoring(self) -> None:
        """Attach gates so the training loss gives importance gradients; no-op once pruning is finished."""
        self._schedule.start()

    def stop_scoring(self, keep_checkpointing: bool = False) -> None:
        """Detach the gates (and stop checkpointing, unless ``keep_checkpointing``: more pruning follows)."""
        self._schedule.stop(keep_checkpointing)

    def scoring_step(self, global_step: int, optimizer: torch.optim.Optimizer | None = None) -> dict | None:
        """Fold this step's gate gradients into the importance estimate; prune if ``global_step`` is due."""
        return self._schedule.step(global_step, optimizer)
