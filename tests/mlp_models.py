"""Seeded Gemm+Relu MLPs in any float dtype, saved inline or with external data.

Shared by the robustness tests (external data, dtypes, safe writes, fuzzing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxbalance import tensors

DTYPES = {
    "float32": onnx.TensorProto.FLOAT,
    "float16": onnx.TensorProto.FLOAT16,
    "bfloat16": onnx.TensorProto.BFLOAT16,
    "float64": onnx.TensorProto.DOUBLE,
}


def mlp(widths=(4, 8, 6, 3), dtype="float32", seed=0, spread=3.0) -> onnx.ModelProto:
    """Gemm(transB=1)+Relu layers; weights log-uniformly spread so the model is unbalanced."""
    rng = np.random.default_rng(seed)
    data_type = DTYPES[dtype]
    np_dtype = tensors.numpy_dtype(data_type)
    nodes, inits = [], []
    current = "x"
    for k, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=False)):
        scale = np.exp(rng.uniform(-spread, spread, size=(n_out, 1)))
        w = rng.standard_normal((n_out, n_in)) * scale / np.sqrt(n_in)
        b = rng.standard_normal(n_out) * 0.1
        inits.append(tensors.make_tensor(f"W{k}", w.astype(np_dtype), data_type))
        inits.append(tensors.make_tensor(f"b{k}", b.astype(np_dtype), data_type))
        last = k == len(widths) - 2
        out = "y" if last else f"h{k}"
        gemm_out = "y" if last else f"z{k}"
        nodes.append(
            helper.make_node(
                "Gemm", [current, f"W{k}", f"b{k}"], [gemm_out], transB=1, name=f"gemm{k}"
            )
        )
        if not last:
            nodes.append(helper.make_node("Relu", [f"z{k}"], [out], name=f"relu{k}"))
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", data_type, ["N", widths[0]])],
        [helper.make_tensor_value_info("y", data_type, ["N", widths[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def save(model: onnx.ModelProto, path: Path, external: bool = False, threshold: int = 0) -> Path:
    """Save with onnx's own writer; external data goes to ``path.name + '.bin'`` (not our
    naming, so tests see that the output picks its own data file)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    if external:
        onnx.save_model(
            model,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".bin",
            size_threshold=threshold,
        )
    else:
        onnx.save_model(model, path)
    return path


def set_external_entry(tensor: onnx.TensorProto, key: str, value: str) -> None:
    """Set (or add) one ``external_data`` entry of a tensor: location, offset, length, ..."""
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            return
    entry = tensor.external_data.add()
    entry.key, entry.value = key, value
