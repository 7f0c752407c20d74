"""When ``import compress`` registers the PEFT methods and model classes with peft and transformers.

Registering imports torch, transformers, peft and every plugin (seconds), which ``compress --help`` must not pay;
yet ``import compress`` followed by ``PeftModel.from_pretrained`` (or ``AutoModel*.from_pretrained`` of a compact
or multi-exit folder) must find our classes. So ``import compress`` itself imports only the standard library,
and the registration runs at the first of:

- the end of ``import compress``, when peft or transformers is already imported;
- the end of an import of peft or transformers that comes later: a finder on ``sys.meta_path`` watches the
  imports of ``peft``, ``transformers`` and of ``compress``'s own modules, and registers as soon as peft or
  transformers is loaded and none of those imports is still running in the thread (the registering code
  imports all of them, so each must be complete);
- the first use of a public name of ``compress`` (``compress.PruningAdapterConfig``, ...).

The finder leaves ``sys.meta_path`` once registration succeeded. It only wraps the loader of the modules it
watches, to learn when their code has run; the module is found and executed by the finder that would have
found it anyway.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import warnings
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

logger = logging.getLogger("compress")

#: the libraries whose import means that user code is about to use peft or transformers' Auto classes
WATCHED = ("peft", "transformers")

_lock = threading.RLock()
_thread = threading.local()  # .imports: watched imports running in this thread; .finding: inside find_spec
_registered = False
_registering = False


def is_registered() -> bool:
    return _registered


def ensure_registered() -> None:
    """Register the compact (per-layer width) model classes with transformers' Auto classes and every PEFT method
    of :mod:`compress.plugins` with peft (each plugin registers itself when imported). Runs once; a registration
    that failed part-way runs again at the next call."""
    global _registered, _registering
    with _lock:
        if _registered or _registering:
            return
        _registering = True
        try:
            from compress.pruning.compact import register_compact_models

            register_compact_models()
            importlib.import_module("compress.plugins")
            _registered = True
            _uninstall()
        finally:
            _registering = False


def register_now_or_on_import() -> None:
    """Called at the end of ``import compress``: register at once if peft or transformers is loaded, else
    watch for their import."""
    if any(name in sys.modules for name in WATCHED):
        ensure_registered()
    else:
        _install()


def _register_after_import() -> None:
    if _registered or _registering or not any(name in sys.modules for name in WATCHED):
        return
    try:
        ensure_registered()
    except Exception as exc:  # noqa: BLE001 - an exception here would undo the user's own import of peft/transformers
        warnings.warn(f"peft-compress could not register its PEFT methods and model classes after peft/transformers "
                      f"were imported ({type(exc).__name__}: {exc}); using a name of compress (e.g. "
                      "compress.PruningAdapterConfig) retries and shows the full error", RuntimeWarning, stacklevel=2)


class _NotifyingLoader:
    """The loader that found a watched module, plus a registration check once the module's code has run."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        running = getattr(_thread, "imports", 0)
        _thread.imports = running + 1
        try:
            self._loader.exec_module(module)
        finally:
            _thread.imports = running
        if running == 0:  # the outermost watched import of this thread is complete
            _register_after_import()

    def __getattr__(self, name: str) -> Any:  # get_code, get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _RegisterOnImport:
    """A ``sys.meta_path`` finder that finds nothing itself: it asks the other finders and wraps the loader of
    ``peft``, ``transformers`` and ``compress.*`` modules in a :class:`_NotifyingLoader`."""

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None) -> ModuleSpec | None:
        if _registered or _registering or getattr(_thread, "finding", False):
            return None
        if fullname not in WATCHED and not fullname.startswith("compress."):
            return None
        _thread.finding = True
        try:
            spec = next((found for finder in list(sys.meta_path) if finder is not self
                         and (found := _find(finder, fullname, path, target)) is not None), None)
        finally:
            _thread.finding = False
        if spec is None or spec.origin is None or not hasattr(spec.loader, "exec_module"):
            return spec  # not found, or a namespace package (no code to run)
        spec.loader = _NotifyingLoader(spec.loader)
        return spec


def _find(finder: Any, fullname: str, path: Any, target: ModuleType | None) -> ModuleSpec | None:
    find_spec = getattr(finder, "find_spec", None)
    return find_spec(fullname, path, target) if find_spec is not None else None


_FINDER = _RegisterOnImport()


def _install() -> None:
    with _lock:
        if not _registered and _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)


def _uninstall() -> None:
    with _lock:
        while _FINDER in sys.meta_path:
            sys.meta_path.remove(_FINDER)
