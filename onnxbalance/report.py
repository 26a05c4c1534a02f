"""The records a balancing run produces, their JSON form, and the summary table.

A :class:`Report` aggregates one run: the l_{p,q} norm before and after (their ratio is what
balancing bought), how many hidden units moved and which were left at scale 1 and why, the solver's
history as ratios norm/norm_before (monotone non-increasing for every solver we ship), the
output comparison, and seconds per stage. :class:`Comparison` is the verification record
(Polygraphy's comparator is the model): per output the largest absolute difference and that
difference relative to the output's magnitude, max|reference|.

Records only: nothing here runs a model or a solver. ``rich`` is imported when a table is drawn.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .weightstats import LayerStats

if TYPE_CHECKING:
    from rich.table import Table


@dataclass(frozen=True)
class OutputComparison:
    """One output of the original model against the same output of the balanced one.

    ``max_rel_diff`` is ``max_abs_diff / max|reference|``: relative to the output's magnitude, so
    entries near zero do not blow it up. ``passed`` applies the tolerance elementwise
    (``|diff| <= rtol * |reference| + atol``; by default ``rtol`` is 0 and ``atol`` follows
    from ``noise_floor``, the largest deviation of each model run with its weights perturbed by
    round-off, both added); ``tolerance_ratio`` is the largest
    ``|diff| / (rtol * |reference| + atol)``, above 1 when it failed; ``reason`` says why it
    failed, or how it was compared when that was not in the models' own dtype; empty otherwise.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    max_abs_diff: float
    max_rel_diff: float
    rtol: float
    atol: float
    passed: bool
    reason: str = ""
    noise_floor: float = 0.0
    tolerance_ratio: float = 0.0

    def __bool__(self) -> bool:
        return self.passed


@dataclass(frozen=True)
class Comparison:
    """Both models run on the same inputs; ``passed`` only if every output passed.

    ``n_inputs`` counts samples (``draws`` runs times the batch each one feeds),
    ``input_shapes`` gives each input's shape in one run, ``rule`` is ``"noise_floor"`` or
    ``"fixed"`` (the caller's rtol/atol). ``active_fraction`` is the fraction of the values
    after the first model's Relu nodes that were non-zero on those inputs (None: no Relu, or
    weights in external files): near 0 or 1, the hidden units were barely put to the test.
    """

    outputs: tuple[OutputComparison, ...]
    n_inputs: int
    seed: int
    draws: int = 1
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    rule: str = "noise_floor"
    active_fraction: float | None = None

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    @property
    def max_abs_diff(self) -> float:
        return max((o.max_abs_diff for o in self.outputs), default=0.0)

    @property
    def max_rel_diff(self) -> float:
        return max((o.max_rel_diff for o in self.outputs), default=0.0)

    @property
    def tolerance_ratio(self) -> float:
        return max((o.tolerance_ratio for o in self.outputs), default=0.0)

    @property
    def failures(self) -> tuple[OutputComparison, ...]:
        return tuple(o for o in self.outputs if not o.passed)

    @property
    def insensitive(self) -> bool:
        """Under the noise-floor rule, no floating output moved, in either model, when the
        weights were perturbed or balanced: the inputs put no weight to the test."""
        floating = [o for o in self.outputs if "float" in o.dtype]
        return (
            self.rule == "noise_floor"
            and bool(floating)
            and all(o.noise_floor == 0 and o.max_abs_diff == 0 for o in floating)
        )

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "max_abs_diff": _finite(self.max_abs_diff),
            "max_rel_diff": _finite(self.max_rel_diff),
            "tolerance_ratio": _finite(self.tolerance_ratio),
            "rule": self.rule,
            "n_inputs": self.n_inputs,
            "draws": self.draws,
            "active_fraction": self.active_fraction,
            "insensitive": self.insensitive,
            "input_shapes": {name: list(shape) for name, shape in self.input_shapes.items()},
            "seed": self.seed,
            "outputs": [
                {
                    "name": o.name,
                    "dtype": o.dtype,
                    "shape": list(o.shape),
                    "max_abs_diff": _finite(o.max_abs_diff),
                    "max_rel_diff": _finite(o.max_rel_diff),
                    "rtol": o.rtol,
                    "atol": o.atol,
                    "noise_floor": o.noise_floor,
                    "tolerance_ratio": _finite(o.tolerance_ratio),
                    "passed": o.passed,
                    "reason": o.reason,
                }
                for o in self.outputs
            ],
        }


