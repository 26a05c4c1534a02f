"""Find the log-scales of the scale groups that minimise ||W||_{p,q} (numpy only, never onnx).

Every method minimises the same convex objective F(u) = ||W||_{p,q}^q over log-scales u
(:class:`Objective`). :func:`solve` first pins dead and cut-off groups at u = 0 (they have no
finite optimum, see :mod:`.liveness`), then runs the chosen method on what is left.

A method is a function ``(graph, p, q, *, tol, max_sweeps, progress, couplings) -> SolveResult``
in a module of this package; it receives the graph with pinned groups already FIXED and the
layers' checked couplings (couplings.py, computed once per solve), must leave every group that
no layer maps to at u = 0, and returns ``pinned=()`` (solve fills it). Registering one is a
single line in ``_METHODS``: ``"name": "module:function"``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import numpy as np

from ..unitgraph import UnitGraph
from .couplings import check_power_range, collapse_fixed_rows, summarise_graph
from .liveness import pin_dead_and_cut_off
from .objective import Objective
from .result import PinnedGroup, SolveResult

__all__ = ["Objective", "PinnedGroup", "SolveResult", "methods", "solve"]

Progress = Callable[[int, float], None]

_METHODS: dict[str, str] = {
    "newton": "newton:solve_newton",
    "mu": "mu:solve_mu",
}


def methods() -> tuple[str, ...]:
    """Names accepted by ``solve(method=...)``."""
    return tuple(_METHODS)


def _method(name: str) -> Callable[..., SolveResult]:
    if name not in _METHODS:
        raise ValueError(f"unknown solver method {name!r}; choose one of {', '.join(_METHODS)}")
    module, function = _METHODS[name].split(":")
    return getattr(importlib.import_module(f".{module}", __name__), function)


def solve(
    graph: UnitGraph,
    p: float = 2.0,
    q: float = 2.0,
    *,
    tol: float = 1e-6,
    max_sweeps: int = 10_000,
    method: str = "newton",
    progress: Progress | None = None,
) -> SolveResult:
    """Log-scales of every scale group minimising ||W||_{p,q}, with dead/cut-off groups at 0.

    Args:
        graph: the unit graph (coupling matrices built for this ``p``).
        p, q: the norm's exponents, both > 0.
        tol: stop when every factor of the last sweep (or step) is within ``tol`` of 1.
        max_sweeps: give up after this many sweeps (``converged=False``, not an error).
        method: a name from :func:`methods`.
        progress: called as ``progress(step, norm)`` after every sweep or accepted step.

    Returns:
        A :class:`SolveResult`; ``pinned`` lists the groups left at scale 1 and why.

    Raises:
        ValueError: NaN, infinite or too large couplings, or a norm beyond float64 (the
            message names the layer); p or q not positive, tol not positive, max_sweeps
            negative, or an unknown method.
    """
    run = _method(method)
    if not (p > 0 and q > 0 and np.isfinite(p) and np.isfinite(q)):
        raise ValueError(f"p and q must be positive and finite, got p={p}, q={q}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if max_sweeps < 0:
        raise ValueError(f"max_sweeps must be >= 0, got {max_sweeps}")
    # checks every matrix (ValueError naming the layer); only Newton steers with float32 copies
    couplings = summarise_graph(graph, single=method == "newton", copy_fixed_rows=p != q)
    check_power_range(graph, couplings, p, q)
    live_graph, pinned = pin_dead_and_cut_off(graph, couplings)
    if p == q:
        live_graph, couplings = collapse_fixed_rows(live_graph, couplings)
    result = run(
        live_graph,
        float(p),
        float(q),
        tol=tol,
        max_sweeps=max_sweeps,
        progress=progress,
        couplings=couplings,
    )
    log_scales = np.array(result.log_scales, dtype=np.float64)
    log_scales[[group.group for group in pinned]] = 0.0
    return dataclasses.replace(result, log_scales=log_scales, pinned=pinned, solver=method)
