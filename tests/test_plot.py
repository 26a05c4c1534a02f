"""plot_convergence: a real PNG of the norm ratios, clear errors without matplotlib or a target."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from onnxbalance.errors import InputError, OnnxBalanceError, OutputError
from onnxbalance.plot import (
    MISSING_MATPLOTLIB,
    draw_convergence,
    new_figure,
    norm_ratios,
    plot_convergence,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HISTORY = [8.0, 6.0, 5.0, 4.5, 4.25, 4.2]


def test_norm_ratios_divide_by_the_start():
    np.testing.assert_allclose(norm_ratios(HISTORY), np.array(HISTORY) / 8.0)
    np.testing.assert_array_equal(norm_ratios([0.0, 0.0]), [1.0, 1.0])
    with pytest.raises(ValueError):
        norm_ratios([])


@pytest.mark.parametrize("history", [HISTORY, {"p=2, q=2": HISTORY, "p=1, q=1": [3.0, 2.0, 1.5]}])
def test_plot_convergence_writes_a_png(tmp_path, history):
    path = plot_convergence(history, tmp_path / "convergence.png", title="mlp.onnx")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000  # axes, labels and a curve, not an empty canvas


def test_curves_are_the_norm_ratios_against_sweeps():
    fig = new_figure()
    ax = fig.subplots()
    draw_convergence(ax, {"a": HISTORY, "b": [2.0, 1.0]}, "t", log_x=True)
    (a, b) = ax.get_lines()
    np.testing.assert_array_equal(a.get_xdata(), np.arange(len(HISTORY)))
    np.testing.assert_allclose(a.get_ydata(), np.array(HISTORY) / HISTORY[0])
    np.testing.assert_allclose(b.get_ydata(), [1.0, 0.5])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title() == "t"


def test_missing_matplotlib_is_a_usage_error(tmp_path, monkeypatch):
    # None in sys.modules makes ``import matplotlib...`` raise ImportError, as if not installed.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(InputError) as info:
        plot_convergence(HISTORY, tmp_path / "x.png")
    assert str(info.value) == MISSING_MATPLOTLIB
    assert "pip install 'onnxbalance[plot]'" in str(info.value)
    assert isinstance(info.value, OnnxBalanceError) and info.value.exit_code == 2
    assert not (tmp_path / "x.png").exists()


def test_unwritable_target_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match="missing"):
        plot_convergence(HISTORY, tmp_path / "missing" / "x.png")
