"""The Python API: balance() and check() on small MLPs, checked with onnxruntime independently."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gemm_mlp import gemm_mlp, linear_model
from onnx import numpy_helper

import onnxbalance
from onnxbalance import api
from onnxbalance.errors import InputError, VerificationError


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _frobenius(model: onnx.ModelProto) -> float:
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name[0] == "W"]
    return float(np.sqrt(sum(np.sum(w.astype(np.float64) ** 2) for w in weights)))


@pytest.fixture
def unbalanced():
    return gemm_mlp([12, 16, 16, 5], seed=4, scale_hidden=[8.0, 0.05])


def test_balance_lowers_the_norm_keeps_the_function_and_the_argument(unbalanced):
    before = unbalanced.SerializeToString()
    balanced, report = onnxbalance.balance(unbalanced, p=2, q=2)
    assert unbalanced.SerializeToString() == before  # argument untouched
    assert isinstance(report, onnxbalance.Report)
    # the norm the report claims is the norm of the weights actually written
    assert report.norm_before == pytest.approx(_frobenius(unbalanced), rel=1e-6)
    assert report.norm_after == pytest.approx(_frobenius(balanced), rel=1e-5)
    assert report.norm_after < 0.5 * report.norm_before
    assert report.converged and report.units_balanced == 32 and report.units_found == 32
    assert report.verify is not None and report.verify.passed
    assert list(report.seconds) == ["load", "analyse", "solve", "rewrite", "verify"]
    assert report.history[0] == 1.0 and report.history[-1] == pytest.approx(report.norm_ratio)
    assert np.all(np.diff(report.history) <= 1e-12)
    assert report.max_imbalance_before > 0.5 > 1e-3 > report.max_imbalance_after
    x = np.random.default_rng(0).standard_normal((64, 12)).astype(np.float32)
    np.testing.assert_allclose(_run(balanced, x), _run(unbalanced, x), rtol=1e-4, atol=1e-5)


def test_nothing_to_balance_reports_a_norm_whose_power_overflows():
    """No hidden unit, weights near 1e30, q = 20: ||W||^20 overflows float64, the norm does
    not; it is reported exactly and without warnings."""
    import warnings

    model = linear_model()
    weight = model.graph.initializer[0]
    stored = (numpy_helper.to_array(weight).astype(np.float64) * 1e30).astype(np.float32)
    weight.CopyFrom(numpy_helper.from_array(stored, weight.name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = onnxbalance.balance(model, p=2, q=20)
    units = stored.astype(np.float64) / 1e30  # rows are the output units (transB=1)
    expected = 1e30 * float(np.sum(np.sum(units**2, axis=1) ** 10) ** (1 / 20))
    assert report.solver == "none"
    assert report.norm_before == report.norm_after == pytest.approx(expected, rel=1e-12)


def test_balance_from_a_path(tmp_path, unbalanced):
    path = tmp_path / "m.onnx"
    onnx.save(unbalanced, path)
    data = path.read_bytes()
    balanced, report = onnxbalance.balance(str(path), verify=False)
    assert path.read_bytes() == data
    assert report.source == str(path) and report.verify is None
    assert "verify" not in report.seconds


def test_balance_l1_norm(unbalanced):
    _, l2 = onnxbalance.balance(unbalanced, p=2, q=2, verify=False)
    balanced, l1 = onnxbalance.balance(unbalanced, p=1, q=1)
    assert l1.p == 1 and l1.norm_after < l1.norm_before
    total = sum(
        float(np.abs(numpy_helper.to_array(t).astype(np.float64)).sum())
        for t in balanced.graph.initializer
        if t.name.startswith("W")
    )
    assert l1.norm_after == pytest.approx(total, rel=1e-5)
    assert l1.norm_before != pytest.approx(l2.norm_before)


def test_nothing_to_balance_returns_an_unchanged_copy():
    model = linear_model()
    out, report = onnxbalance.balance(model)
    assert out is not model
    assert out.SerializeToString() == model.SerializeToString()
    assert not report.changed and report.units_balanced == 0 and report.verify is None
    assert report.norm_after == report.norm_before > 0
    # the stages that ran, each once it had ended (nothing is compared, the copy only run)
    assert list(report.seconds) == ["load", "analyse", "solve", "verify"]
    assert list(onnxbalance.balance(model, verify=False)[1].seconds) == ["load", "analyse", "solve"]


def test_check_says_how_far_from_balanced(unbalanced):
    report = onnxbalance.check(unbalanced)
    assert not report.input_balanced and report.gap > 0.5
    balanced, _ = onnxbalance.balance(unbalanced)
    again = onnxbalance.check(balanced)
    assert again.input_balanced and again.gap < 1e-6
    assert onnxbalance.check(linear_model()).input_balanced


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"p": 0}, "--p must be a positive"),
        ({"p": -1.0}, "--p must be a positive"),
        ({"q": float("nan")}, "--q must be a positive"),
        ({"tol": 0.0}, "--tol"),
        ({"max_sweeps": 0}, "--max-sweeps"),
    ],
)
def test_bad_options(unbalanced, options, message):
    with pytest.raises(InputError, match=message):
        onnxbalance.balance(unbalanced, **options)


def test_nan_weights_name_the_layer(unbalanced):
    for tensor in unbalanced.graph.initializer:
        if tensor.name == "W1":
            w = numpy_helper.to_array(tensor).copy()
            w[0, 0] = np.nan
            tensor.CopyFrom(numpy_helper.from_array(w, "W1"))
    with pytest.raises(InputError, match="gemm1"):
        onnxbalance.balance(unbalanced)


def test_verification_failure_raises_with_the_report(unbalanced, monkeypatch):
    import onnxbalance.rewrite as rewrite_module

    real = rewrite_module.rewrite

    def other_scales(model, units, log_scales):
        # any rescaling keeps the function: verification must still pass
        return real(model, units, np.asarray(log_scales) * 1.5)

    def wrong(model, units, log_scales):
        # the output layer's weights doubled: a different function
        out = real(model, units, log_scales)
        for tensor in out.graph.initializer:
            if tensor.name == "W2":
                tensor.CopyFrom(
                    numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(2), "W2")
                )
        return out

    monkeypatch.setattr(rewrite_module, "rewrite", other_scales)
    _, report = onnxbalance.balance(unbalanced)
    assert report.verify.passed
    monkeypatch.setattr(rewrite_module, "rewrite", wrong)
    with pytest.raises(VerificationError) as info:
        onnxbalance.balance(unbalanced)
    assert info.value.exit_code == 3
    assert info.value.report.verify.passed is False
    assert info.value.report.to_dict()["verify"]["passed"] is False


def test_unknown_solver_is_a_user_error(unbalanced):
    with pytest.raises(InputError, match="solver"):
        onnxbalance.balance(unbalanced, solver="no-such-solver")


def test_layer_of_group_names():
    assert api._layer_of("gemm1:17") == "gemm1"
    assert api._layer_of("conv[3]") == "conv"
    assert api._layer_of("plain") == "plain"


def test_balance_file_keeps_each_tensors_storage_field(tmp_path, unbalanced):
    # raw_data weights are streamed into the file, float_data ones rewritten in memory: both keep
    # their field, and the file equals the in-memory result
    typed = unbalanced.graph.initializer[0]
    values = numpy_helper.to_array(typed)
    typed.CopyFrom(
        onnx.helper.make_tensor(typed.name, typed.data_type, values.shape, values.ravel())
    )
    assert typed.float_data and not typed.HasField("raw_data")
    src = tmp_path / "in.onnx"
    onnx.save(unbalanced, src)
    onnxbalance.balance_file(src, tmp_path / "out.onnx")
    written = onnx.load(tmp_path / "out.onnx")
    fields = {
        t.name: (bool(t.float_data), t.HasField("raw_data")) for t in written.graph.initializer
    }
    stored = {
        t.name: (bool(t.float_data), t.HasField("raw_data")) for t in unbalanced.graph.initializer
    }
    assert fields == stored
    in_memory, _ = onnxbalance.balance(src)
    assert written.SerializeToString() == in_memory.SerializeToString()