@dataclass(frozen=True)
class FixedEntry:
    """Hidden units of one layer left at scale 1 for one reason."""

    name: str
    count: int
    reason: str


@dataclass(frozen=True)
class Report:
    """Everything one balancing run (or one ``--check``) found out.

    ``history`` holds norm/norm_before at the start and after every sweep or accepted step.
    ``verify`` is None when verification was skipped (``--no-verify``, ``--check``, or nothing
    changed). ``seconds`` maps stage name to wall-clock seconds, in the order the stages ran.
    ``max_imbalance_before``/``_after`` are max over balanced units of |in - out| / (in + out)
    (docs/algorithm.md §3; 0 means exactly balanced). ``units_behind_clips`` reach a clip with
    constant bounds (ReLU6, ...), which stops them unless ``rescale_clip``, and nothing else
    would (those the option balances); ``clips_replaced`` names the clip nodes replaced by
    per-unit bounds. ``weight_inputs_dropped`` names the weights removed from the graph inputs
    (``drop_weight_inputs``).
    """

    p: float
    q: float
    tol: float
    solver: str
    norm_before: float
    norm_after: float
    sweeps: int
    passes: int
    converged: bool
    message: str
    units_found: int
    units_balanced: int
    units_fixed: tuple[FixedEntry, ...]
    history: tuple[float, ...]
    max_imbalance_before: float = 0.0
    max_imbalance_after: float = 0.0
    verify: Comparison | None = None
    seconds: Mapping[str, float] = field(default_factory=dict)
    source: str = ""
    output: str = ""
    layers_before: tuple[LayerStats, ...] = ()
    layers_after: tuple[LayerStats, ...] = ()
    rescale_clip: bool = False
    units_behind_clips: int = 0
    clips_replaced: tuple[str, ...] = ()
    copied_tensors: int = 0
    bytes_added: int = 0
    weight_inputs_dropped: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        """False when there was nothing to balance and the output equals the input."""
        return self.units_balanced > 0

    @property
    def norm_ratio(self) -> float:
        """norm_after / norm_before (1 when the norm is 0 or nothing moved)."""
        return self.norm_after / self.norm_before if self.norm_before > 0 else 1.0

    @property
    def gap(self) -> float:
        """How much balancing can lower the norm, relative: 1 - norm_ratio."""
        return 1.0 - self.norm_ratio

    @property
    def input_balanced(self) -> bool:
        """Re-balancing would lower the norm by at most a relative ``tol`` (or nothing can move)."""
        return not self.changed or self.gap <= self.tol

    @property
    def n_fixed(self) -> int:
        return sum(entry.count for entry in self.units_fixed)

    @property
    def balanced_fraction(self) -> float:
        """units_balanced / units_found (1 when no unit was found: nothing was left out)."""
        return self.units_balanced / self.units_found if self.units_found else 1.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN and infinities become null)."""
        return {
            "source": self.source,
            "output": self.output,
            "p": self.p,
            "q": self.q,
            "tol": self.tol,
            "solver": self.solver,
            "norm_before": _finite(self.norm_before),
            "norm_after": _finite(self.norm_after),
            "norm_ratio": _finite(self.norm_ratio),
            "gap": _finite(self.gap),
            "sweeps": self.sweeps,
            "passes": self.passes,
            "converged": self.converged,
            "message": self.message,
            "changed": self.changed,
            "input_balanced": self.input_balanced,
            "units_found": self.units_found,
            "units_balanced": self.units_balanced,
            "units_fixed": [
                {"name": e.name, "count": e.count, "reason": e.reason} for e in self.units_fixed
            ],
            "balanced_fraction": self.balanced_fraction,
            "copied_tensors": self.copied_tensors,
            "bytes_added": self.bytes_added,
            "max_imbalance_before": _finite(self.max_imbalance_before),
            "max_imbalance_after": _finite(self.max_imbalance_after),
            "verify": self.verify.to_dict() if self.verify is not None else None,
            "seconds": {stage: round(s, 6) for stage, s in self.seconds.items()},
            "history": [_finite(h) for h in self.history],
            "layers": layer_stats_dicts(self.layers_before, self.layers_after),
            "rescale_clip": self.rescale_clip,
            "units_behind_clips": self.units_behind_clips,
            "clips_replaced": list(self.clips_replaced),
            "weight_inputs_dropped": list(self.weight_inputs_dropped),
        }


def fixed_entries(records: Iterable[tuple[str, int, str]]) -> tuple[FixedEntry, ...]:
    """Merge (layer, count, reason) records: one entry per layer and reason, first-seen order.

    >>> fixed_entries([("a", 2, "dead"), ("b", 1, "output"), ("a", 3, "dead")])
    (FixedEntry(name='a', count=5, reason='dead'), FixedEntry(name='b', count=1, reason='output'))
    """
    counts: dict[tuple[str, str], int] = {}
    for name, count, reason in records:
        counts[(name, reason)] = counts.get((name, reason), 0) + int(count)
    return tuple(FixedEntry(name, count, reason) for (name, reason), count in counts.items())


def layer_stats_dicts(
    before: tuple[LayerStats, ...], after: tuple[LayerStats, ...]
) -> list[dict[str, Any]]:
    """Per layer: its weight-range statistics before and (when balanced) after."""
    rows = []
    for i, b in enumerate(before):
        entry: dict[str, Any] = {"name": b.name, "before": _stats_dict(b)}
        if i < len(after):
            entry["after"] = _stats_dict(after[i])
        rows.append(entry)
    return rows


def _stats_dict(stats: LayerStats) -> dict[str, Any]:
    d = stats.to_dict()
    del d["name"]
    return {k: _finite(v) if isinstance(v, float) else v for k, v in d.items()}


def verification_text(comparison: Comparison | None) -> str:
    if comparison is None:
        return "skipped"
    verdict = "PASSED" if comparison.passed else "FAILED"
    return (
        f"{verdict}: max abs diff {comparison.max_abs_diff:.3g}, "
        f"max rel diff {comparison.max_rel_diff:.3g}, "
        f"{comparison.tolerance_ratio:.3g} of the tolerance, on {comparison.n_inputs} inputs"
        + (
            f", {100 * comparison.active_fraction:.3g}% of hidden values active"
            if comparison.active_fraction is not None
            else ""
        )
        + (
            "; no output moved with the weights: the inputs test nothing"
            if comparison.insensitive
            else ""
        )  # fmt: skip
    )


def comparison_table(comparison: Comparison, first: str, second: str) -> Table:
    """The table ``onnxbalance compare`` prints: the verdict, what was run, each output."""
    from rich.table import Table

    table = Table(title="onnxbalance compare", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("models", f"{first} vs {second}")
    shapes = ", ".join(f"{n} {list(s)}" for n, s in comparison.input_shapes.items())
    table.add_row(
        "inputs", f"{comparison.draws} draws: {shapes}" if comparison.draws > 1 else shapes
    )
    table.add_row("verification", verification_text(comparison))
    for o in comparison.outputs:
        table.add_row("", _output_text(o))
    return table


def _output_text(o: OutputComparison) -> str:
    line = (
        f"{o.name}: abs {o.max_abs_diff:.3g}, rel {o.max_rel_diff:.3g}, "
        f"noise floor {o.noise_floor:.3g}, tolerance {o.atol:.3g}"
    )
    return line + (f" ({o.reason})" if o.reason else "")


def summary_table(report: Report, *, verbose: bool = False, check: bool = False) -> Table:
    """The end-of-run table: units, norms, sweeps, verification, seconds per stage."""
    from rich.table import Table

    title = "onnxbalance check" if check else "onnxbalance"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    shortfall = shortfall_text(report)
    if shortfall:
        table.add_row("WARNING", shortfall)
    table.add_row("norm", f"l_{{{_num(report.p)},{_num(report.q)}}}")
    table.add_row("units found", str(report.units_found))
    table.add_row("units balanced" if not check else "units movable", str(report.units_balanced))
    table.add_row("units left fixed", str(report.n_fixed))
    if report.units_behind_clips:
        table.add_row("units behind clips", _clips_text(report, check))
    if report.copied_tensors:
        copies = f"{report.copied_tensors} tensors, file {report.bytes_added:+,} bytes"
        table.add_row("private copies", copies)
    if report.weight_inputs_dropped:
        table.add_row("weight inputs dropped", str(len(report.weight_inputs_dropped)))
    if verbose:
        for entry in report.units_fixed:
            table.add_row("", f"{entry.count} in {entry.name}: {entry.reason}")
    if not report.changed:
        table.add_row("result", "nothing to balance: output is an unchanged copy")
    else:
        after = "minimum norm" if check else "norm after"
        table.add_row("norm before", f"{report.norm_before:.6g}")
        table.add_row(after, f"{report.norm_after:.6g}")
        table.add_row("ratio", f"{report.norm_ratio:.6f} ({100 * report.gap:.4g}% lower)")
        imbalance = f"{report.max_imbalance_before:.3g}"
        if not check:
            imbalance += f" -> {report.max_imbalance_after:.3g}"
        table.add_row("max imbalance", imbalance)
        converged = "converged" if report.converged else "NOT converged"
        steps = "sweeps" if report.solver == "mu" else "steps"
        table.add_row("solver", f"{report.solver}, {report.sweeps} {steps}, {converged}")
        if verbose and report.message:
            table.add_row("", report.message)
    if not check and not report.changed:
        table.add_row("verification", "not needed (model unchanged)")
    elif not check:
        table.add_row("verification", verification_text(report.verify))
        if report.verify is not None and (verbose or not report.verify.passed):
            for o in report.verify.outputs:
                table.add_row("", _output_text(o))
    if verbose:
        for i, b in enumerate(report.layers_before):
            a = report.layers_after[i] if i < len(report.layers_after) else None
            table.add_row(f"weights {b.name}", _stats_text(b, a))
    for stage, seconds in report.seconds.items():
        table.add_row(f"seconds {stage}", f"{seconds:.3f}")
    if report.seconds:
        table.add_row("seconds total", f"{sum(report.seconds.values()):.3f}")
    return table


def _clips_text(report: Report, check: bool) -> str:
    n, k = report.units_behind_clips, len(report.clips_replaced)
    if not report.rescale_clip:
        return f"{n} (fixed; --rescale-clip balances them)"
    nodes = f"{k} clip node{'' if k == 1 else 's'}"
    return f"{n} ({nodes} {'to replace' if check else 'replaced'} by per-unit bounds)"


LOW_BALANCED = 0.5
"""Below this fraction of the units found, the summary warns on top."""


_OPTION = re.compile(r"--[a-z][a-z-]*[a-z]")
_QUOTED = re.compile(r"'[^']*'")


def freeing_options(units_fixed: Iterable[FixedEntry]) -> dict[str, int]:
    """Options the reasons for fixed units name (``--rescale-clip``, ``--drop-weight-inputs``,
    ...), each with how many of those units it may free, most first."""
    counts: dict[str, int] = {}
    for entry in units_fixed:
        unnamed = _QUOTED.sub("", entry.reason)  # a tensor may be called 'x--y'
        for option in sorted(set(_OPTION.findall(unnamed))):
            counts[option] = counts.get(option, 0) + entry.count
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def shortfall_text(report: Report) -> str:
    """A warning when nothing or only a small part of the units found was balanced, else '',
    naming the options that may free fixed units."""
    found, moved = report.units_found, report.units_balanced
    if not found or report.balanced_fraction >= LOW_BALANCED:
        return ""
    options = "".join(
        f"; {option} may free {count}"
        for option, count in freeing_options(report.units_fixed).items()
    )
    if not moved:
        return f"nothing balanced: all {found} units found are fixed (--verbose says why{options})"
    return (
        f"only {moved} of {found} units found balanced ({100 * report.balanced_fraction:.3g}%; "
        f"--verbose says why the others are fixed{options})"
    )


def _num(x: float) -> str:
    return f"{x:g}"


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _stats_text(before: LayerStats, after: LayerStats | None) -> str:
    """max|w|, spread of per-unit ranges, units lost at int8: 'before->after' each."""
    if after is None:
        return (
            f"max|w| {before.largest:.3g}  spread {before.spread:.3g}  "
            f"lost@int8 {before.lost_int8} of {before.units}"
        )
    return (
        f"max|w| {before.largest:.3g}->{after.largest:.3g}  "
        f"spread {before.spread:.3g}->{after.spread:.3g}  "
        f"lost@int8 {before.lost_int8}->{after.lost_int8} of {before.units}"
    )
