"""What registering a method through :mod:`compress.registry` adds to peft's own save and load calls.

peft 0.21.2 gives a tuner or a config no hook around ``PeftModel.save_pretrained``: it writes the model card,
``adapter_model.safetensors`` and ``adapter_config.json`` one after the other into the folder itself, and
calls into the tuner only for the state dict (which does not know the folder). A process killed between the
weights and the config leaves the previous config beside the new weights, and neither adapter loads. Loading
reads ``adapter_config.json`` and picks the config class before any code of a method runs, and a folder without
weights is looked up on the Hub.

So :func:`install` (run by :func:`compress.registry.register_method`, which passes its list of the methods
registered) wraps three methods of ``peft.PeftModel``, through :func:`compress._compat.wrap_peft_model_methods`;
for adapters of other methods each calls peft unchanged:

- ``save_pretrained``: for a registered method, peft writes into a temporary folder beside the destination,
  which then replaces the destination's files in one step (:func:`compress.export.atomic_update`): files already
  there that the save does not write stay, the model card is updated as peft does, the written files get the
  umask's permissions. A save killed at any point leaves the previous adapter as it was.
- ``from_pretrained`` and ``load_adapter``: a local adapter folder is checked first
  (:func:`check_adapter_folder`), so that a damaged or incomplete folder is one :class:`AdapterFolderError`
  naming the file and the fix, raised before peft injects anything into the model.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from collections.abc import Callable, Collection
from pathlib import Path

from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from compress._compat import wrap_peft_model_methods
from compress.errors import CompressError

__all__ = ["AdapterFolderError", "UnknownPeftTypeError", "check_adapter_folder", "install"]

logger = logging.getLogger(__name__)

_SAVE_AGAIN = "save the adapter again with PeftModel.save_pretrained, or copy the whole folder again"


class AdapterFolderError(CompressError):
    """A saved PEFT adapter folder cannot be loaded: a file is missing, damaged or inconsistent."""


class UnknownPeftTypeError(AdapterFolderError, KeyError):
    """``adapter_config.json`` names a ``peft_type`` nobody registered (also a ``KeyError``, which peft raises)."""

    __str__ = BaseException.__str__  # KeyError's would quote the message


#: the names of the methods whose adapters the wrappers handle, as given to :func:`install` (the registry imports
#: this module, not the other way round)
_registered_methods: Callable[[], Collection[str]] = tuple


def _registered(peft_type: object) -> bool:
    return str(peft_type) in _registered_methods()


def check_adapter_folder(path: str | os.PathLike, subfolder: str | None = None,
                         peft_type: str | None = None) -> None:
    """Check a local folder written by ``PeftModel.save_pretrained`` before peft loads it.

    ``adapter_config.json`` must be a JSON object whose ``peft_type`` peft knows (its own methods and those
    registered, e.g. by ``import compress``); for a method registered through :mod:`compress.registry`, the
    weights file must be there and its safetensors header intact. Anything else (a Hub id, a folder without
    ``adapter_config.json``, the weights of peft's own methods) is left to peft.

    Args:
        path: the adapter folder (``model_id`` of ``PeftModel.from_pretrained``).
        subfolder: the adapter's subfolder of ``path``, as peft's ``subfolder`` argument.
        peft_type: the adapter's type when the caller already has its config (its file is then not read).

    Raises:
        AdapterFolderError: naming the file, what is wrong with it and the fix.
    """
    folder = Path(os.fspath(path)).expanduser()
    if subfolder:
        folder = folder / subfolder
    config_file = folder / CONFIG_NAME
    if peft_type is None:
        if not config_file.is_file():  # peft then looks for a Hub repository of that name
            return
        peft_type = _read_peft_type(config_file)
    if not _registered(peft_type):
        return
    weights = folder / SAFETENSORS_WEIGHTS_NAME
    if not weights.is_file():
        if (folder / WEIGHTS_NAME).is_file():  # a pickled adapter: peft loads it
            return
        raise AdapterFolderError(f"{folder} holds no {SAFETENSORS_WEIGHTS_NAME}, so this {peft_type} adapter has no "
                                 f"weights (an interrupted copy?): {_SAVE_AGAIN}")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights, framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as exc:
        raise AdapterFolderError(f"{weights} is truncated or damaged ({exc}): {_SAVE_AGAIN}") from None


def _read_peft_type(config_file: Path) -> str:
    try:
        values = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise AdapterFolderError(f"{config_file} is not valid JSON ({exc}): {_SAVE_AGAIN}") from None
    if not isinstance(values, dict):
        raise AdapterFolderError(f"{config_file} holds a JSON {type(values).__name__}, not an object of config "
                                 f"fields: {_SAVE_AGAIN}")
    if "peft_type" not in values:
        raise AdapterFolderError(f"{config_file} has no peft_type field, so peft cannot tell which method wrote it: "
                                 f"{_SAVE_AGAIN}")
    peft_type = values["peft_type"]
    if not isinstance(peft_type, str) or peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise UnknownPeftTypeError(
            f"{config_file}: peft_type {peft_type!r} is neither a peft method nor one registered by an imported "
            f"package (registered through peft-compress: {', '.join(_registered_methods()) or 'none'}); import the "
            "package that defines the method before loading, or correct the field")
    return peft_type


def _saves_registered(model: PeftModel, selected_adapters: list[str] | None) -> bool:
    configs = model.peft_config
    names = selected_adapters if selected_adapters is not None else list(configs)
    return any(name in configs and _registered(configs[name].peft_type) for name in names)


def _atomic_save(save_pretrained):
    signature = inspect.signature(save_pretrained)

    @functools.wraps(save_pretrained)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        given = bound.arguments
        if not given.get("is_main_process", True) or not _saves_registered(self, given.get("selected_adapters")):
            return save_pretrained(self, *args, **kwargs)
        from compress.export import atomic_update

        with atomic_update(given["save_directory"], carry=("README.md",)) as folder:
            given["save_directory"] = str(folder)
            return save_pretrained(*bound.args, **bound.kwargs)

    return wrapper


def _checked_from_pretrained(from_pretrained):
    signature = inspect.signature(from_pretrained)

    @functools.wraps(from_pretrained)
    def wrapper(cls, *args, **kwargs):
        given = signature.bind(cls, *args, **kwargs).arguments
        config = given.get("config")
        check_adapter_folder(given["model_id"], given.get("kwargs", {}).get("subfolder"),
                             peft_type=getattr(config, "peft_type", None))
        return from_pretrained(cls, *args, **kwargs)

    return wrapper


def _checked_load_adapter(load_adapter):
    signature = inspect.signature(load_adapter)

    @functools.wraps(load_adapter)
    def wrapper(self, *args, **kwargs):
        given = signature.bind(self, *args, **kwargs).arguments
        existing = self.peft_config.get(given["adapter_name"])  # then peft loads only its weights
        check_adapter_folder(given["model_id"], given.get("kwargs", {}).get("subfolder"),
                             peft_type=getattr(existing, "peft_type", None))
        return load_adapter(self, *args, **kwargs)

    return wrapper


def install(registered_methods: Callable[[], Collection[str]]) -> None:
    """Wrap ``PeftModel.save_pretrained``, ``from_pretrained`` and ``load_adapter`` (see the module docstring) for
    the adapters of the methods ``registered_methods()`` names when they run; wrapping again does nothing."""
    global _registered_methods
    _registered_methods = registered_methods
    wrap_peft_model_methods(_atomic_save, _checked_from_pretrained, _checked_load_adapter)
    logger.debug("PeftModel saves registered methods atomically and checks adapter folders before loading")
