"""Run the original and the balanced model on the same inputs and compare every output.

The only module that imports onnxruntime (lazily, inside :func:`run_model`).

Inputs are seeded random arrays built from each graph input's declared dtype and shape
(dynamic dimensions: 1, or the user's ``input_shapes``), or the user's arrays. Floating outputs
pass when, elementwise,

    |balanced - reference| <= rtol * |reference| + atol,    atol = atol_scale * max|reference|

with (rtol, atol_scale) chosen by dtype (float32: 1e-5, 1e-5): tolerances relative to the
output's magnitude, because rescaling by exact powers would be exact and the only differences
are rounding. Integer and boolean outputs (labels) must be equal. A floating output that is all
zero on the test inputs fails: it could not tell a broken model from a correct one; so does one
that is NaN or infinite everywhere. Non-finite values must match, except where the input model
overflows its dtype and the balanced one overflows nowhere else (rescaling moves magnitudes
between layers): both are then run again in a wider float type (float32 for float16, else
float64), with the same tolerances, and the output says so.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from . import safewrite, tensors, upcast
from .errors import InputError
from .report import Comparison, OutputComparison

log = logging.getLogger(__name__)

_PROTOBUF_LIMIT = 2**31 - 1

__all__ = ["Comparison", "OutputComparison", "compare_models", "make_inputs", "tolerance"]

_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-10),
    "float32": (1e-5, 1e-5),
    "float16": (1e-2, 1e-2),
    "bfloat16": (3e-2, 3e-2),
}


def tolerance(dtype: np.dtype | str) -> tuple[float, float]:
    """(rtol, atol relative to max|reference|) for outputs of this dtype; (0, 0) means exact."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    return _TOLERANCES.get(name, (0.0, 0.0))


ModelSource = onnx.ModelProto | str | os.PathLike


@dataclass(frozen=True)
class _Source:
    """A model to run: its graph (tensors possibly still in external files), and the file it
    came from, if any, which onnxruntime then opens itself (reading external data its way)."""

    proto: onnx.ModelProto
    path: Path | None
    folder: Path | None

    @classmethod
    def of(cls, model: ModelSource) -> _Source:
        if isinstance(model, onnx.ModelProto):
            return cls(model, None, tensors.current_folder())
        path = Path(model)
        return cls(onnx.load(path, load_external_data=False), path, path.parent)

    def widened(self, widen: Callable[[onnx.ModelProto], onnx.ModelProto]) -> _Source:
        """This model through one of :mod:`onnxbalance.upcast`'s conversions."""
        with tensors.external_folder(self.folder):
            return _Source(widen(self.proto), None, self.folder)


