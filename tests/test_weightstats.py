"""Per-layer weight statistics on hand-made weights."""

from __future__ import annotations

import doctest
import json
import math

import numpy as np
import pytest

from onnxbalance import weightstats
from onnxbalance.weightstats import layer_stats, unit_max


def test_doctests() -> None:
    assert doctest.testmod(weightstats).failed == 0


def test_hand_made_matrix() -> None:
    # unit maxima 4, 0.5, 2, 1e-3, 8 -> median 2, largest 8; 8/254 = 0.0315 > 1e-3
    w = np.array(
        [
            [4.0, -1.0, 0.0],
            [0.25, -0.5, 0.1],
            [0.0, 0.0, -2.0],
            [1e-3, 0.0, 0.0],
            [-8.0, 7.0, 1.0],
        ],
        dtype=np.float32,
    )
    s = layer_stats("fc1", w)
    assert s.name == "fc1"
    assert s.units == 5
    assert s.largest == pytest.approx(8.0)
    assert s.median_unit_max == pytest.approx(2.0)
    assert s.spread == pytest.approx(4.0)
    assert s.lost_int8 == 1
    assert s.zero_units == 0


def test_lost_threshold_is_half_an_int8_step() -> None:
    # step = 254 / 127 = 2; a unit whose max is just below step / 2 = 1 rounds to zero
    below = layer_stats("a", np.array([[254.0], [0.999]]))
    above = layer_stats("b", np.array([[254.0], [1.001]]))
    assert below.lost_int8 == 1
    assert above.lost_int8 == 0


def test_zero_rows_are_counted_apart_and_skip_the_median() -> None:
    w = np.array([[0.0, 0.0], [3.0, 1.0], [0.0, 0.0], [1.0, -1.0], [0.0, -2.0]])
    s = layer_stats("z", w)
    assert s.zero_units == 2
    assert s.units == 5
    assert s.median_unit_max == pytest.approx(2.0)  # median of 3, 1, 2
    assert s.spread == pytest.approx(1.5)
    assert s.lost_int8 == 0
    assert math.isfinite(s.spread)


def test_all_zero_layer() -> None:
    s = layer_stats("dead", np.zeros((3, 4)))
    assert (s.largest, s.median_unit_max, s.spread, s.lost_int8, s.zero_units) == (
        0.0,
        0.0,
        1.0,
        0,
        3,
    )


def test_conv_weight_is_flattened_per_output_channel() -> None:
    w = np.zeros((2, 3, 3, 3))
    w[0, 2, 1, 1] = -5.0
    w[1, 0, 0, 2] = 0.5
    np.testing.assert_allclose(unit_max(w), [5.0, 0.5])
    s = layer_stats("conv", w)
    assert s.spread == pytest.approx(5.0 / 2.75)


def test_rescaling_units_changes_spread_but_not_a_uniform_scale() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 8))
    base = layer_stats("w", w)
    uniform = layer_stats("w", 10.0 * w)
    assert uniform.spread == pytest.approx(base.spread)
    assert uniform.largest == pytest.approx(10.0 * base.largest)
    factors = np.ones(16)
    factors[0] = 1e3
    skewed = layer_stats("w", factors[:, None] * w)
    assert skewed.spread > 100 * base.spread
    assert skewed.lost_int8 >= 1


def test_to_dict_is_json_ready() -> None:
    d = layer_stats("fc", np.array([[1.0, 2.0], [0.5, 0.0]])).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) == {
        "name",
        "units",
        "largest",
        "median_unit_max",
        "spread",
        "lost_int8",
        "zero_units",
    }
    assert all(type(v) in (str, int, float) for v in d.values())


def test_scalar_is_rejected() -> None:
    with pytest.raises(ValueError):
        layer_stats("s", np.float32(1.0))
