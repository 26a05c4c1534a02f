"""The Fig. 2 reproduction: Algorithm 1's recorded curves fall monotonically to the true optimum.

Networks come from the sample-model generator's own code path (Gaussian layers -> ONNX Gemm/Relu
chain) and go through the script's path (ONNX -> analysis -> solve(method="mu")). The optimum
they must reach is computed independently by tests/reference.py (scipy L-BFGS-B on log F(u))
from the generator's raw weight matrices, with hidden units grouped here by hand.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
from reference import minimise

from benchmarks import fig2
from onnxbalance.unitgraph import FIXED
from sample_models.generate import SPECS, gaussian_layers, mlp_model, spec_layers, unbalance

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL = {
    "two_hidden": ((20, 50, 25, 4), 11),
    "six_hidden": ((12, 24, 18, 18, 12, 12, 8, 3), 12),
}


def reference_layers(layers):
    """(W, row groups, column groups) per layer: one group per hidden unit, FIXED elsewhere."""
    out, previous, offset = [], np.full(layers[0][0].shape[1], FIXED), 0
    for k, (weight, _) in enumerate(layers):
        if k == len(layers) - 1:
            rows = np.full(weight.shape[0], FIXED)
        else:
            rows = np.arange(offset, offset + weight.shape[0])
            offset += weight.shape[0]
        out.append((weight, rows, previous))
        previous = rows
    return out, offset


def check_curve(curve, layers):
    history = np.asarray(curve.history)
    assert curve.converged, (curve.network, curve.p, curve.q)
    assert len(history) == curve.sweeps + 1 > 2
    # Algorithm 1 never raises the norm; allow only float rounding once it has converged.
    assert np.all(np.diff(history) <= 1e-12 * history[:-1]), (curve.p, curve.q)
    assert history[-1] < history[0]
    ref_layers, n_groups = reference_layers(layers)
    optimum = minimise(ref_layers, n_groups, curve.p, curve.q)
    assert optimum.success, optimum.message
    assert history[-1] == pytest.approx(optimum.norm, rel=1e-6), (curve.p, curve.q)


@pytest.mark.parametrize("name", list(SMALL))
def test_every_curve_is_non_increasing_and_ends_at_the_independent_optimum(name):
    sizes, seed = SMALL[name]
    layers = gaussian_layers(sizes, seed)
    curves = fig2.convergence(mlp_model(layers, name), name, sizes, tol=1e-6, max_sweeps=20_000)
    assert [(c.p, c.q) for c in curves] == [(float(p), float(q)) for p, q in fig2.PAIRS]
    for curve in curves:
        check_curve(curve, layers)


def test_unevenly_scaled_network_converges_to_the_same_optimum():
    """Rescaling the hidden units first changes the start, not where Algorithm 1 ends."""
    sizes, seed = SMALL["two_hidden"]
    drawn = gaussian_layers(sizes, seed)
    skewed = unbalance(drawn, 3.0, seed=5)
    (curve,) = fig2.convergence(mlp_model(skewed, "skewed"), "skewed", sizes, pairs=[(2, 3)])
    check_curve(curve, skewed)
    (plain,) = fig2.convergence(mlp_model(drawn, "drawn"), "drawn", sizes, pairs=[(2, 3)])
    assert curve.history[-1] == pytest.approx(plain.history[-1], rel=1e-6)
    assert curve.history[0] > 2 * plain.history[0]


def test_one_paper_network_at_full_size():
    spec = SPECS["paper_a"]
    layers = spec_layers(spec)
    model = mlp_model(layers, spec.name)
    (curve,) = fig2.convergence(model, spec.name, spec.sizes, pairs=[(2, 2)])
    check_curve(curve, layers)


def test_script_writes_every_plotted_point_and_a_png(tmp_path):
    assert (
        fig2.main(["--networks", "mlp", "--outdir", str(tmp_path), "--models", str(tmp_path)]) == 0
    )
    with (tmp_path / "fig2.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["p"], r["q"]) for r in rows} == {(f"{p:g}", f"{q:g}") for p, q in fig2.PAIRS}
    assert {r["network"] for r in rows} == {"mlp"} and rows[0]["layers"] == "16-64-32-4"
    for p, q in fig2.PAIRS:
        mine = [r for r in rows if (r["p"], r["q"]) == (f"{p:g}", f"{q:g}")]
        assert [int(r["sweep"]) for r in mine] == list(range(len(mine)))
        norms = np.array([float(r["norm"]) for r in mine])
        ratios = np.array([float(r["norm_ratio"]) for r in mine])
        np.testing.assert_allclose(ratios, norms / norms[0], rtol=1e-15)
    png = (tmp_path / "fig2.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 20_000