def compare_models(
    original: ModelSource,
    balanced: ModelSource,
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> Comparison:
    """Run both models in onnxruntime, one after the other, and compare every output.

    Each model is a ModelProto or a path; from a path onnxruntime reads the file and its
    external data itself, so models over protobuf's 2 GB limit work, and each session is freed
    before the next one loads. bfloat16 models run as float32 (onnxruntime has no bfloat16 CPU
    kernels; the conversion is exact, see :mod:`onnxbalance.upcast`) with bfloat16 tolerances.
    Outputs that the input model overflows are judged again in a wider type
    (:func:`_compared_wider`).

    Raises:
        InputError: bad ``inputs``/``input_shapes``, or onnxruntime refuses the original model
            or the inputs.
    """
    first, second = _Source.of(original), _Source.of(balanced)
    as_dtype = None
    if upcast.uses(first.proto, upcast.BF16) or upcast.uses(second.proto, upcast.BF16):
        first, second = first.widened(upcast.to_float32), second.widened(upcast.to_float32)
        as_dtype = "bfloat16"
    feed = make_inputs(first.proto, inputs=inputs, input_shapes=input_shapes, seed=seed)
    reference = run_model(first, feed, "the input model")
    result = run_model(second, feed, "the balanced model")
    outputs = tuple(
        compare_output(name, reference[name], result[name], as_dtype) for name in reference
    )
    # NaN or infinite inputs give non-finite outputs without any overflow
    finite_inputs = all(
        np.isfinite(value).all()
        for value in feed.values()
        if np.issubdtype(value.dtype, np.inexact)
    )
    overflowed = [
        o
        for o in outputs
        if finite_inputs
        and not o.passed
        and (as_dtype or o.dtype) != "float64"  # nothing wider to run it in
        and _overflowed(reference[o.name], result[o.name])
    ]
    if overflowed:
        again = _compared_wider(first, second, feed, overflowed, as_dtype)
        outputs = tuple(again.get(o.name, o) for o in outputs)
    comparison = Comparison(outputs=outputs, n_inputs=len(feed), seed=seed)
    log.info(
        "verification %s: max abs diff %.3g, max rel diff %.3g",
        "passed" if comparison.passed else "FAILED",
        comparison.max_abs_diff,
        comparison.max_rel_diff,
    )
    return comparison


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
    feed: Mapping[str, np.ndarray],
    failed: Sequence[OutputComparison],
    as_dtype: str | None,
) -> dict[str, OutputComparison]:
    """The ``failed`` outputs compared again with both models and the inputs in a wider float
    type (:func:`onnxbalance.upcast.wider_type`), with the tolerances of each output's own dtype.

    The input model overflowed its dtype on the test inputs: the balanced one may not have
    (rescaling moves magnitudes between layers, and may well take a hidden layer back into
    range), or both may have everywhere. In the wider type neither overflows, so the two
    functions can still be compared. If onnxruntime cannot run the widened models (its Conv
    kernels, for one, exist for float32 only), the failures stand, saying why.
    """
    wide = upcast.wider_type(first.proto)
    dtype = tensors.numpy_dtype(wide)
    wide_feed = {
        name: value.astype(dtype)
        if np.issubdtype(value.dtype, np.floating) and value.dtype.itemsize < dtype.itemsize
        else value
        for name, value in feed.items()
    }
    convert = functools.partial(upcast.widen, wide=wide)
    try:
        reference = run_model(first.widened(convert), wide_feed, "the input model")
        result = run_model(second.widened(convert), wide_feed, "the balanced model")
    except InputError as exc:
        log.info("verification in %s impossible: %s", dtype.name, exc)
        return {
            o.name: replace(
                o,
                reason=f"{o.reason}: the input model overflows {as_dtype or o.dtype} on the "
                f"test inputs, and onnxruntime cannot run the models in {dtype.name} to compare",
            )
            for o in failed
        }
    compared = {}
    for failure in failed:
        name, own = failure.name, as_dtype or failure.dtype
        again = compare_output(name, reference[name], result[name], own)
        how = f"the input model overflows {own} on the test inputs: compared in {dtype.name}"
        compared[name] = replace(
            again, dtype=failure.dtype, reason=how + (f", {again.reason}" if again.reason else "")
        )
        log.info("verification of output %r: %s", name, compared[name].reason)
    return compared


