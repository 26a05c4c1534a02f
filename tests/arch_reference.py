"""Independent reference for the architecture acceptance tests.

Nothing here imports onnxbalance. A test states, from the architecture's definition, which
stored tensors form each linear layer and which scale group every row and column belongs to
(:class:`RefLayer`); this module then

* reads a layer's effective weights from any ONNX model by initializer name
  (a BatchNormalization after it contributes gamma / sqrt(var + eps) per row, docs/algorithm.md §2),
* evaluates F(u) = sum_o (sum_j |W_eff[o, j]|^p exp(p (u_o - u_col(o, j))))^(q/p) and
  minimises it with scipy (convex in the log-scales u, so L-BFGS finds the global minimum),
* rescales a model by hand (W[o, j] * exp(u_o - u_col(o, j)) and bias[o] * exp(u_o); when a
  BatchNormalization follows, W[o, j] * exp(-u_col(o, j)) and BN gamma[o], beta[o] * exp(u_o),
  conv bias and BN mean/var unchanged), which lets a test check its own tie structure: any u
  over the movable groups must leave the function unchanged,
* runs models in onnxruntime and compares outputs.

Raw columns are kept (kernel taps and flattened positions are not aggregated): F only needs
sums over them, and keeping them makes the grouped-convolution column map explicit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import numpy_helper
from scipy.optimize import minimize

FIXED = -1


@dataclass(frozen=True)
class RefLayer:
    """One linear layer as the architecture defines it.

    ``layout`` says how the weight tensor maps to (rows = output units, raw columns):
    "out_first" for Conv and Gemm with transB=1 ([O, I, k...]), "in_first" for MatMul and Gemm
    with transB=0 ([I, O]), "convT" for ConvTranspose with group 1 ([I, O, k...]).
    ``col_groups`` has shape (rows, raw columns). ``bn`` names gamma, beta, var and gives eps
    of a BatchNormalization applied to this layer's output.
    """

    name: str
    weight: str
    layout: str
    row_groups: np.ndarray
    col_groups: np.ndarray
    bias: str | None = None
    bn: tuple[str, str, str, float] | None = None
    alpha: float = 1.0
    effective: np.ndarray | None = None  # from the source definition (torch / numpy), if known

    def moves_rows(self) -> bool:
        return bool(np.any(self.row_groups != FIXED))

    def moves_weight(self) -> bool:
        return self.moves_rows() or bool(np.any(self.col_groups != FIXED))

    def touched(self) -> set[str]:
        """Initializers a rescaling of this layer's movable units may change."""
        names = set()
        if self.moves_weight():
            names.add(self.weight)
        if self.moves_rows():
            if self.bn is not None:
                names.update(self.bn[:2])
            elif self.bias is not None:
                names.add(self.bias)
        return names


@dataclass(frozen=True)
class Fixture:
    """A model, its hand-derived unit graph, and the count of balanced units (scale groups)."""

    name: str
    model: onnx.ModelProto
    inputs: dict[str, np.ndarray]
    layers: tuple[RefLayer, ...]
    n_groups: int
    expected_balanced: int
    notes: str = ""
    ops: tuple[str, ...] = field(default=())

    def touched(self) -> set[str]:
        names: set[str] = set()
        for layer in self.layers:
            names |= layer.touched()
        return names


class Groups:
    """Hands out scale-group indices; a tied group is one call whose indices are reused."""

    def __init__(self) -> None:
        self.n = 0

    def new(self, count: int) -> np.ndarray:
        out = np.arange(self.n, self.n + count, dtype=np.int64)
        self.n += count
        return out


def fixed(count: int) -> np.ndarray:
    return np.full(count, FIXED, dtype=np.int64)


def conv_cols(in_groups: np.ndarray, out_channels: int, group: int, taps: int) -> np.ndarray:
    """Column groups of a (grouped) convolution: output channel o only sees its group's inputs."""
    in_groups = np.asarray(in_groups, dtype=np.int64)
    per_group_in = len(in_groups) // group
    per_group_out = out_channels // group
    rows = []
    for o in range(out_channels):
        g = o // per_group_out
        rows.append(np.repeat(in_groups[g * per_group_in : (g + 1) * per_group_in], taps))
    return np.stack(rows)


def dense_cols(in_groups: np.ndarray, out_features: int, positions: int = 1) -> np.ndarray:
    """Column groups of a dense layer after Flatten of [C, positions] (channel-major)."""
    row = np.repeat(np.asarray(in_groups, dtype=np.int64), positions)
    return np.broadcast_to(row, (out_features, len(row))).copy()


