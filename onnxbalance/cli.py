"""The ``onnxbalance`` command: parse, call the api, print, map errors to exit codes.

Exit codes: 0 done (also when there is nothing to balance), 1 ``--check`` found the model not
balanced, 2 bad usage or an unreadable/invalid/unsupported input or unwritable output,
3 verification failed, 4 OUT was written but a side output (report, plot) then could not be,
5 fewer units balanced than ``--min-balanced`` asks.
Results and the summary go to stdout (the summary to stderr with ``--report -``); progress, logs
and the one-line error to stderr.
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import json
import logging
import math
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import typer

from . import api, io, safewrite
from .errors import (
    InputError,
    Interrupted,
    OnnxBalanceError,
    OutputError,
    SideOutputError,
    TooFewBalancedError,
    VerificationError,
    interrupt_behind,
)
from .plot import MISSING_MATPLOTLIB, image_format, plot_convergence
from .report import Report, comparison_table, summary_table

log = logging.getLogger(__name__)

PROG = "onnxbalance"
MAX_INPUT_ELEMENTS = 2**31 - 1
"""Elements of one ``--input-shape``: a random input of more would not fit in memory (8 GB
at float32), and onnxruntime indexes with int32 in places."""
EXIT_OK, EXIT_UNBALANCED, EXIT_USAGE, EXIT_VERIFY = 0, 1, 2, 3


class Solver(str, enum.Enum):
    newton = "newton"
    mu = "mu"


SUMMARY = "Balance a ReLU network stored as ONNX: the same function, minimum l_{p,q} weight norm."
EXAMPLE = "onnxbalance model.onnx balanced.onnx --p 2 --q 2"
USAGES = ("[OPTIONS] IN OUT", "[OPTIONS] --check IN...", "compare [OPTIONS] A B")


class _Command(typer.core.TyperCommand):
    """The help starts with what the command does and an example; the usage names IN and OUT as
    users write them (typer would print ``{IN}``), once per form of the command."""

    def format_usage(self, ctx, formatter) -> None:
        formatter.write_usage(ctx.command_path, USAGES[0])
        for usage in USAGES[1:]:
            formatter.write_usage(ctx.command_path, usage, prefix=" " * len("Usage: "))

    def format_help(self, ctx, formatter) -> None:
        formatter.write(f"{SUMMARY}\n\nExample: {EXAMPLE}\n\n")
        self.format_usage(ctx, formatter)
        self.format_help_text(ctx, formatter)
        self.format_options(ctx, formatter)
        self.format_epilog(ctx, formatter)


app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,  # plain help: no "<bool>" after flags, no box drawing
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help=SUMMARY,
)


RTOL = typer.Option(
    metavar="R", help="Accept |diff| <= R*|original| + atol instead of the noise-floor rule."
)
ATOL = typer.Option(metavar="A", help="Absolute part of that rule (either option enables it).")
INPUT_SHAPE = typer.Option(metavar="NAME=D1,D2,..", help="Shape of an input with dynamic dims.")


def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"{PROG} {__version__}")
        raise typer.Exit()


@app.command(
    cls=_Command,
    epilog="Exit codes: 0 done (also nothing to balance), 1 --check found IN not balanced, "
    "2 bad usage or unreadable/invalid/unsupported input, 3 verification failed, "
    "4 OUT written but --report/--plot then failed, 5 fewer units balanced than "
    "--min-balanced.",
)
def run(
    # described in the docstring: typer would list OUT as "<list[Path]>"
    source: Annotated[Path | None, typer.Argument(metavar="IN", hidden=True)] = None,
    output: Annotated[list[Path] | None, typer.Argument(metavar="OUT", hidden=True)] = None,
    p: Annotated[float, typer.Option("--p", help="Inner exponent of the l_{p,q} norm.")] = 2.0,
    q: Annotated[float, typer.Option("--q", help="Outer exponent of the l_{p,q} norm.")] = 2.0,
    tol: Annotated[
        float, typer.Option(help="Stop when every scale factor moves by less than this.")
    ] = 1e-6,
    max_sweeps: Annotated[int, typer.Option(help="Give up after this many sweeps.")] = 10_000,
    solver: Annotated[
        Solver | None, typer.Option(help="newton (fast, exact; default) or mu (Algorithm 1).")
    ] = None,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Compare both models in onnxruntime.")
    ] = True,
    inputs: Annotated[
        Path | None, typer.Option(metavar="F.npz", help="Verify on these arrays (.npz).")
    ] = None,
    input_shape: Annotated[list[str] | None, INPUT_SHAPE] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random verification inputs.")] = 0,
    rtol: Annotated[float | None, RTOL] = None,
    atol: Annotated[float | None, ATOL] = None,
    report: Annotated[
        Path | None,
        typer.Option(metavar="F.json", help="Write the run's report as JSON (- for stdout)."),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(metavar="F.png", help="Plot norm/norm_before per sweep.")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Write nothing; exit 1 if any IN is not balanced.")
    ] = False,
    rescale_clip: Annotated[
        bool,
        typer.Option(
            "--rescale-clip",
            help="Balance units behind ReLU6 and other constant clips too, replacing each clip "
            "by per-channel bounds that move with the units.",
        ),
    ] = False,
    copy_shared_weights: Annotated[
        bool,
        typer.Option(
            "--copy-shared-weights",
            help="Give each reader of a shared weight matrix its own copy (the file grows).",
        ),
    ] = False,
    drop_weight_inputs: Annotated[
        bool,
        typer.Option(
            "--drop-weight-inputs",
            help="Remove weights also listed as graph inputs (IR 3, old exporters) from the "
            "inputs, so they are constants that balancing may change.",
        ),
    ] = False,
    min_balanced: Annotated[
        float,
        typer.Option(
            metavar="FRACTION",
            help="Exit 5, writing nothing, if fewer of the units found are balanced.",
        ),
    ] = 0.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log each stage; list fixed units.")
    ] = False,
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = None,
) -> None:
    """Balance the ONNX model IN into OUT (OUT's data file, if any, goes beside it). With --check
    write nothing: every path is a model to check, one line each, exit 1 if any is not
    balanced."""
    _configure_logging(verbose and not quiet, quiet)
    rest = tuple(output or ())
    invocation = Invocation(
        source, None if check or not rest else rest[0], p, q, tol, max_sweeps,
        solver.value if solver else None, verify, inputs, tuple(input_shape or ()), seed, report,
        plot, check, quiet, verbose, more_sources=rest if check else rest[1:],
        rescale_clip=rescale_clip, rtol=rtol, atol=atol,
        copy_shared_weights=copy_shared_weights, drop_weight_inputs=drop_weight_inputs,
        min_balanced=min_balanced,
    )  # fmt: skip
    _exit_with(functools.partial(_run, invocation))


def _exit_with(command: Callable[[], int]) -> None:
    """Run ``command``; a user error becomes its one line and its exit code."""
    try:
        # SIGTERM too becomes an exception, so every temporary file is removed on the way out
        with safewrite.interrupts_raise():
            code = command()
    except OnnxBalanceError as exc:
        _error(str(exc))
        code = exc.exit_code
    except KeyboardInterrupt as exc:
        code = _interrupted(exc)
    except Exception as exc:
        interrupt = interrupt_behind(exc)  # still an interrupt, not a bug
        if interrupt is None:
            raise
        code = _interrupted(interrupt)
    if code:
        raise typer.Exit(code)


@dataclass(frozen=True)
class Invocation:
    """The parsed command line. ``more_sources``: the paths after IN (OUT) and OUT."""

    source: Path | None
    output: Path | None
    p: float
    q: float
    tol: float
    max_sweeps: int
    solver: str | None
    verify: bool
    inputs: Path | None
    input_shape: tuple[str, ...]
    seed: int
    report: Path | None
    plot: Path | None
    check: bool
    quiet: bool
    verbose: bool
    more_sources: tuple[Path, ...] = ()
    rescale_clip: bool = False
    rtol: float | None = None
    atol: float | None = None
    copy_shared_weights: bool = False
    drop_weight_inputs: bool = False
    min_balanced: float = 0.0


def _run(args: Invocation) -> int:
    """:func:`_run_once`; an interrupt that comes once OUT is in place is too late to stop the
    run: OUT is complete, so the run succeeded, unless a report or plot it asked for was still
    to be written (then the interrupt is reported, and that OUT was written)."""
    try:
        return _run_once(args)
    except KeyboardInterrupt as exc:
        if args.check or args.output is None or not safewrite.was_committed(args.output):
            raise
        if args.report is not None or args.plot is not None:
            return _interrupted(exc, f" (OUT {args.output} was written)")
        log.warning("interrupted once %s was written: it is complete", args.output)
        return EXIT_OK


def _run_once(args: Invocation) -> int:
    """Check every path before any work, run, write the report/plot, print the summary."""
    if args.quiet and args.verbose:
        raise InputError("--quiet and --verbose exclude each other; choose one")
    if args.source is None:
        raise InputError("missing IN (usage: onnxbalance IN OUT, or onnxbalance --check IN...)")
    if not args.check and args.output is None:
        raise InputError("missing OUT (or use --check to only measure)")
    if not args.check and args.more_sources:
        raise InputError(
            f"expected IN OUT, got {2 + len(args.more_sources)} paths; "
            "several models are for --check"
        )
    for what, path in (("OUT", args.output), ("--plot", args.plot)):
        if path is not None and _is_stdout(path):
            raise InputError(f"{what} -: only --report can go to stdout; give a file name")
    if args.check and args.more_sources:
        return _check_several(args)
    shapes = parse_input_shapes(args.input_shape)
    if args.output is not None:
        io.check_output_path(args.output, args.source)
    _check_side_outputs(args)
    with _Progress(enabled=not args.quiet and sys.stderr.isatty()) as progress:
        options = dict(_solve_options(args), progress=progress.sweep, on_stage=progress.stage)
        try:
            if args.check:
                result = api.check(args.source, args.p, args.q, **options)
            else:
                result = api.balance_file(
                    args.source, args.output, args.p, args.q, verify=args.verify,
                    inputs=args.inputs, input_shapes=shapes, seed=args.seed,
                    rtol=args.rtol, atol=args.atol, **options,
                )  # fmt: skip
        except (VerificationError, TooFewBalancedError) as error:
            failed = getattr(error, "report", None)
            if failed is not None:
                _finish(failed, replace(args, plot=None))
            raise
    _finish(result, args, committed=not args.check)
    if args.check:
        return EXIT_OK if result.input_balanced else EXIT_UNBALANCED
    return EXIT_OK


def _check_several(args: Invocation) -> int:
    """``--check`` on several models, like ``black --check``: one line per model on stdout (an
    error is its one line on stderr, and the next model is checked); exit 2 if any model could
    not be checked, else 1 if any is not balanced, else 0."""
    if args.report is not None or args.plot is not None:
        raise InputError("--report and --plot take a single IN; drop them to check several")
    code = EXIT_OK
    for source in (args.source, *args.more_sources):
        try:
            result = api.check(source, args.p, args.q, **_solve_options(args))
        except OnnxBalanceError as exc:
            _error(str(exc))
            code = max(code, exc.exit_code)
            continue
        if not result.input_balanced:
            code = max(code, EXIT_UNBALANCED)
        if not args.quiet:
            print(f"{source}: {check_verdict(result)}", flush=True)
    return code


def _solve_options(args: Invocation) -> dict:
    """The options ``api.check`` and ``api.balance_file`` share, from the command line."""
    return dict(tol=args.tol, max_sweeps=args.max_sweeps, solver=args.solver,
                rescale_clip=args.rescale_clip, copy_shared_weights=args.copy_shared_weights,
                drop_weight_inputs=args.drop_weight_inputs,
                min_balanced=args.min_balanced)  # fmt: skip


def check_verdict(result: Report) -> str:
    """What ``--check`` found, in one line."""
    if not result.changed:
        return "balanced: nothing in IN can be rescaled"
    if result.input_balanced:
        return f"balanced: the norm can drop by {100 * result.gap:.3g}% at most"
    return (
        f"NOT balanced: the norm can drop by {100 * result.gap:.3g}% "
        f"({result.norm_before:.6g} -> {result.norm_after:.6g}), "
        f"max imbalance {result.max_imbalance_before:.3g}"
    )


def parse_input_shapes(values: list[str]) -> dict[str, tuple[int, ...]]:
    """``NAME=D1,D2,..`` (or ``NAME=D1xD2``) -> {NAME: (D1, D2, ..)}.

    >>> parse_input_shapes(["x=1,3,224,224", "mask=2x5"])
    {'x': (1, 3, 224, 224), 'mask': (2, 5)}
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        name, sep, dims = value.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            shape = ()
        if not sep or not name or not shape:
            raise InputError(f"--input-shape {value!r}: expected NAME=D1,D2,.. (e.g. x=1,3,32,32)")
        if math.prod(shape) > MAX_INPUT_ELEMENTS and min(shape) > 0:
            raise InputError(
                f"--input-shape {value!r}: {math.prod(shape):.3g} elements, more than the "
                f"{MAX_INPUT_ELEMENTS} a verification input can hold"
            )
        shapes[name] = shape
    return shapes


def _check_side_outputs(args: Invocation) -> None:
    """``--report`` and ``--plot``, before any work: never IN, a file IN references, the
    ``--inputs`` file, OUT, a name OUT's data can take, or each other; writable; the plot's
    format known. Once OUT is committed only the disk failing can stop them (exit 4)."""
    inputs = [args.inputs] if args.inputs is not None else []
    checked: dict[str, Path] = {}
    for what, path in (("report", args.report), ("plot", args.plot)):
        if path is None or (what == "report" and _is_stdout(path)):
            continue
        io.check_side_output(
            path, what=what, source=args.source, inputs=inputs, output=args.output, others=checked
        )
        checked[what] = path
    if args.plot is not None:
        if importlib.util.find_spec("matplotlib") is None:
            raise InputError(MISSING_MATPLOTLIB)
        image_format(args.plot)


def _is_stdout(path: Path) -> bool:
    return str(path) == "-"


def _finish(result: Report, args: Invocation, committed: bool = False) -> None:
    try:
        if args.report is not None:
            text = json.dumps(result.to_dict(), indent=2) + "\n"
            if _is_stdout(args.report):
                sys.stdout.write(text)
                sys.stdout.flush()
            else:
                io.write_bytes(args.report, text.encode())
        if args.plot is not None:
            _plot(result, args.plot)
    except OutputError as exc:
        if committed:
            raise SideOutputError(f"{exc} (OUT {args.output} was written)") from None
        raise
    if args.quiet:
        return
    from rich.console import Console

    # with --report - stdout carries the JSON alone
    console = Console(file=sys.stderr if _is_stdout(args.report or Path()) else sys.stdout)
    console.print(summary_table(result, verbose=args.verbose, check=args.check))
    if args.check:
        console.print(check_verdict(result))


def _plot(result: Report, path: Path) -> None:
    title = rf"{Path(result.source).name}: $\ell_{{{result.p:g},{result.q:g}}}$ ({result.solver})"
    plot_convergence(result.history, path, title=title)


class _Progress:
    """A rich spinner on stderr showing the stage and the solver's sweep; silent when disabled."""

    def __init__(self, enabled: bool) -> None:
        self._progress = None
        self._task = None
        self._stage = ""
        if enabled:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=Console(file=sys.stderr),
                transient=True,
            )

    def __enter__(self) -> _Progress:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("starting", total=None)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def stage(self, name: str) -> None:
        self._stage = name
        if self._progress is not None:
            self._progress.update(self._task, description=name)

    def sweep(self, step: int, norm: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=f"solve: sweep {step}, norm {norm:.6g}")