def make_inputs(
    model: onnx.ModelProto,
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The arrays to feed: the user's ``inputs`` if given, else seeded random ones.

    Random floats are standard normal, integers uniform in [0, 4) (small enough to be valid
    indices), booleans fair coin flips.

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
        return _check_fed(declared, inputs)
    rng = np.random.default_rng(seed)
    feed = {}
    for name, value in declared.items():
        dtype, shape = _dtype_and_shape(name, value, input_shapes.get(name))
        if np.issubdtype(dtype, np.floating):
            feed[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feed[name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        elif np.issubdtype(dtype, np.integer):
            feed[name] = rng.integers(0, 4, size=shape).astype(dtype)
        else:
            raise InputError(
                f"input {name!r} has dtype {dtype}, which cannot be generated; "
                "give arrays with --inputs FILE.npz"
            )
    return feed


def graph_inputs(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """The inputs a caller must feed: graph inputs that are not initializers (old IR lists both)."""
    initializers = {t.name for t in model.graph.initializer}
    return {v.name: v for v in model.graph.input if v.name not in initializers}


def run_model(
    model: ModelSource | _Source, feed: Mapping[str, np.ndarray], what: str
) -> dict[str, np.ndarray]:
    """All outputs of ``model`` on ``feed``, as arrays keyed by output name.

    Raises:
        InputError: onnxruntime cannot load or run the model.
    """
    source = model if isinstance(model, _Source) else _Source.of(model)
    if source.path is not None:
        return _run_session(str(source.path), feed, what)
    if not tensors.external_names(source.proto) and source.proto.ByteSize() < _PROTOBUF_LIMIT:
        return _run_session(source.proto.SerializeToString(), feed, what)
    # external references or too big for one message: onnxruntime needs a file
    with tempfile.TemporaryDirectory(prefix="onnxbalance-verify-") as folder:
        with safewrite.stage_model(
            source.proto, Path(folder) / "model.onnx", base_dir=source.folder
        ) as staged:
            return _run_session(str(staged.model_path), feed, what)


def _run_session(
    model: bytes | str, feed: Mapping[str, np.ndarray], what: str
) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Basic optimisations only: fusions could differ between the two graphs and blur the check.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    # No packed copies of the weights: verification runs once, and memory matters more.
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = None
    try:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        types = [o.type for o in session.get_outputs()]
        values = session.run(names, dict(feed))
    except Exception as exc:  # onnxruntime raises its own untyped exception classes
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"onnxruntime cannot run {what}: {message}") from None
    finally:
        session = None  # free the session's buffers before the next model is loaded
    return {
        name: _to_array(value, kind) for name, value, kind in zip(names, values, types, strict=True)
    }


def compare_output(
    name: str, reference: np.ndarray, result: np.ndarray, as_dtype: str | None = None
) -> OutputComparison:
    """Compare one output; see the module docstring for the rule. ``as_dtype`` names the dtype
    whose tolerances apply when the model ran in a wider one (bfloat16 run as float32)."""
    dtype = reference.dtype
    shape = tuple(int(d) for d in reference.shape)
    rtol, atol_scale = tolerance(as_dtype if as_dtype and dtype.kind == "f" else dtype)

    def record(abs_diff: float, rel_diff: float, atol: float, passed: bool, reason: str = ""):
        return OutputComparison(
            name, dtype.name, shape, abs_diff, rel_diff, rtol, atol, passed, reason
        )

    if result.shape != reference.shape:
        return record(np.inf, np.inf, 0.0, False, f"shape {result.shape} != {reference.shape}")
    if not np.issubdtype(dtype, np.inexact):
        if dtype.kind in "OUS":
            equal = np.array_equal(reference, result)
            return record(
                0.0 if equal else np.inf,
                0.0 if equal else np.inf,
                0.0,
                equal,
                "" if equal else "values differ",
            )
        differ = int(np.count_nonzero(reference != result))
        diff = np.abs(reference.astype(np.float64) - result.astype(np.float64))
        abs_diff = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(reference.astype(np.float64)).max()) if reference.size else 0.0
        rel = abs_diff / scale if scale > 0 else (0.0 if abs_diff == 0 else np.inf)
        reason = f"{differ} of {reference.size} values differ" if differ else ""
        return record(abs_diff, rel, 0.0, differ == 0, reason)

    ref = reference.astype(np.float64)
    res = result.astype(np.float64)
    finite = np.isfinite(ref)
    same_nonfinite = np.array_equal(ref[~finite], res[~finite], equal_nan=True)
    if not np.all(np.isfinite(res[finite])) or not same_nonfinite:
        return record(np.inf, np.inf, 0.0, False, "non-finite values differ")
    if reference.size and not finite.any():
        return record(
            0.0, 0.0, 0.0, False, "output is NaN or infinite everywhere on the test inputs"
        )
    ref, res = ref[finite], res[finite]
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    diff = np.abs(ref - res)
    abs_diff = float(diff.max()) if diff.size else 0.0
    atol = atol_scale * scale
    if scale == 0.0:
        return record(
            abs_diff,
            0.0 if abs_diff == 0 else np.inf,
            0.0,
            False,
            "output is all zero on the test inputs, so the check cannot fail",
        )
    rel_diff = abs_diff / scale
    bad = int(np.count_nonzero(diff > rtol * np.abs(ref) + atol))
    reason = f"{bad} of {ref.size} values outside tolerance" if bad else ""
    return record(abs_diff, rel_diff, atol, bad == 0, reason)


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
    name: str, value: onnx.ValueInfoProto, override: Sequence[int] | None
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
    declared = (
        [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if tensor_type.HasField("shape")
        else None
    )
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
    return dtype, tuple(d if d else 1 for d in declared)


_ORT_ELEMENT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
                      "tensor(float16)": np.float16}  # fmt: skip


def _to_array(value: Any, kind: str = "") -> np.ndarray:
    """onnxruntime returns arrays, but sequences of maps (ZipMap) as lists of Python dicts.

    Their values come back as Python floats; the declared element type (``kind`` is e.g.
    ``seq(map(int64,tensor(float)))``) says which tolerance applies.
    """
    if isinstance(value, np.ndarray):
        return value
    dtype = next((t for name, t in _ORT_ELEMENT_TYPES.items() if name in kind), None)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        keys = sorted(value[0])
        return np.array([[row[k] for k in keys] for row in value], dtype=dtype)
    return np.asarray(value, dtype=dtype)
