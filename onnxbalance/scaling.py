"""Apply log-scales to plain arrays: the function-preserving rescaling of docs/algorithm.md §1.

With u the log-scale of each unit (0 for fixed units),

    W[o, i] <- W[o, i] * exp(u_o - u_i)        b[o] <- b[o] * exp(u_o)

The exponent is formed before exponentiating, so scales of 1e±200 on both sides of a weight never
overflow. Arithmetic is float64; results come back in the input's dtype. Pure numpy, no ONNX.
"""

from __future__ import annotations

import numpy as np

from .unitgraph import FIXED


def unit_log_scales(group_log_scales: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Log-scale of every unit: its group's log-scale, or 0 for FIXED units (any shape).

    >>> unit_log_scales(np.array([0.5, -1.0]), np.array([1, FIXED, 0])).tolist()
    [-1.0, 0.0, 0.5]
    """
    groups = np.asarray(groups, dtype=np.int64)
    padded = np.append(np.asarray(group_log_scales, dtype=np.float64), 0.0)
    return padded[np.where(groups == FIXED, -1, groups)]


def scale_tensor(
    tensor: np.ndarray,
    *,
    row_axis: int | None = None,
    row_log_scales: np.ndarray | None = None,
    col_axis: int | None = None,
    col_log_scales: np.ndarray | None = None,
) -> np.ndarray:
    """``tensor * exp(u_row - u_col)`` along the given axes, in the tensor's dtype.

    ``row_log_scales`` has one entry per index along ``row_axis``; ``col_log_scales`` one per
    index along ``col_axis``, or shape (len along row_axis, len along col_axis) when the column
    unit depends on the row (grouped convolutions).
    """
    array = np.asarray(tensor)
    exponent = np.zeros([1] * array.ndim)
    if row_axis is not None and row_log_scales is not None:
        shape = [1] * array.ndim
        shape[row_axis] = -1
        exponent = exponent + np.asarray(row_log_scales, np.float64).reshape(shape)
    if col_axis is not None and col_log_scales is not None:
        cols = np.asarray(col_log_scales, np.float64)
        shape = [1] * array.ndim
        if cols.ndim == 2:
            if row_axis is None:
                raise ValueError("2-D column log-scales need a row axis")
            shape[row_axis], shape[col_axis] = cols.shape
            if row_axis > col_axis:  # reshape keeps memory order: put the earlier axis first
                cols = cols.T
        else:
            shape[col_axis] = -1
        exponent = exponent - cols.reshape(shape)
    scaled = array.astype(np.float64) * np.exp(exponent)
    return scaled.astype(array.dtype, copy=False)


def scale_weight(
    weight: np.ndarray, row_log_scales: np.ndarray, col_log_scales: np.ndarray
) -> np.ndarray:
    """W[o, i] * exp(u_o - u_i) for a (rows, cols) matrix; cols may be 1-D or (rows, cols)."""
    return scale_tensor(
        weight, row_axis=0, row_log_scales=row_log_scales, col_axis=1, col_log_scales=col_log_scales
    )


def scale_bias(bias: np.ndarray, row_log_scales: np.ndarray) -> np.ndarray:
    """b[o] * exp(u_o)."""
    return scale_tensor(bias, row_axis=0, row_log_scales=row_log_scales)