def _configure_logging(verbose: bool, quiet: bool = False) -> None:
    # --quiet: nothing on success, warnings included; errors still give their one line
    level = logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"{PROG}: %(message)s",
        force=True,
    )


compare_app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,  # plain help, like the balancing command's
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class _CompareCommand(typer.core.TyperCommand):
    """The usage names A and B as users write them (typer would print ``{A} {B}``)."""

    def format_usage(self, ctx, formatter) -> None:
        formatter.write_usage(ctx.command_path, USAGES[-1].removeprefix("compare "))


@compare_app.command(
    cls=_CompareCommand,
    epilog="Exit codes: 0 equivalent, 2 bad usage or unreadable/invalid input, 3 different.",
)
def compare(
    first: Annotated[Path, typer.Argument(metavar="A", help="The reference model.")],
    second: Annotated[Path, typer.Argument(metavar="B", help="The model to check against A.")],
    inputs: Annotated[
        Path | None, typer.Option(metavar="F.npz", help="Compare on these arrays (.npz).")
    ] = None,
    input_shape: Annotated[list[str] | None, INPUT_SHAPE] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random inputs.")] = 0,
    rtol: Annotated[float | None, RTOL] = None,
    atol: Annotated[float | None, ATOL] = None,
    report: Annotated[
        Path | None,
        typer.Option(metavar="F.json", help="Write the comparison as JSON (- for stdout)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing.")] = False,
) -> None:
    """Run A and B in onnxruntime on the same inputs; exit 3 if B does not compute what A does."""
    _configure_logging(False, quiet)
    _exit_with(
        functools.partial(
            _compare, first, second, inputs, tuple(input_shape or ()), seed, rtol, atol, report,
            quiet,
        )
    )  # fmt: skip


