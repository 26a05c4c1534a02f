"""Gemm + Relu MLPs as ONNX models with seeded Gaussian weights (variance 2 / fan-in).

Weights are stored like torch exports them: Gemm with transB=1, W of shape (out, in).
Used by the io/verify/api/cli tests and by benchmarks/pipeline_stages.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def gemm_mlp(
    sizes: Sequence[int],
    *,
    seed: int = 0,
    batch: int | str = "N",
    dtype: type = np.float32,
    scale_hidden: Sequence[float] | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    """An MLP ``sizes[0] -> ... -> sizes[-1]`` with Relu between Gemms.

    ``scale_hidden[k]`` multiplies the incoming weights and bias of hidden layer k and divides
    the next layer's weights: the same function, deliberately unbalanced.
    """
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits = [], []
    current = "x"
    n_layers = len(sizes) - 1
    factors = list(scale_hidden or [1.0] * (n_layers - 1))
    for k in range(n_layers):
        fan_in, fan_out = sizes[k], sizes[k + 1]
        w = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_out, fan_in))
        b = rng.normal(0.0, 0.1, size=fan_out)
        if k < n_layers - 1:
            w, b = w * factors[k], b * factors[k]
        if k > 0:
            w = w / factors[k - 1]
        inits += [
            numpy_helper.from_array(w.astype(dtype), f"W{k}"),
            numpy_helper.from_array(b.astype(dtype), f"B{k}"),
        ]
        out = "y" if k == n_layers - 1 else f"h{k}"
        nodes.append(
            helper.make_node("Gemm", [current, f"W{k}", f"B{k}"], [out], f"gemm{k}", transB=1)
        )
        if k < n_layers - 1:
            nodes.append(helper.make_node("Relu", [out], [f"r{k}"], f"relu{k}"))
            current = f"r{k}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", elem, [batch, sizes[0]])],
        [helper.make_tensor_value_info("y", elem, [batch, sizes[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def linear_model(n_in: int = 4, n_out: int = 3, seed: int = 0) -> onnx.ModelProto:
    """One Gemm, no Relu: nothing to balance."""
    return gemm_mlp([n_in, n_out], seed=seed)


def add_relu_model() -> onnx.ModelProto:
    """y = Relu(x) + 1 with no weights at all."""
    one = numpy_helper.from_array(np.ones(3, np.float32), "one")
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], "relu"),
            helper.make_node("Add", ["r", "one"], ["y"], "add"),
        ],
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
