"""Run the original and the balanced model on the same inputs and compare every output.

The only module that imports onnxruntime (lazily, inside :func:`run_model`).

Inputs (:func:`make_inputs`) are seeded random arrays built from each graph input's declared
dtype and shape, or the user's arrays. A dynamic leading dimension of an input of rank 2 or
more is a batch of :data:`BATCH`, every other dynamic dimension a sequence of the first of
:data:`SIZES` the input model runs on with some output moving with the weights (see
:attr:`Comparison.insensitive`); dimensions named alike share their size, and an unnamed
recurrent state [fixed, ?, fixed] takes the batch. When no batch dimension was chosen that
way, :data:`DRAWS` independent draws are run instead of one. Integer inputs that index a
Gather on a stored table are drawn from the table's rows.

The tolerance comes from the models themselves: each one runs a second time with every weight
perturbed by a random relative amount of at most the unit round-off of its dtype (seeded,
:func:`perturbed`), and per output the largest deviation of that run from the model's own is
its noise floor, the round-off any equivalent model may show in the precision it computes in;
the two models' floors add up. A floating output passes when, elementwise,

    |balanced - original| <= FACTOR * (noise_floor + eps * max|original|)

with ``eps`` the machine epsilon of the model's compute precision (float16 when any weight or
value is float16, whatever its graph outputs are), or ``|diff| <= rtol * |original| + atol``
when the caller gives ``rtol``/``atol``. Integer and boolean outputs (labels) must be equal. A
floating output that is all zero on the test inputs fails: it could not tell a broken model
from a correct one; so does one that is NaN or infinite everywhere. Non-finite values must
match, except where the input model overflows its dtype and the balanced one overflows nowhere
else (rescaling moves magnitudes between layers): the models are then run again in a wider
float type (float32 for float16, else float64), with the same rule, and the output says so.
The share of non-zero values after the original's Relu nodes tells how much of the hidden units
the inputs exercised. :func:`check_runs` runs a model alone (one with nothing to balance).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from . import floatbits, memory, protos, safewrite, tensors, upcast
from .errors import InputError
from .report import Comparison, OutputComparison

log = logging.getLogger(__name__)

_PROTOBUF_LIMIT = 2**31 - 1

__all__ = ["Comparison", "OutputComparison", "compare_models", "make_inputs"]

FACTOR = 5.0
"""How many noise floors a correct model may deviate by: correct balanced models were seen
up to about 2.5 (README, Verification)."""

BATCH, DRAWS = 8, 4
"""Default size of a dynamic batch; draws without a batch."""

SIZES = (16, 64, 256, 512)
"""Sizes tried in turn for the other dynamic dimensions, until the input model runs and its
outputs move with its weights: a network that halves an image side five times and doubles it
back needs 32 or more, an audio front end that pads by reflection more samples than its pad,
silero-vad its window of 512 samples (at 256 its outputs are constants)."""

SMALL_INTEGERS = 4
"""Integer inputs that index no stored table are drawn from [0, SMALL_INTEGERS)."""

_FIRST_VALUES = 4096
"""Values of a tensor looked at first for a fraction (:meth:`_Perturbation.moves`)."""

# machine epsilon: the spacing of floats at 1, twice the unit round-off
_EPSILON = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}
_FLOATS = frozenset({upcast.F16, upcast.BF16, upcast.F32, upcast.F64})
# ops that hand an index tensor on unchanged in value on the way to a Gather
_INDEX_CARRIERS = frozenset({"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten"})

ModelSource = onnx.ModelProto | str | os.PathLike


@dataclass(frozen=True)
class _Source:
    """A model to run: its graph (tensors possibly still in external files), and the file it
    came from, if any, which onnxruntime then opens itself (reading external data its way)."""

    proto: onnx.ModelProto
    path: Path | None
    folder: Path | None
    narrow: _Source | None = None
    """For a widened model with external data: the model it was widened from, whose external
    values its value-less stubs stand for, converted as they are staged (:func:`_run`)."""
    casts: bool = False
    """Weights that reach their readers through Cast nodes of the graph
    (:func:`onnxbalance.upcast.to_float32_by_casts`): onnxruntime must not fold those into
    float32 copies of the weights."""

    @classmethod
    def of(cls, model: ModelSource) -> _Source:
        if isinstance(model, onnx.ModelProto):
            return cls(model, None, tensors.current_folder())
        path = Path(model)
        return cls(onnx.load(path, load_external_data=False), path, path.parent)

    def widened(self, widen: Callable[..., onnx.ModelProto]) -> _Source:
        """This model through one of :mod:`onnxbalance.upcast`'s conversions; external
        weights are converted only when the model runs, a block at a time (:func:`_run`)."""
        if self.narrow is not None:  # the conversions are exact: convert the original at once
            return self.narrow.widened(widen)
        stored = sum(tensors.is_external(t) for t in tensors.iter_tensors(self.proto))
        weights = sum(tensors.is_external(t) for t in self.proto.graph.initializer)
        if not stored or stored != weights:  # external tensors elsewhere are rare: read in here
            with tensors.external_folder(self.folder):
                return _Source(widen(self.proto), None, self.folder)
        return _Source(widen(self.proto, read_external=False), None, self.folder, self)

    def in_float32(self) -> _Source:
        """A bfloat16 model as onnxruntime runs it: its stored weights kept, each converted by
        a Cast right before it is read (:func:`onnxbalance.upcast.to_float32_by_casts`), or, where
        that does not apply, :meth:`widened` to float32."""
        casted = upcast.to_float32_by_casts(self.proto)
        if casted is None:
            return self.widened(upcast.to_float32)
        return _Source(casted, None, self.folder, casts=True)


def compare_models(
    original: ModelSource,
    balanced: ModelSource,
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    scratch: str | os.PathLike | None = None,
) -> Comparison:
    """Run both models in onnxruntime, one after the other, and compare every output.

    Each model is a ModelProto or a path; from a path onnxruntime reads the file and its
    external data itself, so models over protobuf's 2 GB limit work, and each session is freed
    before the next one loads. Each also runs with its weights perturbed (:func:`perturbed`),
    which gives each output's noise floor; ``rtol``/``atol`` replace that rule by a fixed one
    (see the module docstring); the perturbed weights of a model with external data go to
    onnxruntime as arrays in memory. A bfloat16 model keeps its weights, widened by Cast nodes
    (:meth:`_Source.in_float32`); one whose weights cannot stay so is converted into a copy
    under ``scratch`` (default: the system's temporary folder) while it runs. The original's
    Relu outputs are watched on the way (``active_fraction``). bfloat16 models run as float32
    (onnxruntime has no bfloat16 CPU kernels; the conversion is exact, see
    :mod:`onnxbalance.upcast`) with bfloat16's round-off. Outputs that the input model
    overflows are judged again in a wider type (:func:`_compared_wider`). Dynamic dimensions
    the caller leaves open take the first of :data:`SIZES` at which the input model runs and
    the comparison is not :attr:`~Comparison.insensitive` (else the first it runs at).

    Raises:
        InputError: bad ``inputs``/``input_shapes``/``rtol``/``atol``, or onnxruntime refuses
            the original model or the inputs.
    """
    _check_tolerance(rtol, atol)
    first, second = _Source.of(original), _Source.of(balanced)
    as_dtype = None
    if upcast.uses(first.proto, upcast.BF16) or upcast.uses(second.proto, upcast.BF16):
        first, second = first.in_float32(), second.in_float32()
        as_dtype = "bfloat16"
    rule = _Rule(_compute_dtype(first.proto, as_dtype), rtol, atol)
    perturb = None if rule.fixed else functools.partial(_Perturbation, seed, as_dtype)
    watched, activations = _watching_activations(first)
    folder = Path(scratch) if scratch is not None else None
    runs = _input_runs(
        watched, lambda feeds: _run(watched, feeds, "the input model", scratch=folder),
        inputs=inputs, input_shapes=input_shapes, seed=seed,
    )  # fmt: skip
    pair = _Pair(first, second, watched, activations, rule, perturb, folder, seed)
    insensitive = None
    for feeds, reference in runs:
        comparison = _compared(pair, feeds, reference)
        if not comparison.insensitive:
            break
        if insensitive is None:
            insensitive = comparison
        log.info("no output moves with the weights at %s", comparison.input_shapes)
    else:
        comparison = insensitive
        log.warning(
            "verification: no output moved when the weights were perturbed, so the test "
            "inputs put no weight to the test; give inputs the model uses (--inputs, "
            "--input-shape)"
        )
    log.info(
        "verification %s: max abs diff %.3g, max rel diff %.3g",
        "passed" if comparison.passed else "FAILED",
        comparison.max_abs_diff,
        comparison.max_rel_diff,
    )
    return comparison


@dataclass(frozen=True)
class _Pair:
    """The two models of :func:`compare_models` and how to compare them."""

    first: _Source
    second: _Source
    watched: _Source  # the first, its Relu outputs made graph outputs
    activations: list[str]
    rule: _Rule
    perturb: Callable[[], _Perturbation] | None
    scratch: Path | None
    seed: int


def _compared(pair: _Pair, feeds: list[dict[str, np.ndarray]], reference) -> Comparison:
    """Both models compared on ``feeds``, the input model's outputs there being ``reference``
    (with the activations watched)."""
    reference, result, noisy = _run_pair(
        pair.watched, pair.second, feeds, pair.perturb, None, pair.scratch, reference
    )
    active = _active_fraction([reference.pop(name) for name in pair.activations])
    outputs = tuple(
        compare_output(name, reference[name], result[name], noisy.get(name), rule=pair.rule)
        for name in reference
    )
    # NaN or infinite inputs give non-finite outputs without any overflow
    finite_inputs = all(
        np.isfinite(value).all()
        for feed in feeds
        for value in feed.values()
        if np.issubdtype(value.dtype, np.inexact)
    )
    overflowed = [
        o
        for o in outputs
        if finite_inputs
        and not o.passed
        and (pair.rule.compute or o.dtype) != "float64"  # nothing wider to run it in
        and _overflowed(reference[o.name], result[o.name])
    ]
    if overflowed:
        again = _compared_wider(
            pair.first, pair.second, feeds, overflowed, pair.rule, pair.perturb, pair.scratch
        )
        outputs = tuple(again.get(o.name, o) for o in outputs)
    return Comparison(
        outputs=tuple(_per_draw(o, len(feeds)) for o in outputs),
        n_inputs=len(feeds) * _batch(feeds[0], graph_inputs(pair.first.proto)),
        seed=pair.seed,
        draws=len(feeds),
        input_shapes={name: tuple(value.shape) for name, value in feeds[0].items()},
        rule="fixed" if pair.rule.fixed else "noise_floor",
        active_fraction=active,
    )


def check_runs(
    model: ModelSource,
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> None:
    """Run ``model`` once on the first verification feed: a model with nothing to balance is
    copied, and must still be one onnxruntime can run (a Conv whose group does not divide its
    channels fails only then). Inputs that cannot be generated (strings, say) leave nothing
    to run it on: the model is then taken as it is.

    Raises:
        InputError: onnxruntime cannot load or run the model, or the caller's inputs or shapes
            do not fit it.
    """
    source = _Source.of(model)
    if upcast.uses(source.proto, upcast.BF16):
        source = source.in_float32()
    try:
        make_inputs(source.proto, inputs=inputs, input_shapes=input_shapes, seed=seed)
    except InputError as exc:
        if inputs is not None or input_shapes:
            raise
        log.info("the input model is not run: %s", exc)
        return
    runs = _input_runs(
        source, lambda feeds: _run(source, feeds[:1], "the input model"),
        inputs=inputs, input_shapes=input_shapes, seed=seed,
    )  # fmt: skip
    next(runs)


def _watching_activations(source: _Source) -> tuple[_Source, list[str]]:
    """``source`` with the outputs of its main graph's Relu nodes as extra graph outputs, and
    their names; unchanged (and no names) when its weights are in external files, which a
    changed graph could only reach through a staged copy of them."""
    graph = source.proto.graph
    outputs = {o.name for o in graph.output}
    names = [n.output[0] for n in graph.node if n.op_type == "Relu" and n.output[0] not in outputs]
    if not names or tensors.external_names(source.proto):
        return source, []
    watched = onnx.ModelProto()
    watched.CopyFrom(source.proto)
    watched.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    return replace(source, proto=watched, path=None), names


def _active_fraction(activations: Sequence[np.ndarray]) -> float | None:
    """The fraction of the hidden units' values that are non-zero after their Relu, over all
    test inputs (None when there is no Relu to watch)."""
    total = sum(a.size for a in activations)
    return sum(int(np.count_nonzero(a)) for a in activations) / total if total else None


def _check_tolerance(rtol: float | None, atol: float | None) -> None:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not (np.isfinite(value) and value >= 0):
            raise InputError(f"--{name} must be a non-negative number, got {value}")


@dataclass(frozen=True)
class _Rule:
    """How floating outputs are judged: the noise-floor rule in ``compute`` precision, or the
    caller's fixed ``rtol``/``atol`` when either is given."""

    compute: str | None = None
    rtol: float | None = None
    atol: float | None = None

    @property
    def fixed(self) -> bool:
        return self.rtol is not None or self.atol is not None

    def bounds(self, output_dtype: str, floor: float, scale: float) -> tuple[float, float]:
        """(rtol, atol) of ``|diff| <= rtol * |original| + atol`` for one output."""
        if self.fixed:
            return self.rtol or 0.0, self.atol or 0.0
        eps = _EPSILON.get(self.compute or output_dtype, _EPSILON["float64"])
        return 0.0, FACTOR * (floor + eps * scale)


def _compute_dtype(model: onnx.ModelProto, as_dtype: str | None) -> str | None:
    """The float type the model computes in, when narrower than its outputs may say: float16
    weights or values behind float32 inputs and outputs are float16 work."""
    if as_dtype:
        return as_dtype
    return "float16" if upcast.uses(model, upcast.F16) else None


class _Perturbation:
    """Weights moved by a seeded random relative amount of at most the unit round-off of their
    dtype (``as_dtype``'s when the model was widened): the rounding a rescaled weight undergoes.

    Only weights move: floating tensors of two elements or more that are not all whole numbers.
    Scalars and whole-number tensors are structure (a mask's 1.0, a Resize's scales, -inf
    fills), where one unit in the last place can change a shape or cancel a mask. Values that
    would leave the dtype's range stay as they are. Values are moved a block of rows at a
    time, so a weight of any size needs no float64 copy (nor any copy, when it is streamed).
    Stored float16 and bfloat16 weights step to a neighbour with the probabilities that
    rounding ``v * (1 + delta)`` gives (:func:`onnxbalance.floatbits.moved_by_round_off`, 16
    random bits a weight), the same distribution at a quarter of the float arithmetic's cost.
    """

    def __init__(self, seed: int, as_dtype: str | None = None) -> None:
        self.rng = np.random.default_rng([seed, 1])
        self.as_dtype = as_dtype

    @staticmethod
    def moves(tensor: onnx.TensorProto, base_dir: Path | None = None) -> bool:
        if tensor.data_type not in _FLOATS or tensors.element_count(tensor) < 2:
            return False
        values = tensors.read_array(tensor, base_dir).reshape(-1)
        try:
            # a trained weight shows a fraction in its first values: a megabyte is read only
            # from tensors whose first values are all whole numbers
            probe = slice(0, _FIRST_VALUES)
            for rows in itertools.chain([probe], memory.row_blocks(values.size, values.itemsize)):
                block = values[rows]
                finite = block[np.isfinite(block)]
                if not np.array_equal(finite, np.round(finite)):
                    return True
            return False
        finally:
            memory.release(values)

    def move(self, block: np.ndarray) -> np.ndarray:
        """``block`` of a weight that :meth:`moves`, moved (the next random draws)."""
        if block.dtype.itemsize == 2 and self.as_dtype in (None, block.dtype.name):  # 16-bit
            words = self.rng.bit_generator.random_raw(-(-block.size // 4))
            draws = words.view(np.uint16)[: block.size].reshape(block.shape)
            return floatbits.moved_by_round_off(block, draws)
        unit_round_off = _EPSILON[self.as_dtype or block.dtype.name] / 2
        # v + v * delta rounds to what v * (1 + delta) does: float32 holds v * delta to a
        # relative 2^-24, far below the rounding of the sum, at half float64's traffic
        work = np.dtype(np.float32 if block.dtype.itemsize <= 4 else np.float64)
        delta = self.rng.random(block.shape, dtype=work)
        delta *= 2 * unit_round_off
        delta -= unit_round_off
        moved = block.astype(work)
        with np.errstate(over="ignore", invalid="ignore"):
            delta *= moved
            moved += delta
            moved = moved.astype(block.dtype, copy=False)
        lost = ~np.isfinite(moved)
        if lost.any():  # out of the dtype's range: the value stays
            moved = np.where(lost & np.isfinite(block), block, moved)
        return moved

    def tensor(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """``tensor`` moved, inline (itself when it is no weight)."""
        if not self.moves(tensor):
            return tensor
        fresh = tensors.make_tensor(
            tensor.name, _joined(*_converted_blocks(tensor, None, None, self)), tensor.data_type
        )
        fresh.doc_string = tensor.doc_string
        return fresh


def perturbed(model: onnx.ModelProto, *, seed: int, as_dtype: str | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with its weights perturbed (:class:`_Perturbation`), all inline."""
    return protos.map_tensors(model, _Perturbation(seed, as_dtype).tensor)


def _converted_blocks(
    tensor: onnx.TensorProto,
    base_dir: Path | None,
    dtype: np.dtype | None,
    perturbation: _Perturbation | None,
) -> tuple[tuple[int, ...], Iterator[np.ndarray]]:
    """``tensor``'s values as (shape, blocks of rows), converted to ``dtype`` (None: its own)
    and then moved by ``perturbation`` (None: not moved), about a megabyte at a time."""
    values = tensors.read_array(tensor, base_dir)
    dtype = np.dtype(dtype or values.dtype)
    row_bytes = max(dtype.itemsize, 4) * int(np.prod(values.shape[1:], dtype=np.int64))

    def blocks() -> Iterator[np.ndarray]:
        for rows in memory.row_blocks(values.shape[0], row_bytes):
            with np.errstate(invalid="ignore"):  # a signalling NaN becomes a quiet one
                block = values[rows].astype(dtype, copy=False)
            yield perturbation.move(block) if perturbation is not None else block
            # the rows read so far leave the resident set: a weight held in memory for
            # onnxruntime then takes its own bytes, not twice them
            memory.release(values)

    return values.shape, blocks()


def _joined(
    shape: tuple[int, ...], blocks: Iterator[np.ndarray], spare: np.ndarray | None = None
) -> np.ndarray:
    """The blocks of rows of :func:`_converted_blocks` as one array of ``shape``, each copied
    into place as it comes (never a list of them and their concatenation at once); into
    ``spare`` when it has that shape and the blocks' dtype."""
    joined, start = None, 0
    for block in blocks:
        if joined is None:
            fits = spare is not None and (spare.shape, spare.dtype) == (shape, block.dtype)
            joined = spare if fits else memory.empty_populated(shape, block.dtype)
        joined[start : start + len(block)] = block
        start += len(block)
    return joined


def _run(
    source: _Source,
    feeds: Sequence[Mapping[str, np.ndarray]],
    what: str,
    perturbation: _Perturbation | None = None,
    scratch: Path | None = None,
    spare: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """:func:`run_all` on ``source``, with its weights moved by ``perturbation`` if given.

    Moved weights of a model with external data go to onnxruntime as arrays in memory, which
    it uses in place of the stored ones; the others it reads from their files as usual. The
    arrays are taken from ``spare`` where they fit, and left there afterwards. Weights
    in external files that are converted (a widened model, :meth:`_Source.widened`) are
    streamed a block at a time into a temporary copy of the model under ``scratch`` (the
    system's temporary folder when None), which onnxruntime then opens."""
    origin = source.narrow or source
    external = tensors.external_names(origin.proto)
    if perturbation is None and source.narrow is None:
        return run_all(source, feeds, what)
    if not external:
        moved = protos.map_tensors(source.proto, perturbation.tensor)
        return run_all(replace(source, proto=moved, path=None), feeds, what)
    stored = {t.name: t for t in origin.proto.graph.initializer if t.name in external}
    streamed = {}
    for tensor in source.proto.graph.initializer:
        if tensor.name not in stored:
            continue
        moves = perturbation is not None and perturbation.moves(stored[tensor.name], origin.folder)
        if moves or tensor.data_type != stored[tensor.name].data_type:
            streamed[tensor.name] = functools.partial(
                _converted_blocks, stored[tensor.name], origin.folder,
                tensors.numpy_dtype(tensor.data_type), perturbation if moves else None,
            )  # fmt: skip
    with tensors.external_folder(origin.folder):
        # inline weights take the first draws, the external ones the next, in stored order
        rest = protos.map_tensors(
            source.proto,
            lambda t: t if t.name in streamed or perturbation is None else perturbation.tensor(t),
        )
    # the moved weights keep their stored references: onnxruntime checks every initializer's
    # data against its shape before it takes the held values instead
    if source.narrow is None:
        spare = {} if spare is None else spare
        held = {
            name: _joined(*blocks(), spare.pop(name, None)) for name, blocks in streamed.items()
        }
        outputs = run_all(replace(source, proto=rest, path=None), feeds, what, held)
        spare.update(held)
        return outputs
    with tempfile.TemporaryDirectory(prefix="onnxbalance-verify-", dir=scratch) as folder:
        with safewrite.stage_model(
            rest, Path(folder) / "model.onnx", base_dir=origin.folder, external=external,
            generated=streamed, durable=False,
        ) as staged:  # fmt: skip
            return run_all(_Source.of(staged.model_path), feeds, what)


def _batch(feed: Mapping[str, np.ndarray], declared: Mapping[str, onnx.ValueInfoProto]) -> int:
    """Samples in one draw: the leading dimension the inputs of rank 2 or more share whose
    leading dimension the model does not fix, else 1."""
    leading = {
        value.shape[0]
        for name, value in feed.items()
        if value.ndim >= 2 and _dims(declared[name])[:1] in ([], [None])
    }
    return leading.pop() if len(leading) == 1 else 1


def _overflowed(reference: np.ndarray, result: np.ndarray) -> bool:
    """Whether the input model's output is non-finite somewhere and the balanced model's only
    where the input's is: the input model may have overflowed inside where the balanced one did
    not, or both may have, leaving too few finite values to compare."""
    if reference.shape != result.shape or not np.issubdtype(reference.dtype, np.inexact):
        return False
    lost, got = ~np.isfinite(reference), ~np.isfinite(result)
    return bool(lost.any() and not (got & ~lost).any())


def _compared_wider(
    first: _Source,
    second: _Source,
    feeds: Sequence[Mapping[str, np.ndarray]],
    failed: Sequence[OutputComparison],
    rule: _Rule,
    perturb: Callable[[], _Perturbation] | None = None,
    scratch: str | os.PathLike | None = None,
) -> dict[str, OutputComparison]:
    """The ``failed`` outputs compared again with the models (``perturb``: see
    :func:`_run_pair`) and the inputs in a wider float type
    (:func:`onnxbalance.upcast.wider_type`), with the round-off of each output's own dtype.

    The input model overflowed its dtype on the test inputs: the balanced one may not have
    (rescaling moves magnitudes between layers, and may well take a hidden layer back into
    range), or both may have everywhere. In the wider type neither overflows, so the two
    functions can still be compared. If onnxruntime cannot run the widened models (its Conv
    kernels, for one, exist for float32 only), the failures stand, saying why.
    """
    wide = upcast.wider_type(first.proto)
    dtype = tensors.numpy_dtype(wide)
    wide_feeds = [
        {
            name: value.astype(dtype)
            if np.issubdtype(value.dtype, np.floating) and value.dtype.itemsize < dtype.itemsize
            else value
            for name, value in feed.items()
        }
        for feed in feeds
    ]
    convert = functools.partial(upcast.widen, wide=wide)
    try:
        reference, result, noisy = _run_pair(first, second, wide_feeds, perturb, convert, scratch)
    except InputError as exc:
        log.info("verification in %s impossible: %s", dtype.name, exc)
        return {
            o.name: replace(
                o,
                reason=f"{o.reason}: the input model overflows {rule.compute or o.dtype} on the "
                f"test inputs, and onnxruntime cannot run the models in {dtype.name} to compare",
            )
            for o in failed
        }
    compared = {}
    for failure in failed:
        name, own = failure.name, rule.compute or failure.dtype
        again = compare_output(
            name,
            reference[name],
            result[name],
            noisy.get(name),
            rule=replace(rule, compute=own),
        )
        how = f"the input model overflows {own} on the test inputs: compared in {dtype.name}"
        compared[name] = replace(
            again, dtype=failure.dtype, reason=how + (f", {again.reason}" if again.reason else "")
        )
        log.info("verification of output %r: %s", name, compared[name].reason)
    return compared


def _run_pair(
    first: _Source,
    second: _Source,
    feeds: Sequence[Mapping[str, np.ndarray]],
    perturb: Callable[[], _Perturbation] | None,
    convert: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None,
    scratch: str | os.PathLike | None = None,
    reference: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, tuple[Any, Any]]]:
    """Both models' outputs on ``feeds`` (each through ``convert`` first, if given), and per
    output the pair of outputs of both models with their weights perturbed (each with the same
    draws, a fresh ``perturb()``; none without it): each model's own round-off, since an
    equivalent model may well be worse conditioned than the original (units scaled up whose
    contributions then cancel). ``reference``: the first model's outputs, when already run.
    One onnxruntime session is alive at a time."""
    if convert:
        first, second = first.widened(convert), second.widened(convert)
    folder = Path(scratch) if scratch is not None else None
    if reference is None:
        reference = _run(first, feeds, "the input model", scratch=folder)
    result = _run(second, feeds, "the balanced model", scratch=folder)
    if perturb is None:
        return reference, result, {}
    # the input model's perturbed weights, once its session is gone, take the balanced one's
    # (the same tensors, mostly): fresh pages for a gigabyte cost a second or more
    spare: dict[str, np.ndarray] = {}
    noisy_first = _run(first, feeds, "the input model", perturb(), folder, spare)
    noisy_second = _run(second, feeds, "the balanced model", perturb(), folder, spare)
    return reference, result, {n: (noisy_first[n], noisy_second.get(n)) for n in result}


def make_inputs(
    model: onnx.ModelProto,
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    size: int = SIZES[0],
) -> list[dict[str, np.ndarray]]:
    """The feeds to run: the user's ``inputs`` if given, else seeded random draws.

    Dynamic dimensions: :data:`BATCH` for the leading one of an input of rank 2 or more,
    ``size`` for the others; dimensions of the same name (ONNX's ``dim_param``) take one size,
    a given one if ``input_shapes`` fixes it somewhere, else :data:`BATCH` if it leads an input
    of rank 2 or more; an input laid out as a recurrent state, [fixed, ?, fixed] with that
    dimension unnamed, takes the batch of the other inputs there (``input_shapes`` overrides
    all of it). One draw when a batch was chosen so, else :data:`DRAWS`. Random floats are
    standard normal, integers uniform in the rows of the stored table they index through a
    Gather (:func:`index_bounds`), else in [0, SMALL_INTEGERS), booleans fair coin flips.

    Raises:
        InputError: an input is not fed or unknown, a shape has the wrong rank or a
            non-positive dimension, or an input's dtype cannot be generated.
    """
    declared = graph_inputs(model)
    input_shapes = dict(input_shapes or {})
    unknown = sorted(set(input_shapes) - set(declared))
    if unknown:
        raise InputError(
            f"--input-shape names {', '.join(unknown)}, not inputs of the model "
            f"(inputs: {', '.join(declared) or 'none'})"
        )
    if inputs is not None:
        return [_check_fed(declared, inputs)]
    typed = _input_types(declared, input_shapes, size)
    batched = any(
        name not in input_shapes
        and _dims(value)[:1] == [None]
        and len(_dims(value)) >= 2
        and typed[name][1][0] == BATCH
        for name, value in declared.items()
    )
    bounds = index_bounds(model)
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(1 if batched else DRAWS):
        feed = {}
        for name, (dtype, shape) in typed.items():
            if np.issubdtype(dtype, np.floating):
                feed[name] = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_:
                feed[name] = rng.integers(0, 2, size=shape).astype(np.bool_)
            elif np.issubdtype(dtype, np.integer):
                high = bounds.get(name, SMALL_INTEGERS)
                feed[name] = rng.integers(0, high, size=shape).astype(dtype)
            else:
                raise InputError(
                    f"input {name!r} has dtype {dtype}, which cannot be generated; "
                    "give arrays with --inputs FILE.npz"
                )
        feeds.append(feed)
    return feeds


def _input_runs(
    source: _Source,
    run: Callable[[list[dict[str, np.ndarray]]], dict[str, np.ndarray]],
    *,
    inputs: Mapping[str, np.ndarray] | None,
    input_shapes: Mapping[str, Sequence[int]] | None,
    seed: int,
) -> Iterator[tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]]:
    """The feeds of each size of :func:`sizes_to_try` that the input model runs on (``run``),
    with its outputs there, smallest first.

    Raises:
        InputError: the feeds cannot be made, or onnxruntime cannot load the model or run it
            at any of the sizes (the last one's message).
    """
    sizes = sizes_to_try(source.proto, inputs=inputs, input_shapes=input_shapes)
    ran = False
    for size in sizes:
        feeds = make_inputs(
            source.proto, inputs=inputs, input_shapes=input_shapes, seed=seed, size=size
        )
        try:
            outputs = run(feeds)
        except _RunFailed as exc:
            if len(sizes) == 1:
                raise
            failure = exc
            log.info("the input model does not run at dynamic size %d: %s", size, exc.message)
            continue
        ran = True
        yield feeds, outputs
    if not ran:
        tried = ", ".join(map(str, sizes[:-1])) + f" or {sizes[-1]}"
        raise InputError(
            f"onnxruntime cannot run {failure.what} on test inputs whose dynamic dimensions are "
            f"{tried} (give sizes it runs on with --input-shape): {failure.message}"
        )


def sizes_to_try(
    model: onnx.ModelProto,
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> tuple[int, ...]:
    """The ``size`` values of :func:`make_inputs` worth trying in turn: all of :data:`SIZES`
    when it chooses some dimension by ``size``, else the first alone."""
    if inputs is not None:
        return SIZES[:1]
    declared = graph_inputs(model)
    shapes = dict(input_shapes or {})
    try:
        sized = _input_types(declared, shapes, SIZES[0]) != _input_types(declared, shapes, 1)
    except InputError:  # make_inputs says what is wrong
        return SIZES[:1]
    return SIZES if sized else SIZES[:1]


def _input_types(
    declared: Mapping[str, onnx.ValueInfoProto],
    input_shapes: Mapping[str, Sequence[int]],
    size: int,
) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Each input's dtype and the shape to feed it in (see :func:`make_inputs`)."""
    named: dict[str, int] = {}
    for name, value in declared.items():
        given = input_shapes.get(name)
        if given is not None and len(given) == len(_dim_names(value)):
            pairs = zip(_dim_names(value), given, strict=True)
            named.update((dim, int(d)) for dim, d in pairs if dim and int(d) > 0)
    for name, value in declared.items():
        leading = _dim_names(value)[:1]
        if name not in input_shapes and len(_dims(value)) >= 2 and leading[0]:
            named.setdefault(leading[0], BATCH)
    typed = {
        name: _dtype_and_shape(name, value, input_shapes.get(name), named, size)
        for name, value in declared.items()
    }
    # the batch: what the first input of rank 2 or more with a dynamic leading dimension got
    batches = (typed[name][1][0] for name, value in declared.items()
               if len(_dims(value)) >= 2 and _dims(value)[0] is None)  # fmt: skip
    batch = next(batches, None)
    for name, value in declared.items():
        state = name not in input_shapes and _recurrent_state(_dims(value), _dim_names(value))
        if state and batch is not None:
            dtype, (directions, _, hidden) = typed[name]
            typed[name] = dtype, (directions, batch, hidden)
    return typed


def _recurrent_state(dims: Sequence[int | None], names: Sequence[str]) -> bool:
    """Whether an input is laid out as ONNX's recurrent states are, [directions or layers,
    batch, hidden], with nothing but its batch dynamic, and that unnamed (silero-vad's
    ``state [2, ?, 128]`` beside ``input [?, ?]``; a named batch shares its name's size)."""
    return len(dims) == 3 and dims[1] is None and not names[1] and None not in (dims[0], dims[2])


def index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """Integer graph inputs that index a Gather on a stored table (possibly through Cast,
    Reshape and the like): the number of rows every such table has along the gathered axis."""
    graph = model.graph
    tables = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tables[node.output[0]] = tuple(node.attribute[0].t.dims)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    bounds = {}
    for name in graph_inputs(model):
        rows, frontier, seen = [], [name], set()
        while frontier:
            value = frontier.pop()
            seen.add(value)
            for node in readers.get(value, []):
                if node.op_type in _INDEX_CARRIERS and node.input[0] == value:
                    frontier.extend(o for o in node.output if o not in seen)
                elif node.op_type == "Gather" and node.input[1:2] == [value]:
                    shape = tables.get(node.input[0])
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    if shape and -len(shape) <= axis < len(shape) and shape[axis] > 0:
                        rows.append(shape[axis])
        if rows:
            bounds[name] = min(rows)
    return bounds


def graph_inputs(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """The inputs a caller must feed: graph inputs that are not initializers (old IR lists both)."""
    weights = set(protos.weight_inputs(model.graph))
    return {v.name: v for v in model.graph.input if v.name not in weights}


def run_model(
    model: ModelSource | _Source, feed: Mapping[str, np.ndarray], what: str
) -> dict[str, np.ndarray]:
    """All outputs of ``model`` on ``feed``, as arrays keyed by output name.

    Raises:
        InputError: onnxruntime cannot load or run the model.
    """
    return _run_sessions(model, [feed], what)[0]


def run_all(
    model: ModelSource | _Source,
    feeds: Sequence[Mapping[str, np.ndarray]],
    what: str,
    held: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """All outputs of ``model`` on every feed, one session for all: each output's values from
    several feeds stacked along a new leading axis (flattened and joined if their shapes
    differ, see :func:`_per_draw`), from one feed as they are. ``held``: values of main-graph
    initializers that replace the stored ones."""
    runs = _run_sessions(model, feeds, what, held or {})
    if len(runs) == 1:
        return runs[0]
    joined = {}
    for name in runs[0]:
        values = [run[name] for run in runs]
        same = len({v.shape for v in values}) == 1
        joined[name] = np.stack(values) if same else np.concatenate([v.ravel() for v in values])
    return joined


def _per_draw(output: OutputComparison, draws: int) -> OutputComparison:
    """``output`` with the shape of one draw's output (see :func:`run_all`)."""
    return replace(output, shape=output.shape[1:]) if draws > 1 else output


def _run_sessions(
    model: ModelSource | _Source,
    feeds: Sequence[Mapping[str, np.ndarray]],
    what: str,
    held: Mapping[str, np.ndarray] | None = None,
) -> list[dict[str, np.ndarray]]:
    source = model if isinstance(model, _Source) else _Source.of(model)
    fold = not source.casts
    if source.path is not None and not held:
        return _run_session(str(source.path), feeds, what, fold=fold)
    external = tensors.external_names(source.proto)
    if source.proto.ByteSize() < _PROTOBUF_LIMIT and (source.folder is not None or not external):
        folder = source.folder if external else None
        serialised = source.proto.SerializeToString()
        return _run_session(serialised, feeds, what, folder, held, fold=fold)
    # too big for one message (or references no folder resolves, refused naming the tensor)
    generated = {name: functools.partial(_as_blocks, value) for name, value in (held or {}).items()}
    with tempfile.TemporaryDirectory(prefix="onnxbalance-verify-") as folder:
        with safewrite.stage_model(
            source.proto, Path(folder) / "model.onnx", base_dir=source.folder, generated=generated
        ) as staged:
            return _run_session(str(staged.model_path), feeds, what, fold=fold)


def _as_blocks(value: np.ndarray) -> tuple[tuple[int, ...], list[np.ndarray]]:
    """``value`` as :data:`onnxbalance.safewrite.Blocks` produce it."""
    return value.shape, [value]


_SILENT = 4  # onnxruntime's "fatal" severity: its own error lines never reach the terminal


def _run_session(
    model: bytes | str,
    feeds: Sequence[Mapping[str, np.ndarray]],
    what: str,
    folder: Path | None = None,
    held: Mapping[str, np.ndarray] | None = None,
    fold: bool = True,
) -> list[dict[str, np.ndarray]]:
    """``model`` (a file, or serialised with its external references relative to ``folder``)
    run on every feed; ``held`` replaces stored initializers, used in place, never copied.
    ``fold``: let onnxruntime fold constants (not when the graph's own Casts widen weights:
    folded, each would become a float32 copy held for the session's life)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(_SILENT)
    options = ort.SessionOptions()
    options.log_severity_level = _SILENT
    # Basic optimisations only: fusions could differ between the two graphs and blur the check.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    # No packed copies of the weights: verification runs once, and memory matters more.
    options.add_session_config_entry("session.disable_prepacking", "1")
    # A float16 weight reaches onnxruntime's float32 kernels through a Cast it inserts and runs
    # on every inference; in the default order all those Casts run first, holding float32
    # copies of every weight at once (twice the weight bytes), while the priority order runs
    # each just before its reader. The memory pattern, planned after the first run, would set
    # aside room for one more of them.
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.enable_mem_pattern = False
    if folder is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(folder.resolve())
        )
    # onnxruntime keeps pointers into these, not references: they must outlive the session
    given = {name: _ort_value(ort, value) for name, value in (held or {}).items()}
    for name, value in given.items():
        options.add_initializer(name, value)
    unfolded = {} if fold else {"disabled_optimizers": ["ConstantFolding"]}
    session = None
    try:
        session = ort.InferenceSession(
            model, options, providers=["CPUExecutionProvider"], **unfolded
        )
    except Exception as exc:  # onnxruntime raises its own untyped exception classes
        raise InputError(f"onnxruntime cannot run {what}: {_first_line(exc)}") from None
    try:
        names = [o.name for o in session.get_outputs()]
        types = [o.type for o in session.get_outputs()]
        runs = [session.run(names, dict(feed)) for feed in feeds]
    except Exception as exc:
        raise _RunFailed(what, _first_line(exc)) from None
    finally:
        session = None  # free the session's buffers before the next model is loaded
    return [
        {name: _to_array(value, kind) for name, value, kind in zip(names, row, types, strict=True)}
        for row in runs
    ]


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class _RunFailed(InputError):
    """onnxruntime loaded a model but could not run it on the feeds."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(f"onnxruntime cannot run {what}: {message}")
        self.what, self.message = what, message


def _ort_value(ort, value: np.ndarray):
    """An OrtValue over ``value``'s memory (onnxruntime's numpy bridge knows no bfloat16: its
    bits go as 16-bit integers, declared bfloat16)."""
    if value.dtype == tensors.numpy_dtype(upcast.BF16):
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(value.view(np.uint16), upcast.BF16)
    return ort.OrtValue.ortvalue_from_numpy(value)


def compare_output(
    name: str,
    reference: np.ndarray,
    result: np.ndarray,
    noisy: tuple[np.ndarray | None, np.ndarray | None] | None = None,
    *,
    rule: _Rule | None = None,
) -> OutputComparison:
    """Compare one output; see the module docstring for the rule. ``noisy`` holds this output
    of both models with their weights perturbed (none: a noise floor of 0)."""
    rule = rule or _Rule()
    dtype = reference.dtype
    shape = tuple(int(d) for d in reference.shape)

    def record(abs_diff, rel_diff, passed, reason="", rtol=0.0, atol=0.0, floor=0.0, ratio=0.0):
        return OutputComparison(
            name, dtype.name, shape, abs_diff, rel_diff, rtol, atol, passed, reason, floor, ratio
        )

    if result.shape != reference.shape:
        return record(np.inf, np.inf, False, f"shape {result.shape} != {reference.shape}")
    if not np.issubdtype(dtype, np.inexact):
        if dtype.kind in "OUS":
            equal = np.array_equal(reference, result)
            return record(
                0.0 if equal else np.inf,
                0.0 if equal else np.inf,
                equal,
                "" if equal else "values differ",
                ratio=0.0 if equal else np.inf,
            )
        differ = int(np.count_nonzero(reference != result))
        diff = np.abs(reference.astype(np.float64) - result.astype(np.float64))
        abs_diff = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(reference.astype(np.float64)).max()) if reference.size else 0.0
        rel = abs_diff / scale if scale > 0 else (0.0 if abs_diff == 0 else np.inf)
        reason = f"{differ} of {reference.size} values differ" if differ else ""
        return record(abs_diff, rel, differ == 0, reason, ratio=np.inf if differ else 0.0)

    ref = reference.astype(np.float64)
    res = result.astype(np.float64)
    finite = np.isfinite(ref)
    same_nonfinite = np.array_equal(ref[~finite], res[~finite], equal_nan=True)
    if not np.all(np.isfinite(res[finite])) or not same_nonfinite:
        return record(np.inf, np.inf, False, "non-finite values differ", ratio=np.inf)
    if reference.size and not finite.any():
        return record(0.0, 0.0, False, "output is NaN or infinite everywhere on the test inputs")
    floor = sum(
        _noise_floor(ours, moved)
        for ours, moved in zip((ref, res), noisy or (None, None), strict=True)
    )
    ref, res = ref[finite], res[finite]
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    diff = np.abs(ref - res)
    abs_diff = float(diff.max()) if diff.size else 0.0
    rtol, atol = rule.bounds(dtype.name, floor, scale)
    if scale == 0.0:
        return record(
            abs_diff,
            0.0 if abs_diff == 0 else np.inf,
            False,
            "output is all zero on the test inputs, so the check cannot fail",
            rtol,
            atol,
            floor,
        )
    bound = rtol * np.abs(ref) + atol
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(diff > 0, diff / bound, 0.0)
    ratio = float(ratios.max()) if ratios.size else 0.0
    bad = int(np.count_nonzero(diff > bound))
    reason = f"{bad} of {ref.size} values outside tolerance" if bad else ""
    return record(abs_diff, abs_diff / scale, bad == 0, reason, rtol, atol, floor, ratio)


def _noise_floor(output: np.ndarray, moved: np.ndarray | None) -> float:
    """The largest deviation of a model's output with its weights perturbed from its output
    where both are finite (0 without that run, or when its output took another shape)."""
    if moved is None or moved.shape != output.shape:
        return 0.0
    noisy = moved.astype(np.float64)
    both = np.isfinite(output) & np.isfinite(noisy)
    return float(np.abs(output[both] - noisy[both]).max()) if both.any() else 0.0


def _check_fed(
    declared: Mapping[str, onnx.ValueInfoProto], inputs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    missing = sorted(set(declared) - set(inputs))
    extra = sorted(set(inputs) - set(declared))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"not model inputs: {', '.join(extra)}")
        raise InputError(f"--inputs arrays do not match the model's inputs ({'; '.join(parts)})")
    feed = {}
    for name, value in declared.items():
        array = np.asarray(inputs[name])
        dtype, _ = _dtype_and_shape(name, value, array.shape)
        if array.dtype != dtype:
            raise InputError(
                f"--inputs array {name!r} has dtype {array.dtype}, the model expects {dtype}"
            )
        feed[name] = array
    return feed


def _dtype_and_shape(
    name: str,
    value: onnx.ValueInfoProto,
    override: Sequence[int] | None,
    named: Mapping[str, int] | None = None,
    size: int = SIZES[0],
) -> tuple[np.dtype, tuple[int, ...]]:
    if not value.type.HasField("tensor_type"):
        raise InputError(f"input {name!r} is not a tensor; give arrays with --inputs FILE.npz")
    tensor_type = value.type.tensor_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    except (KeyError, TypeError, ValueError):
        raise InputError(
            f"input {name!r} has an element type numpy cannot hold; give arrays with --inputs"
        ) from None
    declared = _dims(value) if tensor_type.HasField("shape") else None
    if override is not None:
        shape = tuple(int(d) for d in override)
        if declared is not None and len(shape) != len(declared):
            raise InputError(
                f"input {name!r} has rank {len(declared)}, but {len(shape)} dimensions were given"
            )
        if any(d <= 0 for d in shape):
            raise InputError(f"input {name!r}: dimensions must be positive, got {shape}")
        for given, fixed in zip(shape, declared or [], strict=False):
            if fixed is not None and fixed > 0 and given != fixed:
                raise InputError(
                    f"input {name!r}: dimension {given} given where the model fixes {fixed}"
                )
        return dtype, shape
    if declared is None:
        raise InputError(f"input {name!r} has no declared shape; give it with --input-shape")
    named = named or {}
    return dtype, tuple(
        d or named.get(dim) or (BATCH if i == 0 and len(declared) >= 2 else size)
        for i, (d, dim) in enumerate(zip(declared, _dim_names(value), strict=True))
    )


def _dim_names(value: onnx.ValueInfoProto) -> list[str]:
    """The name of each dynamic dimension ('' where fixed or unnamed)."""
    return [d.dim_param if dim is None else "" for d, dim in
            zip(value.type.tensor_type.shape.dim, _dims(value), strict=True)]  # fmt: skip


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    """The declared dimensions, None where dynamic (no shape: none)."""
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in tensor_type.shape.dim]  # fmt: skip


_ORT_ELEMENT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
                      "tensor(float16)": np.float16}  # fmt: skip


def _to_array(value: Any, kind: str = "") -> np.ndarray:
    """onnxruntime returns arrays, but sequences of maps (ZipMap) as lists of Python dicts.

    Their values come back as Python floats; the declared element type (``kind`` is e.g.
    ``seq(map(int64,tensor(float)))``) says which tolerance applies.
    """
    if isinstance(value, np.ndarray):
        # onnxruntime's array may view memory of its session, which then lives on with all of
        # its buffers (a float16 model's float32 copies of every weight): an output is small
        return value.copy() if value.base is not None else value
    dtype = next((t for name, t in _ORT_ELEMENT_TYPES.items() if name in kind), None)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        keys = sorted(value[0])
        return np.array([[row[k] for k in keys] for row in value], dtype=dtype)
    return np.asarray(value, dtype=dtype)
