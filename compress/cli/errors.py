"""The command line's two kinds of failure, and how each is reported."""

from __future__ import annotations


class UsageError(Exception):
    """A bad command line or input: reported on one line, exit status 2."""


class RunFailed(Exception):
    """A valid run failed part-way (pruning, saving): reported on one line, exit status 1."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause
