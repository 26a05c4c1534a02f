"""Layers inside If, Loop and Scan bodies: found, balanced where they live, and equivalent.

Counts are derived by hand from the fixtures (tests/subgraph_models.py); every balanced model
is run next to the original in onnxruntime here, on every branch, independently of the tool's
own verification.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import subgraph_models as sm
from arch_reference import assert_equivalent, run
from onnx import numpy_helper
from onnx_models import IN

from onnxbalance import balance
from onnxbalance.analysis import analyse
from onnxbalance.analysis.graph import bodies

THEN = "If 'branch'/then_branch/"
ELSE = "If 'branch'/else_branch/"


def _stored(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant values of ``graph`` and all its bodies, by name."""
    found = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    for _, _, _, body in bodies(graph):
        found.update(_stored(body))
    return found


def _changed(original, balanced) -> set[str]:
    before, after = _stored(original.graph), _stored(balanced.graph)
    assert before.keys() == after.keys()
    return {k for k in before if not np.array_equal(before[k], after[k])}


def test_if_branches_are_analysed_with_the_body_in_the_names():
    units = analyse(sm.if_two_branches())
    want = [f"{THEN}t_fc1:{o}" for o in range(sm.THEN_HID)]
    want += [f"{ELSE}e_fc1:{o}" for o in range(sm.ELSE_HID)]
    assert sorted(units.group_names) == sorted(want)
    fixed = sorted((s.node, s.count, s.reason) for s in units.skipped)
    # both second layers feed the Gemm reading head_W, which the other branch reads too
    shared = "weight 'head_W' is used by 2 node inputs"
    assert fixed == [
        (f"{ELSE}e_fc2", sm.SHARED_HID, f"activation feeds 'e_head': {shared}"),
        (f"{THEN}t_fc2", sm.SHARED_HID, f"activation feeds 't_head': {shared}"),
    ]


def test_if_branches_balance_where_the_tensors_live():
    model = sm.if_two_branches()
    x = np.random.default_rng(1).normal(size=(16, IN)).astype(np.float32)
    feeds = [{"x": x, "cond": np.array(c)} for c in (True, False)]
    balanced, report = balance(model, inputs=feeds[0])
    assert report.units_balanced == sm.THEN_HID + sm.ELSE_HID
    assert report.units_found == sm.THEN_HID + sm.ELSE_HID + 2 * sm.SHARED_HID
    assert report.norm_after < report.norm_before
    # then: the body's initializers; else: its Constant nodes and the outer weight only it reads
    assert _changed(model, balanced) == {"t1_W", "t1_b", "t2_W", "e1_W", "e1_b", "cap_W"}
    for feed in feeds:
        assert_equivalent(model, balanced, feed)


LOOP_FEED = {"x": np.linspace(-2, 2, 5 * IN, dtype=np.float32).reshape(5, IN)}
SCAN_FEED = {
    "x": np.linspace(-2, 2, 3 * 5 * IN, dtype=np.float32).reshape(3, 5, IN),
    "s0": np.ones((5, IN), np.float32),
}


@pytest.mark.parametrize(
    ("build", "hidden", "feed"),
    [(sm.loop_mlp, sm.LOOP_HID, LOOP_FEED), (sm.scan_mlp, sm.SCAN_HID, SCAN_FEED)],
)
def test_loop_and_scan_bodies(build, hidden, feed):
    """The body's inputs and outputs are fixed like a graph's: only its hidden layer moves."""
    model = build()
    balanced, report = balance(model, inputs=feed)
    assert report.units_found == report.units_balanced == hidden
    assert report.changed and report.norm_after < report.norm_before
    assert_equivalent(model, balanced, feed)


def test_torchscript_data_dependent_branch(tmp_path):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Branchy(nn.Module):
        """One ReLU MLP for inputs with a positive sum, another for the rest."""

        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Sequential(nn.Linear(IN, 16), nn.ReLU(), nn.Linear(16, 3))
            self.neg = nn.Sequential(
                nn.Linear(IN, 10), nn.ReLU(), nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 3)
            )

        def forward(self, x):
            if bool(x.sum() > 0):
                return self.pos(x)
            return self.neg(x)

    torch.manual_seed(0)
    module = Branchy().eval()
    with torch.no_grad():  # skewed scales, same function: something to balance
        module.pos[0].weight *= 9.0
        module.pos[0].bias *= 9.0
        module.pos[2].weight /= 9.0
    path = tmp_path / "branchy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            torch.jit.script(module), (torch.ones(2, IN),), str(path), dynamo=False,
            input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}},
        )  # fmt: skip
    model = onnx.load(path)
    assert [n.op_type for n in model.graph.node].count("If") == 1
    x = np.random.default_rng(2).normal(size=(8, IN)).astype(np.float32)
    balanced, report = balance(model, inputs={"x": np.abs(x)})
    # pos: 16 hidden units; neg: 10 + 12
    assert report.units_balanced == report.units_found == 16 + 10 + 12
    assert report.norm_after < 0.5 * report.norm_before
    for feed in (np.abs(x), -np.abs(x)):
        assert_equivalent(model, balanced, {"x": feed})
        with torch.no_grad():
            want = module(torch.from_numpy(feed)).numpy()
        np.testing.assert_allclose(run(balanced, {"x": feed})[0], want, rtol=1e-4, atol=1e-4)


def test_names_defined_in_two_bodies_are_never_edited():
    model = sm.if_same_names()
    x = np.random.default_rng(3).normal(size=(4, IN)).astype(np.float32)
    balanced, report = balance(model, inputs={"x": x, "cond": np.array(True)})
    assert report.units_found == 2 * sm.THEN_HID and report.units_balanced == 0
    reasons = {entry.reason for entry in report.units_fixed}
    assert reasons == {"weight 'w1' is used by 2 node inputs"}
    assert not report.changed and balanced.graph.node[-1] == model.graph.node[-1]
