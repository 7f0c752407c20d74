"""Registering a peft-compress method with peft: what ``peft.register_peft_method`` lacks.

peft 0.21's ``register_peft_method`` accepts only names that are members of its ``PeftType`` enum, so a
third-party method cannot use it. :func:`register_method` writes the same entries into peft's mapping dicts
(``peft.mapping``), with the same checks, for a name of its own; ``get_peft_model``, ``PeftModel.save_pretrained``,
``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` then work for a config whose ``peft_type`` is that
name. Registering also makes ``PeftModel.save_pretrained`` write the method's adapters atomically and
``PeftModel.from_pretrained``/``load_adapter`` check a local adapter folder first (:mod:`compress.adapter_io`).

Usage, in the module that defines a method::

    from compress.registry import PeftMethodType, register_method

    PRUNING_ADAPTER = PeftMethodType("PRUNING_ADAPTER")

    @dataclass
    class PruningAdapterConfig(LoraConfig):
        ...
        def __post_init__(self):
            super().__post_init__()
            self.peft_type = PRUNING_ADAPTER

    register_method(PRUNING_ADAPTER, PruningAdapterConfig, PruningAdapterModel)

That module must be imported before a checkpoint of the method is loaded. If it is not, peft raises
``KeyError: 'PRUNING_ADAPTER'``.

A method's prefix need not be unique: peft 0.21 finds a method's tensors through its tuner layers, not by
prefix, and a method built on LoRA keeps LoRA's ``lora_`` (as peft's AdaLoRA does).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
import threading
from typing import Any

from peft import mapping as _peft_mapping
from peft.config import PeftConfig, PromptLearningConfig
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.peft_types import PeftType

from compress import adapter_io
from compress.errors import CompressError

__all__ = [
    "MethodRegistrationError",
    "PeftMethodType",
    "RegisteredMethod",
    "register_method",
    "registered_methods",
    "unregister_method",
]

logger = logging.getLogger(__name__)

# peft's dispatch on peft_type is a dict lookup (PeftType is a str enum), and its comparisons with PeftType members
# are str comparisons, False for our names: our methods take the generic BaseTuner paths. What a plain str lacks is
# `.value`, which transformers' PreTrainedModel.load_adapter reads: hence PeftMethodType. PeftMixedModel accepts
# only its built-in types, and PeftModel builds prompt encoders only for its built-in prompt-learning types, so
# both are refused here. peft's dicts are mutated in place, never rebound: peft modules hold references to them.

# Upper-case ASCII identifier that neither starts nor ends with "_" (peft rejects a trailing "_" as well).
_NAME_RE = re.compile(r"[A-Z](?:[A-Z0-9_]*[A-Z0-9])?")


class MethodRegistrationError(CompressError):
    """Raised when a PEFT method cannot be registered: a bad argument, or a name in use.

    A ``ValueError``, through :class:`compress.errors.CompressError`.
    """


class PeftMethodType(str):
    """The ``peft_type`` of a registered method: a ``str`` that also has ``.value``, like ``peft.PeftType``.

    Set ``self.peft_type = PeftMethodType(NAME)`` in the config's ``__post_init__``. It compares, hashes and
    serializes to JSON as the plain string; ``.value`` is what transformers' ``PreTrainedModel.load_adapter``
    and some of peft's error messages read.
    """

    __slots__ = ()

    @property
    def value(self) -> str:
        """The name as a plain ``str``."""
        return str.__str__(self)


@dataclasses.dataclass(frozen=True)
class RegisteredMethod:
    """A PEFT method registered through :func:`register_method`."""

    name: str
    config_cls: type[PeftConfig]
    model_cls: type[BaseTuner]
    prefix: str
    is_mixed_compatible: bool = False


# Methods registered through this module, by name. importlib.reload of this module keeps its globals, so the
# records survive that. A record lost any other way comes back when its method is registered again, because
# register_method decides what is a clash from peft's dicts, not from these records.
_REGISTRY: dict[str, RegisteredMethod] = globals().get("_REGISTRY", {})
_LOCK = globals().get("_LOCK") or threading.RLock()


def register_method(
    name: str,
    config_cls: type[PeftConfig],
    model_cls: type[BaseTuner],
    prefix: str | None = None,
    is_mixed_compatible: bool = False,
) -> None:
    """Register a PEFT method with peft, so that peft's standard entry points work with it.

    After registration, ``get_peft_model``, ``PeftModel.save_pretrained``, ``PeftModel.from_pretrained`` and
    ``PeftConfig.from_pretrained`` handle configs whose ``peft_type`` is ``name``.

    Registering the same method again is a no-op. It is the same method if the name, the prefix and both
    classes match. Classes match if they are the same object or have the same module and qualified name, as
    after ``importlib.reload`` of the module that defines them; peft is then pointed at the reloaded classes.

    Args:
        name: The ``peft_type``: an upper-case identifier such as ``"PRUNING_ADAPTER"``, as a ``str`` or a
            :class:`PeftMethodType`. It must not be a member of ``peft.PeftType`` or the name of another
            registered method.
        config_cls: The method's config: a ``@dataclass`` subclass of ``peft.PeftConfig``, not of
            ``PromptLearningConfig``. Its ``__post_init__`` must set ``self.peft_type`` to
            ``PeftMethodType(name)`` (a plain ``str`` works with peft's entry points but not with
            transformers' ``PreTrainedModel.load_adapter``; registering such a config logs a warning).
        model_cls: The method's tuner: a subclass of ``peft.tuners.tuners_utils.BaseTuner`` with a ``prefix``
            class attribute.
        prefix: The prefix of the adapter's parameter names, such as ``"lora_"``. Defaults to
            ``model_cls.prefix``; if given, it must equal it.
        is_mixed_compatible: Must be False: peft 0.21's ``PeftMixedModel`` mixes only its built-in adapter
            types. The parameter keeps the signature of ``peft.register_peft_method``.

    Raises:
        MethodRegistrationError: if an argument is invalid, or ``name`` is already used by a different method.
            peft's dicts are left unchanged.
    """
    _check_classes(config_cls, model_cls)
    _check_name(name)
    name = str.__str__(name)  # a plain str key, also when given a PeftMethodType
    prefix = _resolve_prefix(prefix, model_cls)
    if is_mixed_compatible:
        raise MethodRegistrationError(
            f"Cannot register {name!r} with is_mixed_compatible=True: peft 0.21's PeftMixedModel mixes only "
            f"its built-in adapter types (LoRA, LoHa, LoKr, AdaLoRA, OFT, SHiRA) and rejects any other "
            f"peft_type. Register it with is_mixed_compatible=False."
        )

    record = RegisteredMethod(name, config_cls, model_cls, prefix, is_mixed_compatible)
    adapter_io.install(registered_methods)
    with _LOCK:
        configs = _peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING
        tuners = _peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING
        prefixes = _peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING
        mixed = _peft_mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING

        if name in configs or name in tuners or name in prefixes or name in mixed:
            if (
                _same_class(configs.get(name), config_cls)
                and _same_class(tuners.get(name), model_cls)
                and prefixes.get(name) == prefix
                and name not in mixed
            ):
                # Registered again, e.g. by a re-import or importlib.reload: point peft at the newest classes.
                configs[name] = config_cls
                tuners[name] = model_cls
                _REGISTRY[name] = record
                logger.debug("PEFT method %r is already registered; nothing to do.", name)
                return
            raise MethodRegistrationError(_name_clash_message(name, config_cls, model_cls, prefix))

        _check_config_defaults(name, config_cls)

        prefixes[name] = prefix
        configs[name] = config_cls
        tuners[name] = model_cls
        _REGISTRY[name] = record
    logger.info(
        "Registered PEFT method %r (config %s, tuner %s, prefix %r).",
        name,
        _qualname(config_cls),
        _qualname(model_cls),
        prefix,
    )


def registered_methods() -> dict[str, RegisteredMethod]:
    """Return the methods registered through this module, by name, in registration order.

    peft's built-in methods, and anything written into peft's dicts another way, are not listed. The returned
    dict is a copy.
    """
    with _LOCK:
        return dict(_REGISTRY)


def unregister_method(name: str, *, missing_ok: bool = False) -> None:
    """Remove a method registered through :func:`register_method`, here and from peft's mapping dicts.

    Meant for tests. peft's built-in methods cannot be removed.

    Args:
        name: The name the method was registered under.
        missing_ok: If True, do nothing when ``name`` was not registered through this module.

    Raises:
        KeyError: if ``name`` was not registered through this module and ``missing_ok`` is False.
    """
    with _LOCK:
        record = _REGISTRY.pop(name, None)
        if record is None:
            if missing_ok:
                return
            known = ", ".join(sorted(_REGISTRY)) or "none"
            raise KeyError(
                f"PEFT method {name!r} was not registered through compress.registry (registered: {known}); "
                f"peft's built-in methods cannot be unregistered."
            )
        # Remove only entries that are still ours; leave alone whatever someone else wrote over them.
        for mapping, ours in (
            (_peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING, record.config_cls),
            (_peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING, record.model_cls),
            (_peft_mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING, record.model_cls),
        ):
            if mapping.get(name) is ours:
                del mapping[name]
        if _peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING.get(name) == record.prefix:
            del _peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[name]
    logger.info("Unregistered PEFT method %r.", name)


# --- checks -------------------------------------------------------------------------------------------------


def _check_classes(config_cls: Any, model_cls: Any) -> None:
    if not (isinstance(config_cls, type) and issubclass(config_cls, PeftConfig)):
        raise MethodRegistrationError(
            f"config_cls must be a subclass of peft.PeftConfig, got {_describe(config_cls)}. Derive the "
            f"method's config from peft.PeftConfig and decorate it with @dataclass."
        )
    if issubclass(config_cls, PromptLearningConfig):
        raise MethodRegistrationError(
            f"config_cls {_qualname(config_cls)} is a prompt-learning config. peft 0.21's PeftModel "
            f"builds prompt encoders only for its built-in prompt-learning types, so it cannot be "
            f"registered. Derive it from peft.PeftConfig and implement the method as a BaseTuner."
        )
    if not (isinstance(model_cls, type) and issubclass(model_cls, BaseTuner)):
        raise MethodRegistrationError(
            f"model_cls must be a subclass of peft.tuners.tuners_utils.BaseTuner, got {_describe(model_cls)}."
        )


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise MethodRegistrationError(
            f"A PEFT method name must be a non-empty upper-case ASCII identifier that neither starts nor "
            f"ends with '_', such as 'PRUNING_ADAPTER'; got {name!r}."
        )
    if name in {member.value for member in PeftType}:
        raise MethodRegistrationError(
            f"PEFT method name {name!r} is reserved by peft's built-in PeftType.{name}. Choose a different "
            f"name, e.g. 'COMPRESS_{name}'."
        )


def _resolve_prefix(prefix: str | None, model_cls: type[BaseTuner]) -> str:
    model_prefix = getattr(model_cls, "prefix", None)
    if not isinstance(model_prefix, str) or not model_prefix:
        raise MethodRegistrationError(
            f"{_qualname(model_cls)} has no `prefix` class attribute (got {model_prefix!r}). Set it to the "
            f"prefix of the adapter's parameter names, e.g. `prefix = 'prune_'`."
        )
    if prefix is None:
        prefix = model_prefix
    elif prefix != model_prefix:
        raise MethodRegistrationError(
            f"Inconsistent prefixes: prefix={prefix!r} was passed but {_qualname(model_cls)}.prefix is "
            f"{model_prefix!r}. They must be the same: pass prefix={model_prefix!r}, or leave it out."
        )
    if not prefix.isidentifier():
        raise MethodRegistrationError(
            f"Prefix {prefix!r} must be a valid Python identifier, since it begins the attribute names of "
            f"the adapter's layers, e.g. 'prune_'."
        )
    return prefix


def _check_config_defaults(name: str, config_cls: type[PeftConfig]) -> None:
    # Fields annotated on a subclass that is not itself a @dataclass are not dataclass fields, so they would
    # be silently left out of adapter_config.json.
    own_annotations = inspect.get_annotations(config_cls)
    if own_annotations and "__dataclass_fields__" not in vars(config_cls):
        raise MethodRegistrationError(
            f"config_cls {_qualname(config_cls)} declares {sorted(own_annotations)} but is not decorated "
            f"with @dataclass, so they would not be saved in adapter_config.json. Decorate it with "
            f"@dataclass."
        )
    # A config built with its defaults must carry our peft_type, or get_peft_model dispatches to another
    # tuner. A config that needs arguments cannot be checked here.
    try:
        default = config_cls()
    except Exception as exc:  # any failure only means that the defaults cannot be checked
        logger.debug(
            "Not checking the peft_type of %s: it cannot be built without arguments (%s).",
            _qualname(config_cls),
            exc,
        )
        return
    if default.peft_type != name:
        raise MethodRegistrationError(
            f"{_qualname(config_cls)}().peft_type is {default.peft_type!r}, but the method is registered as "
            f"{name!r}. Set `self.peft_type = PeftMethodType({name!r})` in "
            f"{config_cls.__name__}.__post_init__."
        )
    if not isinstance(getattr(default.peft_type, "value", None), str):
        logger.warning(
            "%s sets peft_type to a plain str. peft works with that, but transformers' "
            "PreTrainedModel.load_adapter reads peft_type.value and fails. Set "
            "`self.peft_type = compress.registry.PeftMethodType(%r)` in %s.__post_init__.",
            _qualname(config_cls),
            name,
            config_cls.__name__,
        )


def _name_clash_message(name: str, config_cls: type, model_cls: type, prefix: str) -> str:
    configs = _peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    tuners = _peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING
    prefixes = _peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING
    existing = (
        f"config {_qualname(configs.get(name))}, tuner {_qualname(tuners.get(name))}, prefix {prefixes.get(name)!r}"
    )
    requested = f"config {_qualname(config_cls)}, tuner {_qualname(model_cls)}, prefix {prefix!r}"
    if name in _REGISTRY:
        fix = (
            f"Choose a different name, or call compress.registry.unregister_method({name!r}) first if you "
            f"mean to replace it."
        )
    else:
        fix = "It was registered outside compress.registry; choose a different name."
    return (
        f"Cannot register PEFT method {name!r}: the name is already registered for a different method "
        f"({existing}); requested: {requested}. {fix}"
    )


# --- helpers ------------------------------------------------------------------------------------------------


def _same_class(a: type | None, b: type) -> bool:
    if a is None:
        return False
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _qualname(obj: Any) -> str:
    if obj is None:
        return "None"
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _describe(obj: Any) -> str:
    return _qualname(obj) if isinstance(obj, type) else f"{obj!r} (not a class)"
