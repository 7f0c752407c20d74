"""The ``compress`` command line: ``main`` parses (:mod:`compress.cli.parser`) and runs one command module
(``prune``, ``info``, ``push``), imported only when it runs.

Everything imported here, the parser included, is standard library only (``import compress`` imports nothing
heavy either), so ``compress --help``, ``--version`` and malformed command lines are answered without importing
torch. ``main(argv)`` returns the exit status: 0 on success, 2 for bad arguments or inputs (one
``compress: error: ...`` line, no traceback), 1 when a valid run fails part-way. ``--debug`` re-raises with the
full traceback instead.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from collections.abc import Iterator

from .errors import RunFailed, UsageError
from .parser import PROG, build_parser

__all__ = ["RunFailed", "UsageError", "build_parser", "error_line", "main", "spell_option"]


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is at emit time (pytest swaps it per test)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@contextlib.contextmanager
def _cli_logging(verbose: bool, debug: bool) -> Iterator[None]:
    """Log the package's messages to stderr for one command; the logger is restored afterwards, so
    calling :func:`main` in-process leaves no trace on logging."""
    log = logging.getLogger("compress")
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def spell_option(option: str) -> str:
    """A library option name as the command line spells it: ``max_keep`` -> ``--max-keep``."""
    return "--" + option.replace("_", "-")


def error_line(exc: BaseException) -> str:
    """``compress: error: <message>`` on one line (newlines folded; library option names spelled as flags)."""
    spelled = getattr(exc, "spelled", None)  # compress.pruning.spec.InvalidOptionError
    message = spelled(spell_option(exc.option)) if callable(spelled) else str(exc)
    return f"{PROG}: error: {' '.join(message.split()) or type(exc).__name__}"


# What a user can cause and fix (CompressError is a ValueError): reported on one line, exit status 2.
_EXPECTED_ERRORS: tuple[type[BaseException], ...] = (UsageError, ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    """Run the ``compress`` command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help / --version
            return exc.code if isinstance(exc.code, int) else 0
        debug = bool(getattr(args, "debug", False))
        if getattr(args, "command_module", None) is None:
            parser.print_help(sys.stderr)
            return 2
        with _cli_logging(bool(getattr(args, "verbose", False)), debug):
            command = importlib.import_module(f"compress.cli.{args.command_module}")
            return int(command.run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except RunFailed as exc:
        if debug:
            raise exc.cause from None
        sys.stderr.write(error_line(exc.cause) + "\n")
        return 1
    except _EXPECTED_ERRORS as exc:
        if debug:
            raise
        sys.stderr.write(error_line(exc) + "\n")
        return 2