def _compare(first, second, inputs, input_shape, seed, rtol, atol, report, quiet) -> int:
    """Check the report's path before any work, compare, write the report, print the table."""
    shapes = parse_input_shapes(list(input_shape))
    if report is not None and not _is_stdout(report):
        for source in (first, second):
            io.check_side_output(report, what="report", source=source,
                                 inputs=[inputs] if inputs is not None else [])  # fmt: skip
    comparison = api.compare(
        first, second, inputs=inputs, input_shapes=shapes, seed=seed, rtol=rtol, atol=atol
    )
    if report is not None:
        data = {"first": str(first), "second": str(second), "verify": comparison.to_dict()}
        text = json.dumps(data, indent=2) + "\n"
        if _is_stdout(report):
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            io.write_bytes(report, text.encode())
    if not quiet:
        from rich.console import Console

        # with --report - stdout carries the JSON alone
        console = Console(file=sys.stderr if _is_stdout(report or Path()) else sys.stdout)
        console.print(comparison_table(comparison, str(first), str(second)))
    if comparison.passed:
        return EXIT_OK
    hint = "compare on other arrays with --inputs, or loosen with --rtol/--atol"
    _error(f"{second}: {api.difference_text(comparison)} ({hint})")
    return EXIT_VERIFY


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the command, turn every user error into one line and an exit code.

    ``onnxbalance compare A B`` is a command of its own; every other command line balances
    (``onnxbalance IN OUT``), so that form needs no command name.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:  # a bare command: how to use it
        print(_usage(), file=sys.stderr)
        return EXIT_USAGE
    command, prog = app, PROG
    if args[0] == "compare":
        command, prog, args = compare_app, f"{PROG} compare", args[1:]
    try:
        code = command(args=args, prog_name=prog, standalone_mode=False)
    except _usage_errors() as exc:  # unknown option, bad value, missing IN
        _error(exc.format_message())
        return EXIT_USAGE
    except typer.Abort:
        return _interrupted(KeyboardInterrupt())
    if code == 130 and not _INTERRUPT_REPORTED:
        # typer turns an interrupt that lands while it parses into a bare exit code 130
        return _interrupted(Interrupted.last or KeyboardInterrupt())
    return code if isinstance(code, int) else EXIT_OK


_INTERRUPT_REPORTED = False


def _interrupted(interrupt: KeyboardInterrupt, detail: str = "") -> int:
    """The one line every interrupt gives, once; the exit code 128 + signal."""
    global _INTERRUPT_REPORTED
    _INTERRUPT_REPORTED = True
    _error(f"interrupted{detail}")
    return 128 + getattr(interrupt, "signum", signal.SIGINT)


def _usage() -> str:
    lines = [f"{'Usage:' if i == 0 else ' ' * 6} {PROG} {usage}" for i, usage in enumerate(USAGES)]
    return "\n".join([*lines, f"Try '{PROG} --help' for help."])


def _usage_errors() -> tuple[type[Exception], ...]:
    """Typer's usage-error base: its vendored click's (newer typer) or click's (older typer)."""
    classes: list[type[Exception]] = []
    if hasattr(typer, "TyperException"):
        classes.append(typer.TyperException)
    try:
        import click
    except ImportError:
        pass
    else:
        classes.append(click.ClickException)
    return tuple(classes)


def _error(message: str) -> None:
    line = " ".join(str(message).split())
    print(f"{PROG}: error: {line}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
