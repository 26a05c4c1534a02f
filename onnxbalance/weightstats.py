"""Per-layer weight statistics that predict how a layer survives per-tensor int8 quantization.

Per-tensor symmetric int8 quantization stores a weight tensor W with one step size

    s = max |W| / 127

so every weight with |w| < s / 2 = max |W| / 254 becomes 0. A unit (row o of the oriented weight
matrix: its incoming weights, kernel taps and flattened positions included) keeps its weights
only if its own range m_o = max_i |W[o, i]| is not far below the tensor's range. Rescaling unit o
by a > 0 multiplies m_o by a, so equivalent networks can have very different per-unit ranges;
balancing moves them towards each other. The statistics here say at a glance how far apart they
are:

    largest       = max_o m_o                      (the per-tensor range)
    spread        = max_o m_o / median_o m_o       (over units with m_o > 0; 1 is ideal)
    lost_int8     = #{o : 0 < m_o < largest / 254} (units whose weights all round to 0)
    zero_units    = #{o : m_o = 0}                 (dead rows; no scale can help them)

Zero rows are counted apart and left out of the median: a dead unit has nothing to quantize, and
counting it would make the spread infinite for a model that quantizes fine. A layer whose rows are
all zero has spread 1. Pure numpy; nothing here knows about ONNX.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

INT8_LEVELS = 127
"""Largest magnitude of a symmetric int8 code; per-tensor scale is max |W| / INT8_LEVELS."""


@dataclass(frozen=True)
class LayerStats:
    """Range statistics of one layer's weights (rows = units)."""

    name: str
    units: int
    largest: float
    median_unit_max: float
    spread: float
    lost_int8: int
    zero_units: int

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def unit_max(weight_rows_first: np.ndarray) -> np.ndarray:
    """Per-unit max |w|: the largest magnitude in each row, all other axes flattened.

    >>> unit_max(np.array([[1.0, -3.0], [0.5, 0.0]])).tolist()
    [3.0, 0.5]
    """
    weight = np.asarray(weight_rows_first)
    if weight.dtype not in _EXACT_FLOATS:
        weight = weight.astype(np.float64)
    if weight.ndim == 0:
        raise ValueError("weight must have a unit axis (rows first); got a scalar")
    rows = weight.reshape(weight.shape[0], -1)
    if rows.shape[1] == 0:
        return np.zeros(rows.shape[0])
    # max |w| = max(max w, -min w), exact in the weight's own float type: no |W| temporary and
    # no float64 copy of the layer.
    largest = np.maximum(rows.max(axis=1), -rows.min(axis=1))
    return largest.astype(np.float64)


_EXACT_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def layer_stats(name: str, weight_rows_first: np.ndarray) -> LayerStats:
    """Statistics of one layer whose weight array has the units along its first axis.

    A Gemm/MatMul weight must be oriented (out, in) first; conv weights (out, in, kh, kw) are
    already rows first. Non-finite weights give non-finite statistics (the solver rejects them).

    >>> s = layer_stats("fc", np.array([[2.0, 0.0], [0.0, -0.001], [0.0, 0.0], [1.0, 1.0]]))
    >>> (s.largest, s.median_unit_max, s.spread, s.lost_int8, s.zero_units)
    (2.0, 1.0, 2.0, 1, 1)
    """
    maxima = unit_max(weight_rows_first)
    live = maxima[maxima > 0]
    largest = float(maxima.max()) if maxima.size else 0.0
    if live.size == 0:
        median, spread = 0.0, 1.0
    else:
        median = float(np.median(live))
        spread = largest / median
    lost = int(np.count_nonzero(live < largest / (2 * INT8_LEVELS)))
    return LayerStats(
        name=name,
        units=int(maxima.size),
        largest=largest,
        median_unit_max=median,
        spread=float(spread),
        lost_int8=lost,
        zero_units=int(maxima.size - live.size),
    )


def format_stats_table(
    before: Sequence[LayerStats], after: Sequence[LayerStats] | None = None
) -> str:
    """A plain-text table of per-layer statistics, before (and after) balancing.

    Layers are matched by position; ``after`` must list the same layers in the same order.
    """
    header = f"{'layer':<24} {'units':>5} {'max|w|':>10} {'spread':>10} {'lost@int8':>9}"
    if after is not None:
        if len(after) != len(before):
            raise ValueError("before and after must list the same layers")
        header += f"   {'max|w|':>10} {'spread':>10} {'lost@int8':>9}"
    lines = [header]
    for i, b in enumerate(before):
        line = f"{b.name[:24]:<24} {b.units:>5} {b.largest:>10.3g} {b.spread:>10.3g}"
        line += f" {b.lost_int8:>9}"
        if after is not None:
            a = after[i]
            line += f"   {a.largest:>10.3g} {a.spread:>10.3g} {a.lost_int8:>9}"
        lines.append(line)
    return "\n".join(lines)
