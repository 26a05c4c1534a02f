"""The library entry points: balance a model, balance a file, check how far a model is from balance.

One direction of flow, each stage timed:

    load -> analyse (ModelUnits) -> solve (SolveResult) -> rewrite -> verify -> Report

"Balanced" (``check``): re-balancing could lower ||W||_{p,q} by at most a relative ``tol``,
i.e. ``1 - norm_min / norm <= tol``. Near the optimum the norm is quadratic in the log-scales,
so a model balanced to scale tolerance ``tol`` (and stored in float32) is far inside this bound,
while any model with a real imbalance is far outside it. The report also gives the largest
per-unit imbalance |in - out| / (in + out) (docs/algorithm.md §3).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from . import io, protos, safewrite, tensors
from .errors import InputError, TooFewBalancedError, UnsupportedModelError, VerificationError
from .report import Comparison, Report, fixed_entries
from .unitgraph import ModelUnits, UnitGraph
from .weightstats import LayerStats, layer_stats

log = logging.getLogger(__name__)

ModelOrPath = onnx.ModelProto | str | os.PathLike
Progress = Callable[[int, float], None]
Stage = Callable[[str], None]


def _arrays_kept(entry_point):
    """``entry_point`` with each weight decoded once (:func:`onnxbalance.tensors.arrays_kept`)."""

    @functools.wraps(entry_point)
    def run(*args, **kwargs):
        with tensors.arrays_kept():
            return entry_point(*args, **kwargs)

    return run


@_arrays_kept
def balance(
    model_or_path: ModelOrPath,
    p: float = 2.0,
    q: float = 2.0,
    *,
    tol: float = 1e-6,
    max_sweeps: int = 10_000,
    solver: str | None = None,
    verify: bool = True,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    progress: Progress | None = None,
    on_stage: Stage | None = None,
    rescale_clip: bool = False,
    copy_shared_weights: bool = False,
    drop_weight_inputs: bool = False,
    min_balanced: float = 0.0,
) -> tuple[onnx.ModelProto, Report]:
    """Rescale the hidden units of a ReLU network to minimise its l_{p,q} weight norm.

    The function the model computes is unchanged; ``model_or_path`` is never modified. When
    nothing can be balanced the returned model is an unchanged copy (``report.changed`` is False).

    Args:
        model_or_path: an ``onnx.ModelProto`` or the path of an ONNX file.
        p, q: the norm (docs/algorithm.md §2); both > 0.
        tol: stop when every scale factor of a sweep changes by less than this.
        max_sweeps: give up after this many sweeps (``report.converged`` is then False).
        solver: ``"newton"`` or ``"mu"`` (Algorithm 1); None for the solver's default.
        verify: run both models in onnxruntime and compare their outputs.
        inputs: arrays (or an ``.npz`` path) to verify with, instead of seeded random ones.
        input_shapes: shapes for inputs with dynamic dimensions (default: a batch of 8, else
            the first of 16, 64, 256 and 512 at which the input model runs and its outputs
            move with the weights; see :func:`onnxbalance.verify.compare_models`).
        rtol, atol: accept ``|balanced - original| <= rtol * |original| + atol`` instead of the
            tolerance derived from the model's own round-off (either one given: the other is 0).
        progress: called with (sweep, norm) as the solver goes.
        on_stage: called with each stage's name as it starts.
        rescale_clip: balance units behind clips with constant bounds (ReLU6 = Clip(x, 0, 6),
            Min(Max(x, 0), 6), ...) too, replacing each such node by per-unit bounds that move
            with the units (``report.clips_replaced``).
        copy_shared_weights: give each reader of a shared weight matrix that needs its own
            factors a private copy (the file grows; ``report.bytes_added`` says by how much).
            Shared vectors (biases, BN parameters) are always copied where needed.
        drop_weight_inputs: remove the weights that the model also lists as graph inputs from
            those inputs (IR 3 lists every weight there; so do exporters asked to keep
            initializers as inputs), so that they are constants that balancing may change;
            otherwise a unit with such a weight stays fixed, since a caller could feed another
            value. The output then takes only the other inputs (its IR version is at least 4);
            ``report.weight_inputs_dropped`` names them.
        min_balanced: the smallest fraction of the units found that must be balanced.

    Returns:
        The balanced model and the run's :class:`Report`.

    Raises:
        InputError, UnsupportedModelError: the model or an option cannot be used.
        VerificationError: the outputs differ beyond tolerance; its ``report`` attribute holds
            the full report (``report.verify.passed`` is False).
        TooFewBalancedError: less than ``min_balanced`` of the units found were balanced (its
            ``report`` attribute holds the report; nothing is verified or written).
    """
    _check_options(p, q, tol, max_sweeps, seed, min_balanced)
    timer = _Timer(on_stage)
    with timer("load"):
        model, source, folder, dropped = _load(model_or_path, drop_weight_inputs)
        feed = io.load_inputs(inputs) if isinstance(inputs, str | os.PathLike) else inputs
    with tensors.external_folder(folder):
        balanced, report = _balanced(
            model, source, p, q, tol, max_sweeps, solver, progress, timer, _rewrite(model, timer),
            rescale_clip, copy_shared_weights,
        )  # fmt: skip
        _require_balanced(report, min_balanced, source)
        # a returned model stands alone: weights still in the input's data files are read in
        balanced = _self_contained(model if balanced is None else balanced)
        comparison = None
        if verify and report.solver != "none":
            with timer("verify"):
                from .verify import compare_models

                original = source if folder is not None else model
                comparison = compare_models(
                    original, balanced, inputs=feed, input_shapes=input_shapes, seed=seed,
                    rtol=rtol, atol=atol,
                )  # fmt: skip
        elif verify:  # nothing balanced: the copy must still be a model onnxruntime runs
            with timer("verify"):
                from .verify import check_runs

                check_runs(source if folder is not None else model, inputs=feed,
                           input_shapes=input_shapes, seed=seed)  # fmt: skip
    report = replace(
        report, verify=comparison, seconds=dict(timer.seconds), rescale_clip=rescale_clip,
        weight_inputs_dropped=dropped,
    )  # fmt: skip
    _raise_if_failed(report, source, balanced)
    return balanced, report


@_arrays_kept
def balance_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    p: float = 2.0,
    q: float = 2.0,
    *,
    tol: float = 1e-6,
    max_sweeps: int = 10_000,
    solver: str | None = None,
    verify: bool = True,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    progress: Progress | None = None,
    on_stage: Stage | None = None,
    rescale_clip: bool = False,
    copy_shared_weights: bool = False,
    drop_weight_inputs: bool = False,
    min_balanced: float = 0.0,
) -> Report:
    """Balance the ONNX file ``src`` and write the result to ``dst`` atomically.

    ``dst`` is checked before any work (its folder must exist; it must not be ``src``). Weights
    stored in external data files are read lazily and streamed to ``dst``'s own data file
    (``dst.name + ".data"``; each tensor keeps the storage it had). The output is staged beside
    ``dst``, verified from there, and only then moved into place: nothing is written when
    anything fails, verification included. Options are those of :func:`balance`.

    Raises:
        VerificationError: its ``report`` attribute holds the full report.
    """
    io.check_output_path(dst, src)
    _check_options(p, q, tol, max_sweeps, seed, min_balanced)
    timer = _Timer(on_stage)
    with timer("load"):
        model, source, folder, dropped = _load(src, drop_weight_inputs)
        feed = io.load_inputs(inputs) if isinstance(inputs, str | os.PathLike) else inputs
    with tensors.external_folder(folder):
        produce = _rewrite_while_writing(model, dst, src, folder, timer)
        staged, report = _balanced(
            model, source, p, q, tol, max_sweeps, solver, progress, timer, produce, rescale_clip,
            copy_shared_weights,
        )  # fmt: skip
        if staged is None:  # nothing to balance: the model is written as it is
            with timer("write"):
                staged = safewrite.stage_model(
                    model, dst, base_dir=folder, external=tensors.external_names(model),
                    protected=[src],
                )  # fmt: skip
        with staged:
            _require_balanced(report, min_balanced, source)
            comparison = None
            if verify and report.solver != "none":
                with timer("verify"):
                    from .verify import compare_models

                    comparison = compare_models(
                        src, staged.model_path, inputs=feed, input_shapes=input_shapes,
                        seed=seed, rtol=rtol, atol=atol, scratch=staged.folder,
                    )  # fmt: skip
            elif verify:  # nothing balanced: the copy must still be a model onnxruntime runs
                with timer("verify"):
                    from .verify import check_runs

                    check_runs(src, inputs=feed, input_shapes=input_shapes, seed=seed)
            report = replace(
                report, verify=comparison, seconds=dict(timer.seconds), output=str(dst),
                rescale_clip=rescale_clip, weight_inputs_dropped=dropped,
            )  # fmt: skip
            _raise_if_failed(report, source, None)
            with timer("write"):  # waits for the staged files to reach the disk, then renames
                staged.commit()
    return replace(report, seconds=dict(timer.seconds))


def _raise_if_failed(report: Report, source: str, balanced: onnx.ModelProto | None) -> None:
    comparison = report.verify
    if comparison is None or comparison.passed:
        return
    # balance() writes nothing: its caller gets the model on the error, not a file story
    outcome = "not written" if balanced is None else "not returned (see error.model)"
    hint = RETRY_HINT if balanced is None else IN_MEMORY_RETRY_HINT
    error = VerificationError(
        f"{source or 'model'}: the balanced model's {difference_text(comparison)}; {hint}; the "
        f"balanced model is {outcome}"
    )
    error.report = report  # type: ignore[attr-defined]
    error.model = balanced  # type: ignore[attr-defined]
    raise error


RETRY_HINT = "verify on other arrays with --inputs, loosen with --rtol/--atol, or --no-verify"
IN_MEMORY_RETRY_HINT = "verify on other arrays (inputs=), loosen (rtol=, atol=) or verify=False"


def difference_text(comparison: Comparison) -> str:
    """The worst failed output, and how far outside its tolerance its worst value was."""
    worst = max(comparison.failures, key=lambda o: (o.tolerance_ratio, o.max_rel_diff))
    allowed = (
        f"up to {worst.atol:.3g}" if not worst.rtol else f"{worst.rtol:.3g}·|x| + {worst.atol:.3g}"
    )
    outside = (
        f"{worst.tolerance_ratio:.3g} times the tolerance ({allowed}, noise floor "
        f"{worst.noise_floor:.3g})"
        if np.isfinite(worst.tolerance_ratio) and worst.tolerance_ratio > 1
        else "beyond any tolerance"
    )
    return (
        f"output {worst.name!r} differs from the input's ({worst.reason}; max abs diff "
        f"{worst.max_abs_diff:.3g}, max rel diff {worst.max_rel_diff:.3g}, {outside})"
    )


def _balanced(
    model, source, p, q, tol, max_sweeps, solver, progress, timer, produce, clip, copy_weights=False
):
    """analyse -> solve -> ``produce(units, log_scales)`` (rewrite, or rewrite while writing).

    Returns (what ``produce`` made or None when there is nothing to balance, report). The
    coupling matrices (twice the weights' bytes for float32) are dropped before ``produce``
    allocates anything. Units whose rescaled weights would overflow their dtype are fixed at
    scale 1 with a reason and the rest solved again (see :mod:`onnxbalance.overflow`).
    """
    from .overflow import overflowing_groups, pin_groups

    with timer("analyse"):
        units = _analyse(model, source, clip, copy_weights)
    result, report = _solved(units, p, q, tol, max_sweeps, solver, progress, timer, source)
    while result is not None:
        try:
            return produce(units, result.log_scales), report
        except UnsupportedModelError:
            reasons = overflowing_groups(model, units, result.log_scales)
            if not reasons:
                raise
        log.warning("%d units fixed: their rescaled weights would overflow", len(reasons))
        units = pin_groups(units, reasons)
        result, report = _solved(units, p, q, tol, max_sweeps, solver, progress, timer, source)
    return None, report


def _solved(units, p, q, tol, max_sweeps, solver, progress, timer, source):
    """(SolveResult, or None when there is nothing to balance, and the report), timed as
    "solve" with the coupling matrices and the weight statistics. The matrices are dropped on
    return, before anything else allocates."""
    with timer("solve"):
        unit_max: list[np.ndarray] = []  # per layer each unit's largest |w|, found on the way
        graph = units.unit_graph(p, unit_max)  # the solver's data: it depends on p
        result = None
        if units.n_groups:
            result = _solve(graph, p, q, tol, max_sweeps, solver, progress, source)
        before = tuple(
            layer_stats(layer.name, maxima[:, None])
            for layer, maxima in zip(units.layers, unit_max, strict=True)
        )
        return result, _report(units, graph, result, p, q, tol, timer.seconds, source, before)


def _rewrite(model, timer):
    """``produce`` for :func:`_balanced`: the balanced model in memory."""
    from .rewrite import rewrite

    def produce(units, log_scales):
        with timer("rewrite"):
            return rewrite(model, units, log_scales)

    return produce


def _rewrite_while_writing(model, dst, src, folder, timer):
    """``produce`` for :func:`_balanced`: the balanced model staged beside ``dst``.

    Rescaled initializers stored as raw bytes are computed block by block as the output file is
    written (:func:`onnxbalance.rewrite.rescaled_blocks`): the new weights never sit in memory
    whole, and the rewrite itself only handles Constant nodes and typed-field tensors.
    """
    from .rewrite import checked_scales, rescaled_blocks, rewrite, scales_of, tensor_edits

    stored = {t.name: t for t in model.graph.initializer}

    def produce(units, log_scales):
        u = checked_scales(units, log_scales)
        scales = scales_of(u)
        edits = tensor_edits(units)
        # stored as raw bytes: rescaled as they are written; values in typed fields (small,
        # hand-made tensors) are rewritten in memory, which keeps that storage style
        streamed = frozenset(
            name
            for name in edits
            if name in stored
            and (stored[name].HasField("raw_data") or tensors.is_external(stored[name]))
        )
        with timer("rewrite"):  # what is not streamed: Constant nodes, typed-field tensors
            streams_all = streamed == edits.keys() and not units.clips
            balanced = model if streams_all else rewrite(model, units, u, skip=streamed)

        def blocks(name):
            shape, _, values = rescaled_blocks(stored[name], edits[name], scales)
            return shape, values

        with timer("write"):
            return safewrite.stage_model(
                balanced,
                dst,
                base_dir=folder,
                external=tensors.external_names(model),
                protected=[src],
                generated={name: functools.partial(blocks, name) for name in streamed},
            )

    return produce


def _self_contained(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every external tensor read in (a copy; the input is never changed)."""
    if not tensors.external_names(model):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    return protos.map_tensors(model, lambda t: safewrite.inline_tensor(t, None))


@_arrays_kept
def check(
    model_or_path: ModelOrPath,
    p: float = 2.0,
    q: float = 2.0,
    *,
    tol: float = 1e-6,
    max_sweeps: int = 10_000,
    solver: str | None = None,
    progress: Progress | None = None,
    on_stage: Stage | None = None,
    rescale_clip: bool = False,
    copy_shared_weights: bool = False,
    drop_weight_inputs: bool = False,
    min_balanced: float = 0.0,
) -> Report:
    """How far the model is from balanced; nothing is rewritten or written.

    ``report.norm_after`` is the smallest norm balancing reaches, ``report.input_balanced`` tells
    whether the current norm is within a relative ``tol`` of it (see the module docstring).
    ``rescale_clip``, ``copy_shared_weights``, ``drop_weight_inputs`` and ``min_balanced``
    (here: movable units) as in :func:`balance`.
    """
    _check_options(p, q, tol, max_sweeps, min_balanced=min_balanced)
    timer = _Timer(on_stage)
    with timer("load"):
        model, source, folder, dropped = _load(model_or_path, drop_weight_inputs)
    with tensors.external_folder(folder):
        with timer("analyse"):
            units = _analyse(model, source, rescale_clip, copy_shared_weights)
        _, report = _solved(units, p, q, tol, max_sweeps, solver, progress, timer, source)
    report = replace(
        report, seconds=dict(timer.seconds), rescale_clip=rescale_clip,
        weight_inputs_dropped=dropped,
    )  # fmt: skip
    _require_balanced(report, min_balanced, source)
    return report


def compare(
    first: ModelOrPath,
    second: ModelOrPath,
    *,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
) -> Comparison:
    """Whether two models compute the same function: the check :func:`balance` runs on its
    result, for any two models with the same inputs and outputs (an export against its
    simplified, converted or rebalanced version). ``first`` is the reference whose round-off
    sets the tolerance; the options are those of :func:`balance`.

    Returns:
        The :class:`Comparison` (``passed`` tells the verdict); nothing raises for different
        models.

    Raises:
        InputError: a model cannot be read or run, or the inputs do not fit ``first``.
    """
    from .verify import compare_models

    _check_seed(seed)
    with tensors.arrays_kept():
        for model in (first, second):
            if isinstance(model, str | os.PathLike):
                io.load_model(model)  # a one-line error for a missing or broken file
        feed = io.load_inputs(inputs) if isinstance(inputs, str | os.PathLike) else inputs
        return compare_models(
            first, second, inputs=feed, input_shapes=input_shapes, seed=seed, rtol=rtol, atol=atol
        )


NORM_EXPONENTS = (0.01, 100.0)
"""Range of p and q: outside it the norm's exponents (1/q, q/p) take ordinary weights out of
float64 (p = 0.001 raises each row's sum of |w|^p to the power q/p = 2000; q = 1e-300 divides
by zero)."""


def _check_options(
    p: float,
    q: float,
    tol: float,
    max_sweeps: int,
    seed: int | None = None,
    min_balanced: float = 0.0,
) -> None:
    low, high = NORM_EXPONENTS
    for name, value in (("p", p), ("q", q)):
        if not (isinstance(value, int | float) and np.isfinite(value) and value > 0):
            raise InputError(f"--{name} must be a positive number, got {value}")
        if not low <= value <= high:
            raise InputError(f"--{name} must be between {low:g} and {high:g}, got {value:g}")
    if seed is not None:
        _check_seed(seed)
    if not (np.isfinite(tol) and tol > 0):
        raise InputError(f"--tol must be a positive number, got {tol}")
    if max_sweeps < 1:
        raise InputError(f"--max-sweeps must be at least 1, got {max_sweeps}")
    if not (isinstance(min_balanced, int | float) and 0 <= min_balanced <= 1):
        raise InputError(f"--min-balanced must be a fraction in [0, 1], got {min_balanced}")


def _require_balanced(report: Report, min_balanced: float, source: str) -> None:
    """TooFewBalancedError (holding the report) when too small a part of the units moved."""
    if report.balanced_fraction >= min_balanced:
        return
    error = TooFewBalancedError(
        f"{source or 'model'}: {report.units_balanced} of {report.units_found} units found "
        f"balanced ({100 * report.balanced_fraction:.3g}%), less than --min-balanced "
        f"{min_balanced:g}; nothing is written"
    )
    error.report = report  # type: ignore[attr-defined]
    raise error


def _check_seed(seed: int) -> None:
    if not 0 <= seed < 2**64:
        raise InputError(f"--seed must be an integer from 0 to 2**64 - 1, got {seed}")


def _load(
    model_or_path: ModelOrPath, drop_weight_inputs: bool = False
) -> tuple[onnx.ModelProto, str, Path | None, tuple[str, ...]]:
    """(model, source name, folder its external data is relative to if loaded from a file, the
    weights removed from its graph inputs when ``drop_weight_inputs``). A caller's model is
    copied before any input is removed from it."""
    if isinstance(model_or_path, onnx.ModelProto):
        model, source, folder = model_or_path, "", None
        if drop_weight_inputs and protos.weight_inputs(model.graph):
            model = onnx.ModelProto()
            model.CopyFrom(model_or_path)
        tensors.keep_arrays(model)
    elif isinstance(model_or_path, str | os.PathLike):
        path = Path(model_or_path)
        model, source, folder = io.load_model(path), str(model_or_path), path.parent
    else:
        raise TypeError(
            f"expected an onnx.ModelProto or a path, got {type(model_or_path).__name__}"
        )
    dropped = protos.drop_weight_inputs(model) if drop_weight_inputs else ()
    return model, source, folder, dropped


def _analyse(
    model: onnx.ModelProto, source: str | None, rescale_clip: bool, copy_weights: bool
) -> ModelUnits:
    from .analysis import analyse

    try:
        units = analyse(model, rescale_clip=rescale_clip, copy_weights=copy_weights)
    except InputError as exc:  # a tensor that makes the model compute NaN, named by the analyser
        raise InputError(f"{source or 'model'}: {exc}") from None
    for layer in units.layers:
        if 0 in layer.weight.shape:
            raise InputError(
                f"{source or 'model'}: layer '{layer.name}' has an empty weight (shape "
                f"{tuple(layer.weight.shape)}): a zero-width layer is not a usable network"
            )
    _refuse_non_finite_offsets(model, units, source)
    return units


def _refuse_non_finite_offsets(model: onnx.ModelProto, units: ModelUnits, source: str) -> None:
    """A bias (or BatchNormalization parameter) that moves with its units and holds NaN or
    infinity makes the model compute NaN there whatever balancing does: refused by name, like
    such a weight (the solver names those). Weights are the edits with a column axis; the
    tensors are found where they are stored, in bodies too, or among the private copies."""
    from .overflow import stored_tensors

    stored = stored_tensors(model)
    stored.update((copy.name, copy.value) for copy in units.copies)
    copied_from = {copy.name: copy.source for copy in units.copies}  # users know the source
    edits = [e for layer in units.layers for e in layer.edits] + list(units.edits)
    for edit in edits:
        tensor = stored.get(edit.tensor)
        if edit.col_axis is not None or tensor is None:
            continue
        with np.errstate(invalid="ignore"):  # a signalling NaN is named, not warned about
            finite = np.isfinite(tensors.read_array(tensor))
        if not finite.all():
            first = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise InputError(
                f"{source or 'model'}: tensor {copied_from.get(edit.tensor, edit.tensor)!r} "
                f"holds NaN or infinity (at "
                f"{list(first)}): the model computes NaN or infinity there"
            )


def _solve(graph, p, q, tol, max_sweeps, solver, progress, source):
    from .solver import solve

    method = {"method": solver} if solver else {}
    try:
        return solve(graph, p, q, tol=tol, max_sweeps=max_sweeps, progress=progress, **method)
    except ValueError as exc:
        # The solver refuses NaN/Inf couplings and unknown methods; both are the user's to fix.
        raise InputError(f"{source or 'model'}: {exc}") from None


def _report(
    units: ModelUnits,
    graph: UnitGraph,
    result,
    p: float,
    q: float,
    tol: float,
    seconds: Mapping[str, float],
    source: str,
    layers_before: tuple[LayerStats, ...],
) -> Report:
    pinned = () if result is None else result.pinned
    fixed = fixed_entries(
        [(skip.node, skip.count, skip.reason) for skip in units.skipped]
        + [(_layer_of(pin.name), 1, pin.reason) for pin in pinned]
    )
    found = units.n_groups + sum(skip.count for skip in units.skipped)
    clips = dict(
        units_behind_clips=units.units_behind_clips,
        clips_replaced=tuple(clip.node for clip in units.clips),
    )
    copies = dict(
        copied_tensors=len(units.copies),
        bytes_added=sum(tensors.expected_nbytes(copy.value) for copy in units.copies),
    )
    if result is None:
        norm = _norm(graph, p, q)
        return Report(
            p=p, q=q, tol=tol, solver="none", norm_before=norm, norm_after=norm, sweeps=0,
            passes=0, converged=True, message="nothing to balance: no rescalable hidden units",
            units_found=found, units_balanced=0, units_fixed=fixed, history=(1.0,),
            seconds=dict(seconds), source=source, layers_before=layers_before, **clips, **copies,
        )  # fmt: skip
    before = result.norm_before
    history = tuple(h / before if before > 0 else 1.0 for h in result.history)
    return Report(
        p=p,
        q=q,
        tol=tol,
        solver=result.solver,
        norm_before=result.norm_before,
        norm_after=result.norm_after,
        sweeps=result.sweeps,
        passes=result.passes,
        converged=result.converged,
        message=result.message,
        units_found=found,
        units_balanced=units.n_groups - len(pinned),
        units_fixed=fixed,
        history=history,
        max_imbalance_before=result.imbalance_before,
        max_imbalance_after=result.imbalance_after,
        seconds=dict(seconds),
        source=source,
        layers_before=layers_before,
        layers_after=_weight_stats(units, result.log_scales),
        **clips,
        **copies,
    )


def _weight_stats(units: ModelUnits, log_scales: np.ndarray) -> tuple[LayerStats, ...]:
    """Per-layer weight-range statistics (rows = units) at these log-scales.

    The statistics depend only on each unit's largest magnitude, computed a block of rows at a
    time (:func:`onnxbalance.memory.row_max_abs`): no scaled copy of a weight is ever made.
    """
    from .memory import row_max_abs
    from .scaling import unit_log_scales

    return tuple(
        layer_stats(
            layer.name,
            row_max_abs(
                layer.weight,
                unit_log_scales(log_scales, layer.row_groups),
                unit_log_scales(log_scales, layer.col_groups),
            )[:, None],
        )
        for layer in units.layers
    )


def _norm(graph: UnitGraph, p: float, q: float) -> float:
    if not graph.layers:
        return 0.0
    from .solver.objective import Objective

    objective = Objective(graph, p, q)
    # One dummy entry: with no scale groups every unit is FIXED and never indexes it. In logs:
    # nothing is solved here, so nothing bounds ||W||^q, but the norm itself may well fit.
    return float(np.exp(objective.log_value(np.zeros(max(graph.n_groups, 1))) / q))


_INDEX_SUFFIX = re.compile(r"(\[\d+\]|[:#/]\d+)$")


def _layer_of(group_name: str) -> str:
    """The layer part of a scale group's name ("relu1[17]" or "relu1:17" -> "relu1")."""
    return _INDEX_SUFFIX.sub("", group_name) or group_name


class _Timer:
    """Times named stages in the order they run and announces each one."""

    def __init__(self, on_stage: Stage | None) -> None:
        self.seconds: dict[str, float] = {}
        self._on_stage = on_stage

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self._on_stage is not None:
            self._on_stage(stage)
        log.info("%s ...", stage)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
