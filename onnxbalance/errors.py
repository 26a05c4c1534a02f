"""The errors a user can cause.

Each is caught once, in the CLI, and becomes one line on stderr and an exit code.

Internal bugs are not dressed up as these: they stay ordinary exceptions.
"""

from __future__ import annotations

import signal


class OnnxBalanceError(Exception):
    """Base of every error the user can fix; ``exit_code`` is what the CLI returns for it."""

    exit_code = 2


class InputError(OnnxBalanceError):
    """The input cannot be read or used: missing, not ONNX, truncated, invalid, bad options."""


class UnsupportedModelError(OnnxBalanceError):
    """The model is valid ONNX but something in it cannot be balanced safely."""


class OutputError(OnnxBalanceError):
    """The output cannot be written where the user asked."""


class SideOutputError(OutputError):
    """OUT was written, but a side output (``--report``, ``--plot``) then could not be.

    Side outputs are checked before any work, so only the disk failing in between gets here; its
    own exit code tells a caller that OUT is in place.
    """

    exit_code = 4


class VerificationError(OnnxBalanceError):
    """The balanced model does not compute the same function as the input."""

    exit_code = 3


class TooFewBalancedError(OnnxBalanceError):
    """A smaller fraction of the units found could be balanced than ``min_balanced`` asks."""

    exit_code = 5


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; raised in the main thread so ``finally`` blocks clean up."""

    last: Interrupted | None = None  # the latest raised: typer may swallow it into exit code 130

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        Interrupted.last = self


def interrupt_behind(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The interrupt ``exc`` is or was raised by, if any: one arriving inside a C extension
    can come back wrapped (an ImportError while numpy or onnxruntime loads)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
