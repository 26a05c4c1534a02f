"""``python -m onnxbalance`` and the ``onnxbalance`` command.

SIGINT and SIGTERM handlers come first, before the imports that take most of a second (numpy,
onnx, typer): an interrupt at any moment of start-up ends with the one line every interrupt
gives, never the interpreter's traceback. One that lands inside a callback Python cannot raise
from (the import system's weakref callbacks) is delivered again, not printed and dropped.
"""

from __future__ import annotations

import _thread
import signal
import sys
import threading

from .errors import Interrupted, interrupt_behind

_INTERRUPTED = "onnxbalance: error: interrupted"
_REDELIVERY_SECONDS = 0.01


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def _redeliver_lost_interrupts(unraisable: sys.UnraisableHookArgs) -> None:
    """``sys.unraisablehook``: an interrupt raised while a callback Python cannot raise from ran
    (a weakref callback, such as the import system's, or a ``__del__``) would be printed as
    "Exception ignored" and dropped; instead it is delivered again a moment later, when the
    main thread is back in code that can raise it (again, should it land in another one)."""
    if isinstance(unraisable.exc_value, Interrupted):
        if sys.is_finalizing():  # the run is over: nothing left to interrupt
            return
        signum = unraisable.exc_value.signum
        later = threading.Timer(_REDELIVERY_SECONDS, _thread.interrupt_main, (signum,))
        later.daemon = True
        later.start()
        return
    sys.__unraisablehook__(unraisable)


def handle_interrupts() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread, never lost."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupted)
    sys.unraisablehook = _redeliver_lost_interrupts


def main(argv: list[str] | None = None) -> int:
    """Run the command line; an interrupt during start-up is one line and 128 + signal."""
    handle_interrupts()
    try:
        from .cli import main as run

        return run(argv)
    except BaseException as exc:
        interrupt = interrupt_behind(exc)
        if interrupt is None:
            raise
        print(_INTERRUPTED, file=sys.stderr)
        return 128 + getattr(interrupt, "signum", signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
