"""The sample-model generator: deterministic bytes, the declared architecture, the function."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from sample_models.generate import (
    PAPER_NETWORKS,
    SPECS,
    build,
    gaussian_layers,
    main,
    spec_layers,
    write,
)

REPO = Path(__file__).resolve().parents[1]


def test_generator_writes_the_same_bytes_twice(tmp_path):
    main([str(tmp_path / "a")])
    main([str(tmp_path / "b")])
    for name in SPECS:
        first = (tmp_path / "a" / f"{name}.onnx").read_bytes()
        assert first == (tmp_path / "b" / f"{name}.onnx").read_bytes(), name


def test_committed_quick_start_model_is_the_generated_one():
    committed = (REPO / "sample_models" / "mlp.onnx").read_bytes()
    assert committed == build("mlp").SerializeToString()
    assert len(committed) < 50_000


def _dims(value_info: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", list(SPECS))
def test_models_have_the_declared_architecture(tmp_path, name):
    model = onnx.load(write(name, tmp_path))
    onnx.checker.check_model(model, full_check=True)
    sizes = SPECS[name].sizes
    graph = model.graph
    n_layers = len(sizes) - 1
    assert [n.op_type for n in graph.node] == ["Gemm", "Relu"] * (n_layers - 1) + ["Gemm"]
    assert _dims(graph.input[0]) == ["batch", sizes[0]]
    assert _dims(graph.output[0]) == ["batch", sizes[-1]]
    inits = {t.name: t for t in graph.initializer}
    for k, node in enumerate(n for n in graph.node if n.op_type == "Gemm"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["transB"] == 1 and attrs.get("transA", 0) == 0
        weight, bias = (inits[node.input[1]], inits[node.input[2]])
        assert weight.data_type == bias.data_type == onnx.TensorProto.FLOAT
        assert list(weight.dims) == [sizes[k + 1], sizes[k]]
        assert list(bias.dims) == [sizes[k + 1]]


@pytest.mark.parametrize("name", PAPER_NETWORKS)
def test_paper_networks_are_he_initialised_with_zero_biases(name):
    for weight, bias in spec_layers(SPECS[name]):
        fan_in = weight.shape[1]
        assert not bias.any()
        sigma = np.sqrt(2 / fan_in)
        # 5 standard errors of the sample mean and variance of weight.size Gaussians
        assert abs(weight.mean()) < 5 * sigma / np.sqrt(weight.size)
        assert weight.var() == pytest.approx(sigma**2, rel=5 * np.sqrt(2 / weight.size))


def test_paper_networks_have_the_papers_sizes():
    sizes = [SPECS[name].sizes for name in PAPER_NETWORKS]
    assert sizes == [
        (200, 2500, 1250, 10),
        (200, 2000, 1000, 500, 250, 10),
        (200, 1000, 750, 750, 500, 500, 250, 10),
    ]
    assert all(sum(s[1:-1]) == 3750 for s in sizes)


def _forward(layers, x):
    h = x.astype(np.float64)
    for k, (weight, bias) in enumerate(layers):
        h = h @ weight.astype(np.float64).T + bias
        if k < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h


@pytest.mark.parametrize("name", ["mlp", "paper_c"])
def test_onnxruntime_computes_the_stored_mlp(tmp_path, name):
    path = write(name, tmp_path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, SPECS[name].sizes[0])).astype(np.float32)
    (y,) = session.run(None, {"input": x})
    expected = _forward(spec_layers(SPECS[name]), x)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_quick_start_mlp_is_unbalanced_but_equivalent_to_its_draw():
    """The hidden units are rescaled by factors up to e^2: same function, loads far apart."""
    spec = SPECS["mlp"]
    drawn = gaussian_layers(spec.sizes, spec.seed, spec.bias_std)
    inits = {t.name: numpy_helper.to_array(t) for t in build("mlp").graph.initializer}
    stored = [(inits[f"fc{k}.weight"], inits[f"fc{k}.bias"]) for k in (1, 2, 3)]
    x = np.random.default_rng(1).standard_normal((7, spec.sizes[0]))
    np.testing.assert_allclose(_forward(stored, x), _forward(drawn, x), rtol=1e-5, atol=1e-5)
    # p = q = 2: a hidden unit is balanced when its squared incoming and outgoing norms agree.
    w1, w2 = stored[0][0].astype(np.float64), stored[1][0].astype(np.float64)
    ratio = (w1**2).sum(axis=1) / (w2**2).sum(axis=0)
    assert ratio.max() / ratio.min() > 100
