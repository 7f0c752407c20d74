"""Ladder Side-Tuning tuner: builds the side network beside the frozen backbone and runs it from forward hooks."""

from __future__ import annotations

import inspect
import logging
from functools import partial

import torch
from torch import nn
from transformers.utils import ModelOutput

from compress.errors import CompressError
from compress.export import TAG, method_tag
from compress.pruning.arch import arch_spec, spec_class
from compress.tuner import CompressTuner

from .cache import side_cache, with_side
from .checks import check_saved_side, check_side_family, refuse_low_cpu_mem_usage, refuse_meta_weights
from .config import LadderSideConfig
from .layer import LadderSide, LadderSideLayer
from .side import (
    backbone_stacks,
    build_pruned_side,
    build_random_side,
    side_config_dict,
    side_from_config,
    side_layer_indices,
    side_widths,
)

logger = logging.getLogger(__name__)

#: keyword arguments of the backbone's base model (or stack) that the side network receives unchanged
_SHARED_INPUTS = ("attention_mask", "token_type_ids", "position_ids", "use_cache", "encoder_attention_mask")
#: where an encoder's outputs carry the side encoder's last state (``generate()`` passes them back, expanded
#: for beam search like every tensor in them)
SIDE_STATE = "ladder_side_state"


class LadderSideModel(CompressTuner):
    """Creates a Ladder Side-Tuning model from a pretrained transformers model.

    The backbone stays as loaded and frozen, and runs without gradients. Forward hooks collect its embedding
    output and the outputs of the blocks in ``side_layers``; when its base model (``model.bert``, ``model.model``;
    for T5 each of its stacks) returns, the side network (:class:`~compress.plugins.ladder_side.layer.LadderSide`,
    in the tuner layer ``lst_side``) runs on them. The side decoder's up-projected last state replaces the base
    model's ``last_hidden_state`` (and BERT's ``pooler_output``), so the task model's own head and loss run
    unchanged; a T5 side encoder's state goes to the side decoder (and into the encoder outputs, for
    ``generate()``). With ``use_cache`` the returned cache also holds the side network's keys and values
    (:mod:`~compress.plugins.ladder_side.cache`), and ``generate()`` passes it back.

    Saving writes the side network, ladders, gates, up-projection and ``modules_to_save``; the side network's
    config goes into ``LadderSideConfig.side_config`` so that ``PeftModel.from_pretrained`` rebuilds its shapes.
    There is nothing to merge: ``merge_and_unload()`` raises.

    Example::

        >>> import compress
        >>> from peft import get_peft_model
        >>> config = compress.LadderSideConfig(task_type="SEQ_CLS", r=8)
        >>> model = get_peft_model(base_model, config)
        >>> model.base_model.init_side(data=calibration_dataset, tokenizer=tokenizer)  # fisher initialisation
    """

    prefix: str = "lst_"
    tuner_layer_cls = LadderSideLayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None):
        self.__dict__["_hook_handles"] = []
        self.__dict__["_states"] = None  # backbone states of the running forward
        self.__dict__["_grad_mode"] = None
        self.__dict__["_side_memory"] = None  # the side encoder's last state (encoder-decoder models)
        self.__dict__["_unscored"] = False  # pruned by magnitude while the config asks for a data-driven importance
        refuse_low_cpu_mem_usage(low_cpu_mem_usage, "Ladder Side-Tuning's side network")
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    @property
    def active_config(self) -> LadderSideConfig:
        return self.peft_config[self.active_adapters[0]]

    # -- injection -----------------------------------------------------------------------------------------
    def _check_new_adapter_config(self, config: LadderSideConfig) -> None:
        if len(self.peft_config) > 1:
            raise CompressError("Ladder Side-Tuning holds one side network per model; wrap a fresh base model for "
                                "another adapter")

    def _pre_injection_hook(self, model: nn.Module, config: LadderSideConfig, adapter_name: str) -> None:
        refuse_meta_weights(model)
        side_layer_indices(model, config)
        if config.side_config is None:  # a saved side network's r is checked against its weights on loading
            side_widths(arch_spec(model), config.r)
        self._check_task(model, config)
        if config.side_config is not None:  # a saved adapter: first whether it is of this backbone's family at all
            check_side_family(model, config.side_config)
        self._resolve_pooling(model, config)
        self._check_gradient_path(model)
        if hasattr(model, "add_model_tags"):
            model.add_model_tags([TAG, method_tag(config.peft_type)])

    @staticmethod
    def _check_task(model: nn.Module, config: LadderSideConfig) -> None:
        name = type(model).__name__.removeprefix("Compressed")
        wanted = {"SEQ_CLS": "ForSequenceClassification", "CAUSAL_LM": "ForCausalLM",
                  "TOKEN_CLS": "ForTokenClassification",
                  "SEQ_2_SEQ_LM": "ForConditionalGeneration"}.get(str(config.task_type))
        if wanted is not None and not name.endswith(wanted):
            raise CompressError(f"task_type={config.task_type} needs a *{wanted} model, got {type(model).__name__}; "
                                f"load the backbone with the matching Auto class or change task_type")

    @staticmethod
    def _resolve_pooling(model: nn.Module, config: LadderSideConfig) -> None:
        """``pooling``: ``segments`` by default where it applies (a sequence classifier on an encoder, whose head
        reads the first token), ``model`` elsewhere; ``segments`` asked for elsewhere is refused."""
        applies = str(config.task_type) == "SEQ_CLS" and arch_spec(model).family == "bert"
        if config.pooling is None:
            config.pooling = "segments" if applies and not config.add_backbone_output else "model"
        elif config.pooling == "segments" and not applies:
            raise CompressError(f"pooling='segments' feeds the classifier of an encoder (task_type=SEQ_CLS on "
                                f"BERT/RoBERTa), not task_type={config.task_type} on {type(model).__name__}: leave "
                                "pooling unset (or 'model') here")
        elif config.pooling == "segments" and config.add_backbone_output:
            raise CompressError("add_backbone_output=True corrects the backbone's own output, which the classifier "
                                "reads through the task model's pooling; pooling='segments' bypasses it: use "
                                "pooling='model' with add_backbone_output (or leave pooling unset)")

    @staticmethod
    def _check_gradient_path(model: nn.Module) -> None:
        """The modules between the side network's output and the loss (BERT's pooler, the LM head) must pass
        gradients back to it; torch's dynamic int8 layers do not."""
        base = model.base_model
        after_side = [getattr(base, "pooler", None), model.get_output_embeddings()]
        for module in (m for m in after_side if m is not None):
            if any(isinstance(sub, torch.ao.nn.quantized.dynamic.Linear) for sub in module.modules()):
                raise CompressError(f"{type(module).__name__} sits between the side network and the loss but is a "
                                    "torch dynamic int8 layer, which passes no gradient back; quantise only the "
                                    "backbone's stacks (e.g. quantize_dynamic(model.bert.encoder, ...)) or use "
                                    "bitsandbytes with llm_int8_skip_modules")

    def _create_and_replace(self, *args, **kwargs) -> None:
        raise CompressError("internal: Ladder Side-Tuning replaces no module")  # pragma: no cover

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        network = self._build(model, config)  # first: a refused side network leaves the model unwrapped
        super().inject_adapter(model, adapter_name, *args, **kwargs)  # modules_to_save; freezes the backbone
        self.lst_side = LadderSideLayer()
        self.lst_side.update_layer(adapter_name, network, trainable=not config.inference_mode)
        self._attach_hooks()

    def _build(self, model: nn.Module, config: LadderSideConfig, data=None, tokenizer=None,
               **calibration) -> LadderSide:
        width = arch_spec(model).hidden_site().width
        kept = None
        if config.side_config is not None:
            check_side_family(model, config.side_config)
            try:
                side = side_from_config(config.side_config)  # loading: the weights come from the checkpoint
            except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:  # an edited side_config
                raise CompressError(f"adapter_config.json: side_config does not build a side network "
                                    f"({type(exc).__name__}: {exc}): put back the side_config the adapter was saved "
                                    "with") from None
        else:
            built = (build_pruned_side(model, config, data, tokenizer, **calibration) if config.side_init == "pruned"
                     else build_random_side(model, config))
            side, kept = built.model, built.kept_hidden
            # warned at the first training step if init_side(data) has not scored it by then
            self.__dict__["_unscored"] = config.side_init == "pruned" and built.importance != config.importance
            config.side_config = side_config_dict(side)
        device = next(p for p in model.parameters()).device
        network = LadderSide(side, width, config.gate_temperature, config.gate_init, kept,
                             zero_up=config.add_backbone_output,
                             segment_pooling=config.pooling == "segments").to(device)
        expected = len(side_layer_indices(model, config))
        if network.num_blocks != expected and config.side_layers is None:
            raise CompressError(f"this Ladder Side-Tuning adapter's side network has {network.num_blocks} blocks, one "
                                f"per block of the backbone it was built for, but {type(model).__name__} has "
                                f"{expected} blocks: load it onto the backbone it was trained with")
        if network.num_blocks != expected:
            raise CompressError(f"adapter_config.json: side_layers={config.side_layers} names {expected} "
                                f"block{'s' if expected != 1 else ''} but "
                                f"side_config describes {network.num_blocks} side blocks: put back the values the "
                                "adapter was saved with")
        return network

    def init_side(self, data=None, tokenizer=None, num_batches: int = 8, batch_size: int = 16) -> None:
        """Rebuild the side network from the backbone pruned by ``importance`` on calibration ``data`` (a tokenized
        dataset or batches; ``fisher`` needs ``labels`` unless the model is a causal LM). Widths may differ per
        layer where importance decides them (BERT/RoBERTa), so call it before the optimizer is created (before
        ``Trainer.train``)."""
        adapter_name = self.active_adapters[0]
        config = self.peft_config[adapter_name]
        if config.side_init != "pruned":
            raise CompressError("init_side rebuilds the pruned initialisation; this adapter has side_init='random'")
        recorded, config.side_config = config.side_config, None
        self._detach_hooks()
        try:
            network = self._build(self.model, config, data, tokenizer, num_batches=num_batches,
                                  batch_size=batch_size)
        except BaseException:
            config.side_config = recorded  # a failed re-initialisation leaves the adapter as it was
            raise
        finally:
            self._attach_hooks()
        self.lst_side.update_layer(adapter_name, network, trainable=not config.inference_mode)

    # -- the forward ----------------------------------------------------------------------------------------
    def _stack_owners(self) -> list[nn.Module]:
        """Per backbone stack, the module whose output the side network's replaces: the base model of an
        encoder-only or decoder-only model (so that BERT's pooler and Llama's final norm see it), each stack
        module of an encoder-decoder."""
        stacks = backbone_stacks(self.model)
        if len(stacks) == 1:
            return [self.model.base_model]
        return [self.model.get_submodule(stack.name) for stack in stacks]

    def _attach_hooks(self) -> None:
        if self._hook_handles:
            return
        layers = side_layer_indices(self.model, self.active_config)
        handles = []
        if len(backbone_stacks(self.model)) > 1:
            handles.append(self.model.register_forward_pre_hook(self._before_model, with_kwargs=True))
        for s, (stack, owner) in enumerate(zip(backbone_stacks(self.model), self._stack_owners())):
            handles += [owner.register_forward_pre_hook(self._before_stack, with_kwargs=True),
                        owner.register_forward_hook(partial(self._after_stack, s), with_kwargs=True),
                        stack.blocks[0].register_forward_pre_hook(self._capture_input, with_kwargs=True)]
            handles += [stack.blocks[i].register_forward_hook(self._capture_output) for i in layers]
        self._hook_handles.extend(handles)

    def _detach_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()

    def _network(self) -> LadderSide | None:
        # a child module looked up directly: peft's tuners forward unknown attributes to the wrapped model
        layer = dict(self.named_children()).get("lst_side")
        return layer.active_network() if layer is not None else None

    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Encoder-decoder: encoder outputs computed earlier (``generate()``) carry the side encoder's state."""
        encoder_outputs = kwargs.get("encoder_outputs")
        memory = encoder_outputs.get(SIDE_STATE) if isinstance(encoder_outputs, dict) else None
        if encoder_outputs is not None:
            self.__dict__["_side_memory"] = memory

    def _before_stack(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._network() is None:
            return
        if self._unscored and module.training and torch.is_grad_enabled():
            self.__dict__["_unscored"] = False
            logger.warning("training a side network initialised by magnitude: importance=%r needs calibration "
                           "data; call model.base_model.init_side(data) (or compress.apply_ladder_side) before "
                           "training", self.active_config.importance)
        self.__dict__["_states"] = []
        self.__dict__["_grad_mode"] = torch.is_grad_enabled()
        torch.set_grad_enabled(False)  # the backbone is frozen: keep none of its activations

    def _capture_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._states is not None:
            self._states.append((args[0] if args else kwargs["hidden_states"]).detach())

    def _capture_output(self, module: nn.Module, args: tuple, output) -> None:
        if self._states is not None:
            self._states.append((output[0] if isinstance(output, tuple) else output).detach())

    def _after_stack(self, stack: int, module: nn.Module, args: tuple, kwargs: dict, outputs):
        # a partial of a bound method, not a closure: copy.deepcopy rebinds it to the copied tuner
        states, self.__dict__["_states"] = self._states, None
        if states is None:
            return None
        torch.set_grad_enabled(self._grad_mode)
        return self._run_side(stack, module, args, kwargs, outputs, states)

    def _run_side(self, stack: int, module: nn.Module, args: tuple, kwargs: dict, outputs, states):
        if not isinstance(outputs, ModelOutput):
            raise CompressError(f"{type(module).__name__} returned {type(outputs).__name__}; Ladder Side-Tuning "
                                "needs the base model's ModelOutput (do not set return_dict=False)")
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        bound = {**bound.pop("kwargs", {}), **bound}
        network = self._network()
        accepted = inspect.signature(network.stack_module(stack).forward).parameters
        inputs = {k: bound[k] for k in _SHARED_INPUTS if bound.get(k) is not None and k in accepted}
        if bound.get("encoder_hidden_states") is not None:  # an encoder-decoder's decoder
            if self._side_memory is None:
                raise CompressError("the decoder runs on encoder outputs without the side encoder's state; pass "
                                    "encoder_outputs computed by this PEFT model (or let it run the encoder)")
            inputs["encoder_hidden_states"] = self._side_memory
        cache = outputs.get("cache")
        if cache is not None:
            inputs["cache"] = side_cache(cache)
            inputs["use_cache"] = True
        side_outputs = network.run(stack, states, **inputs)
        if stack < len(network.stack_names) - 1:  # the encoder: its state feeds the side decoder
            self.__dict__["_side_memory"] = side_outputs.last_hidden_state
            outputs[SIDE_STATE] = side_outputs.last_hidden_state  # generate() hands it back with encoder_outputs
            return outputs
        final = network.up(side_outputs.last_hidden_state)
        if self.active_config.add_backbone_output:
            final = final + outputs["last_hidden_state"]
        pooled = None
        if network.pool is not None:
            segments = bound.get("token_type_ids")
            if segments is None and bound.get("input_ids") is not None:
                segments = spec_class(str(module.config.model_type)).segment_ids(module.config, bound["input_ids"])
            pooled = network.pool_segments(side_outputs.last_hidden_state, bound.get("attention_mask"), segments)
            if getattr(module, "pooler", None) is None:  # RoBERTa's head reads the first token itself
                final = torch.cat([pooled.unsqueeze(1), final[:, 1:]], dim=1)
        outputs["last_hidden_state"] = final
        if outputs.get("pooler_output") is not None and getattr(module, "pooler", None) is not None:
            outputs["pooler_output"] = module.pooler(final) if pooled is None else pooled
        if cache is not None:
            outputs["cache"] = with_side(cache, side_outputs.cache)
        return outputs

    def forward(self, *args, **kwargs):
        grad_mode = torch.is_grad_enabled()
        try:
            return self.model(*args, **kwargs)
        finally:
            torch.set_grad_enabled(grad_mode)  # also when the backbone raised between its two hooks

    # -- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: LadderSideConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft's key mapping, then a check that the saved tensors fit the backbone and the config (before peft's
        ``load_state_dict``, whose errors name neither the config field nor the cause)."""
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_saved_side(model, config, adapter_name, state_dict)
        return state_dict

    # -- adapters on and off, unloading -------------------------------------------------------------------
    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self.lst_side.enable_adapters(enabled)

    def _check_merge_allowed(self) -> None:
        raise CompressError("Ladder Side-Tuning has nothing to merge: the side network is a separate model that "
                            "reads the backbone. Save the adapter (save_pretrained) and load it onto the backbone "
                            "with PeftModel.from_pretrained; unload() returns the plain backbone")

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs):
        if merge:
            self._check_merge_allowed()
        self._detach_hooks()
        if hasattr(self, "lst_side"):
            del self.lst_side
        return super()._unload_and_optionally_merge(merge=False, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        del self.peft_config[adapter_name]
        self._detach_hooks()
        self.lst_side.lst_network.pop(adapter_name, None)
        self.active_adapter = list(self.peft_config)[:1]
