"""Report records: JSON form, per-layer fixed entries, and the summary table."""

from __future__ import annotations

import json
import math

import pytest
from rich.console import Console

from onnxbalance.report import (
    Comparison,
    OutputComparison,
    Report,
    fixed_entries,
    shortfall_text,
    summary_table,
)

REQUIRED = {
    "p", "q", "norm_before", "norm_after", "sweeps", "converged", "units_balanced",
    "units_fixed", "verify", "seconds", "solver", "passes", "history",
}  # fmt: skip


def _report(**changes) -> Report:
    comparison = Comparison(
        outputs=(OutputComparison("y", "float32", (1, 3), 2e-7, 1e-7, 1e-5, 1e-5, True),),
        n_inputs=1,
        seed=0,
    )
    fields = dict(
        p=2.0, q=2.0, tol=1e-6, solver="mu", norm_before=10.0, norm_after=8.0, sweeps=12,
        passes=26, converged=True, message="converged", units_found=7, units_balanced=5,
        units_fixed=fixed_entries([("gemm2", 2, "feeds Sigmoid")]),
        history=(1.0, 0.9, 0.8), verify=comparison, seconds={"load": 0.1, "solve": 0.2},
    )  # fmt: skip
    fields.update(changes)
    return Report(**fields)


def test_fixed_entries_merge_per_layer_and_reason():
    entries = fixed_entries(
        [("a", 2, "dead"), ("b", 1, "output"), ("a", 3, "dead"), ("a", 1, "cut off")]
    )
    assert [(e.name, e.count, e.reason) for e in entries] == [
        ("a", 5, "dead"),
        ("b", 1, "output"),
        ("a", 1, "cut off"),
    ]


def test_to_dict_has_the_documented_keys_and_is_json():
    data = json.loads(json.dumps(_report().to_dict()))
    assert REQUIRED <= set(data)
    assert data["units_fixed"] == [{"name": "gemm2", "count": 2, "reason": "feeds Sigmoid"}]
    assert set(data["verify"]) >= {"passed", "max_abs_diff", "max_rel_diff", "n_inputs"}
    assert data["verify"]["passed"] is True and data["verify"]["n_inputs"] == 1
    assert data["seconds"] == {"load": 0.1, "solve": 0.2}
    assert data["history"] == [1.0, 0.9, 0.8]
    assert math.isclose(data["norm_ratio"], 0.8)


def test_json_keys_are_the_python_names():
    """Every scalar of the JSON report is the Report attribute of the same name, same value."""
    report = _report()
    data = report.to_dict()
    for key, value in data.items():
        if key == "layers":  # the per-layer pairs of layers_before and layers_after
            continue
        assert hasattr(report, key), key
        if isinstance(value, bool | int | float | str):
            assert value == pytest.approx(getattr(report, key)), key


def test_non_finite_values_become_null():
    data = _report(norm_before=float("nan"), history=(1.0, float("inf"))).to_dict()
    text = json.dumps(data, allow_nan=False)  # would raise on NaN/Infinity
    assert json.loads(text)["norm_before"] is None


def test_skipped_verification_is_null():
    assert _report(verify=None).to_dict()["verify"] is None


def test_balanced_means_small_relative_gap():
    assert not _report().input_balanced  # 20% lower norm available
    assert _report(norm_after=10.0 * (1 - 1e-9)).input_balanced
    assert _report(units_balanced=0, norm_after=10.0).input_balanced  # nothing can move


def test_comparison_fails_if_any_output_fails_or_none_compared():
    good = OutputComparison("a", "float32", (1,), 0.0, 0.0, 1e-5, 0.0, True)
    bad = OutputComparison("b", "float32", (1,), 1.0, 1.0, 1e-5, 0.0, False, "differs")
    assert Comparison((good,), 1, 0).passed
    assert not Comparison((good, bad), 1, 0).passed
    assert Comparison((good, bad), 1, 0).failures == (bad,)
    assert not Comparison((), 1, 0).passed


def _render(table) -> str:
    console = Console(width=120, record=True)
    console.print(table)
    return console.export_text()


def test_summary_table_rows():
    text = _render(summary_table(_report()))
    needles = ("units found", "7", "units balanced", "units left fixed", "norm before",
               "norm after", "0.800000", "12 sweeps", "PASSED", "seconds total",
               "seconds solve")  # fmt: skip
    for needle in needles:
        assert needle in text
    assert "feeds Sigmoid" not in text
    assert "feeds Sigmoid" in _render(summary_table(_report(), verbose=True))


def test_summary_table_nothing_to_balance():
    text = _render(summary_table(_report(units_balanced=0, units_found=0, verify=None)))
    assert "nothing to balance" in text and "norm before" not in text


def test_the_shortfall_warning_names_the_options_that_may_free_units():
    fixed = fixed_entries(
        [
            ("conv1", 6, "feeds Clip 'x--y', which ... (--rescale-clip moves them with the units)"),
            ("conv2", 3, "weight 'w' is also a graph input (... --drop-weight-inputs makes ...)"),
            ("conv3", 4, "tied by a merge to units of 'conv1', which are fixed: feeds Clip "
                         "'c' ... (--rescale-clip moves them with the units)"),
            ("conv4", 5, "feeds Sigmoid 'a--b'"),
        ]
    )  # fmt: skip
    report = _report(units_found=20, units_balanced=2, units_fixed=fixed)
    assert shortfall_text(report) == (
        "only 2 of 20 units found balanced (10%; --verbose says why the others are fixed; "
        "--rescale-clip may free 10; --drop-weight-inputs may free 3)"
    )
    assert shortfall_text(_report(units_found=3, units_balanced=0, units_fixed=fixed[:1])) == (
        "nothing balanced: all 3 units found are fixed (--verbose says why; --rescale-clip may "
        "free 6)"
    )
    assert shortfall_text(_report(units_found=3, units_balanced=3)) == ""
