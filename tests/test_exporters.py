"""Acceptance on models from real exporters: torch.onnx.export and skl2onnx.

Both are balanced through the command line, then run in onnxruntime here, independently of the
tool's own verification. The scikit-learn model must predict the same classes on the real digits.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxbalance.cli import main

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("skl2onnx")


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _weight_norm(path) -> float:
    model = onnx.load(path)
    arrays = [numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer]
    return float(np.sqrt(sum(np.sum(a**2) for a in arrays if a.ndim == 2)))


def _balance(capsys, src, dst, report):
    code = main([str(src), str(dst), "--p", "2", "--q", "2", "--report", str(report), "-q"])
    _, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(report.read_text())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter warns
def test_torch_sequential_mlp(tmp_path, capsys):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(20, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 24),
        torch.nn.ReLU(),
        torch.nn.Linear(24, 5),
    )
    with torch.no_grad():  # make it clearly unbalanced: same function, skewed scales
        net[0].weight *= 7.0
        net[0].bias *= 7.0
        net[2].weight /= 7.0
    src = tmp_path / "torch.onnx"
    torch.onnx.export(
        net.eval(), (torch.zeros(1, 20),), str(src), input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    report = _balance(capsys, src, tmp_path / "out.onnx", tmp_path / "r.json")
    assert report["units_balanced"] == 56 and report["verify"]["passed"]
    assert report["norm_after"] < 0.8 * report["norm_before"]
    assert _weight_norm(tmp_path / "out.onnx") == pytest.approx(report["norm_after"], rel=1e-5)
    x = np.random.default_rng(0).standard_normal((256, 20)).astype(np.float32)
    before = _session(src).run(None, {"x": x})[0]
    after = _session(tmp_path / "out.onnx").run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5 * np.abs(before).max())
    with torch.no_grad():
        np.testing.assert_allclose(after, net(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-4)


def test_sklearn_mlp_classifier_on_digits(tmp_path, capsys):
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    clf = MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=60, random_state=0)
    with pytest.warns(ConvergenceWarning):
        clf.fit(x, y)
    src = tmp_path / "digits.onnx"
    src.write_bytes(to_onnx(clf, x[:1], target_opset=17).SerializeToString())
    report = _balance(capsys, src, tmp_path / "out.onnx", tmp_path / "r.json")
    assert report["units_balanced"] == 48 and report["verify"]["passed"]
    assert report["norm_after"] < report["norm_before"]
    name = _session(src).get_inputs()[0].name
    label_before, proba_before = _session(src).run(None, {name: x})
    label_after, proba_after = _session(tmp_path / "out.onnx").run(None, {name: x})
    np.testing.assert_array_equal(label_after, label_before)
    np.testing.assert_array_equal(label_after, clf.predict(x))
    as_array = lambda rows: np.array([[row[k] for k in sorted(row)] for row in rows])  # noqa: E731
    np.testing.assert_allclose(as_array(proba_after), as_array(proba_before), atol=1e-5)
