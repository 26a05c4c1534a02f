"""Convergence plots: ||W||_{p,q} / ||W0||_{p,q} against the number of updates (Saul 2023, Fig. 2).

A history is the norm at the start and after every sweep of Algorithm 1 (or every accepted step of
a faster solver), as in :attr:`onnxbalance.solver.result.SolveResult.history`; the plot divides by
its first entry, so every curve starts at 1 and, for Algorithm 1, never rises.

matplotlib is optional (the ``plot`` extra) and imported only when a plot is drawn. Figures are
built with ``matplotlib.figure.Figure`` (Agg canvas), never through pyplot: no display is needed
and the caller's pyplot state and backend are left alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MISSING_MATPLOTLIB = "matplotlib is needed for --plot: pip install 'onnxbalance[plot]'"

XLABEL = "solver steps (sweeps of Algorithm 1 for --solver mu)"

Histories = Sequence[float] | Mapping[str, Sequence[float]]


def norm_ratios(history: Sequence[float]) -> np.ndarray:
    """history / history[0]; an all-zero history (nothing to balance) stays at ratio 1.

    >>> norm_ratios([4.0, 3.0, 2.0]).tolist()
    [1.0, 0.75, 0.5]
    """
    values = np.asarray(history, dtype=np.float64)
    if values.size == 0:
        raise ValueError("a convergence history needs at least its starting norm")
    start = values[0]
    return values / start if start > 0 else np.ones_like(values)


def _named(histories: Histories) -> dict[str, Sequence[float]]:
    if isinstance(histories, Mapping):
        return dict(histories)
    return {"": histories}


def new_figure(**kwargs: Any) -> Figure:
    """A matplotlib Figure (Agg canvas, no pyplot), or InputError if matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise InputError(MISSING_MATPLOTLIB) from exc
    return Figure(**kwargs)


def draw_convergence(
    ax: Axes,
    histories: Histories,
    title: str | None = None,
    *,
    log_x: bool = False,
    xlabel: str = XLABEL,
) -> None:
    """Draw one curve per history on ``ax``: x = sweeps or steps (0 = start), y = norm ratio.

    With ``log_x`` the x-axis is symmetric-log (linear between 0 and 1), so the starting
    point at sweep 0 stays visible.
    """
    named = _named(histories)
    for label, history in named.items():
        ratios = norm_ratios(history)
        marker = "o" if ratios.size <= 30 else None  # a few solver steps: show each one
        ax.plot(
            np.arange(ratios.size), ratios, label=label or None, linewidth=1.6, marker=marker,
            markersize=3,
        )  # fmt: skip
    if log_x:
        ax.set_xscale("symlog", linthresh=1.0)
    longest = max(len(history) for history in named.values())
    ax.set_xlim(0, max(longest - 1, 1))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(r"$\|W\|_{p,q} \, / \, \|W_0\|_{p,q}$")
    if title:
        ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if any(named):
        ax.legend(fontsize="small")


def plot_convergence(
    history: Histories,
    path: str | Path,
    title: str | None = None,
    *,
    log_x: bool = False,
    xlabel: str = XLABEL,
) -> Path:
    """Write a PNG of the norm ratio against sweeps for one or several named histories.

    Args:
        history: norms at the start and after every sweep, or a mapping label -> such a list.
        path: where to write the image (format from the suffix; PNG for ``--plot F.png``).
        title: optional axes title.
        log_x: symmetric-log x-axis, for runs of thousands of sweeps.
        xlabel: what one step of the history is.

    Returns:
        The path written.

    Raises:
        InputError: matplotlib is not installed.
        OutputError: the file cannot be written.
    """
    fig = new_figure(figsize=(6.4, 4.2), layout="constrained")
    draw_convergence(fig.subplots(), history, title, log_x=log_x, xlabel=xlabel)
    return save_figure(fig, path)


def image_format(path: str | Path) -> str:
    """The image format the suffix of ``path`` names (png without one).

    Raises:
        InputError: matplotlib is not installed or cannot write that format.
    """
    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    supported = new_figure().canvas.get_supported_filetypes()
    if fmt not in supported:
        raise InputError(
            f"--plot {path}: cannot draw a .{fmt} image; use one of "
            + ", ".join(f".{name}" for name in sorted(supported))
        )
    return fmt


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` the way every output is written (:func:`onnxbalance.io.
    write_bytes`: a rename, so an existing file and its hard links are replaced, never edited
    in place); OutputError naming the file if that fails."""
    from .io import write_bytes

    path = Path(path)
    image = BytesIO()
    fig.savefig(image, format=image_format(path), dpi=dpi)
    write_bytes(path, image.getvalue())
    return path
