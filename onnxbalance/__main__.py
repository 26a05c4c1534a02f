"""``python -m onnxbalance`` and the ``onnxbalance`` command.

SIGINT and SIGTERM handlers come first, before the imports that take most of a second (numpy,
onnx, typer): an interrupt at any moment of start-up ends with the one line every interrupt
gives, never the interpreter's traceback.
"""

import signal
import sys

from .errors import Interrupted, interrupt_behind

_INTERRUPTED = "onnxbalance: error: interrupted"


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; an interrupt during start-up is one line and 128 + signal."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupted)
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