# ---------------------------------------------------------------- reading and writing tensors


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def rows_view(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "out_first":
        return array.reshape(array.shape[0], -1)
    if layout == "in_first":
        return array.T
    if layout == "convT":
        return np.moveaxis(array, 1, 0).reshape(array.shape[1], -1)
    raise ValueError(layout)


def from_rows_view(rows: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    if layout == "out_first":
        return rows.reshape(shape)
    if layout == "in_first":
        return rows.T
    if layout == "convT":
        moved = rows.reshape((shape[1], shape[0], *shape[2:]))
        return np.moveaxis(moved, 0, 1)
    raise ValueError(layout)


def effective_weight(layer: RefLayer, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """W_eff (rows, raw columns) in float64, BN factor and alpha applied."""
    rows = rows_view(tensors[layer.weight].astype(np.float64), layer.layout) * layer.alpha
    if layer.bn is not None:
        gamma, _, var, eps = layer.bn
        factor = tensors[gamma].astype(np.float64) / np.sqrt(tensors[var].astype(np.float64) + eps)
        rows = rows * factor[:, None]
    return rows


def rescale_model(
    model: onnx.ModelProto, layers: tuple[RefLayer, ...], log_scales: np.ndarray
) -> onnx.ModelProto:
    """The model with every movable group rescaled by exp(u), done by hand from the RefLayers."""
    tensors = initializers(model)
    new: dict[str, np.ndarray] = {}
    u = np.append(np.asarray(log_scales, dtype=np.float64), 0.0)  # index -1 (FIXED) -> 0
    for layer in layers:
        original = tensors[layer.weight]
        rows = rows_view(original.astype(np.float64), layer.layout)
        # with a BN after the layer, the output scale goes into gamma and beta instead
        row_u = u[layer.row_groups] if layer.bn is None else np.zeros(len(layer.row_groups))
        factor = np.exp(row_u[:, None] - u[layer.col_groups])
        new[layer.weight] = from_rows_view(rows * factor, layer.layout, original.shape).astype(
            original.dtype
        )
        out_factor = np.exp(u[layer.row_groups])
        targets = list(layer.bn[:2]) if layer.bn is not None else [layer.bias]
        for name in targets:
            if name is not None:
                value = tensors[name]
                factor = out_factor.reshape(value.shape) if value.ndim > 1 else out_factor
                new[name] = (value.astype(np.float64) * factor).astype(value.dtype)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name in new:
            tensor.CopyFrom(numpy_helper.from_array(new[tensor.name], tensor.name))
    return out


# ---------------------------------------------------------------- the objective and its minimum


def objective(
    weights: list[np.ndarray],
    row_groups: list[np.ndarray],
    col_groups: list[np.ndarray],
    n_groups: int,
    p: float,
    q: float,
):
    """F(u) and dF/du over raw columns, in the log domain (no overflow for large scales)."""
    r = q / p
    with np.errstate(divide="ignore"):
        logs = [p * np.log(np.abs(w)) for w in weights]

    def f(u: np.ndarray) -> tuple[float, np.ndarray]:
        ue = np.append(u, 0.0)
        value = 0.0
        grad = np.zeros(n_groups + 1)
        for logc, rows, cols in zip(logs, row_groups, col_groups, strict=True):
            terms = logc + p * (ue[rows][:, None] - ue[cols])
            top = np.max(terms, axis=1, keepdims=True)
            top = np.where(np.isfinite(top), top, 0.0)
            expd = np.exp(terms - top)
            sums = expd.sum(axis=1)
            alive = sums > 0
            log_rho = np.where(alive, np.log(np.where(alive, sums, 1.0)) + top[:, 0], -np.inf)
            row_load = np.where(alive, np.exp(r * np.where(alive, log_rho, 0.0)), 0.0)
            value += row_load.sum()
            np.add.at(grad, rows, q * row_load)
            share = expd / np.where(alive, sums, 1.0)[:, None]
            np.add.at(grad, cols, -q * row_load[:, None] * share)
        return float(value), grad[:n_groups]

    return f


def reference_minimum(
    layers: tuple[RefLayer, ...],
    weights: list[np.ndarray],
    n_groups: int,
    p: float = 2.0,
    q: float = 2.0,
) -> tuple[float, float, np.ndarray]:
    """(F at u = 0, min F, argmin u) for these effective weights, by L-BFGS on the convex F(u)."""
    rows = [layer.row_groups for layer in layers]
    cols = [
        np.broadcast_to(layer.col_groups, w.shape) for layer, w in zip(layers, weights, strict=True)
    ]
    f = objective(weights, rows, cols, n_groups, p, q)
    start, _ = f(np.zeros(n_groups))
    if n_groups == 0:
        return start, start, np.zeros(0)

    def scaled(u: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = f(u)
        return value / start, grad / start

    result = minimize(
        scaled,
        np.zeros(n_groups),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 20_000, "maxcor": 30, "ftol": 1e-15, "gtol": 1e-11},
    )
    return start, float(f(result.x)[0]), result.x


def norm_value(layers: tuple[RefLayer, ...], model: onnx.ModelProto, p=2.0, q=2.0) -> float:
    """F = ||W||_{p,q}^q over these layers, read from the model's stored tensors."""
    tensors = initializers(model)
    total = 0.0
    for layer in layers:
        w = effective_weight(layer, tensors)
        total += float(np.sum(np.sum(np.abs(w) ** p, axis=1) ** (q / p)))
    return total


# ---------------------------------------------------------------- onnxruntime


def run(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    # Graph optimisations could fuse Conv+BN and hide differences in how tensors were edited.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, inputs)


def assert_equivalent(
    a: onnx.ModelProto, b: onnx.ModelProto, inputs: dict[str, np.ndarray], rtol: float = 1e-4
) -> None:
    for x, y in zip(run(a, inputs), run(b, inputs), strict=True):
        scale = max(1.0, float(np.max(np.abs(x))))
        diff = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
        assert diff <= rtol * scale, f"outputs differ by {diff:.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------- the acceptance check


def check_balanced(
    fx: Fixture,
    balanced: onnx.ModelProto,
    units_balanced: int,
    best: float,
    p: float = 2.0,
    q: float = 2.0,
) -> None:
    """What the tests require of the tool's result on one fixture.

    * the count of balanced units (scale groups) equals the hand-derived count,
    * the outputs are unchanged (onnxruntime, two seeded input sets),
    * the norm over the hand-derived layers is the scipy optimum ``best``,
    * every tensor that no movable unit touches is bit-for-bit unchanged, in its dtype.
    """
    assert units_balanced == fx.expected_balanced, fx.notes
    assert_equivalent(fx.model, balanced, fx.inputs)
    rng = np.random.default_rng(7)
    other = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in fx.inputs.items()}
    assert_equivalent(fx.model, balanced, other)
    assert abs(norm_value(fx.layers, balanced, p, q) - best) <= 1e-5 * best
    old, new = initializers(fx.model), initializers(balanced)
    touched = fx.touched()
    for tensor, value in old.items():
        if tensor not in touched:
            assert new[tensor].dtype == value.dtype, tensor
            assert new[tensor].tobytes() == value.tobytes(), f"{tensor} must not change"


def _fails(check) -> bool:
    try:
        check()
    except AssertionError:
        return True
    return False


def assert_check_is_sharp(fx: Fixture, u_best: np.ndarray, best: float) -> None:
    """check_balanced passes on the hand-made optimum and fails on four kinds of wrong result."""
    good = rescale_model(fx.model, fx.layers, u_best)
    check_balanced(fx, good, fx.expected_balanced, best)

    assert _fails(lambda: check_balanced(fx, good, fx.expected_balanced + 1, best))
    halfway = rescale_model(fx.model, fx.layers, u_best / 2)
    assert _fails(lambda: check_balanced(fx, halfway, fx.expected_balanced, best))
    # a consumer that forgets the scale of its input units changes the function
    victim = next(lay for lay in reversed(fx.layers) if np.any(lay.col_groups != FIXED))
    forgetful = tuple(
        replace(layer, col_groups=np.full_like(layer.col_groups, FIXED))
        if layer is victim
        else layer
        for layer in fx.layers
    )
    broken = rescale_model(fx.model, forgetful, u_best)
    assert _fails(lambda: check_balanced(fx, broken, fx.expected_balanced, best))
    # one ulp in a tensor that must stay fixed
    frozen = next(
        t
        for t in good.graph.initializer
        if t.name not in fx.touched() and t.dims and t.data_type == onnx.TensorProto.FLOAT
    )
    value = numpy_helper.to_array(frozen).copy()
    value.flat[0] = np.nextafter(value.flat[0], np.float32(np.inf))
    frozen.CopyFrom(numpy_helper.from_array(value, frozen.name))
    assert _fails(lambda: check_balanced(fx, good, fx.expected_balanced, best))
