"""Algorithm 1 of Saul (2023): parallel multiplicative updates (docs/algorithm.md §4, §6).

Every sweep updates all movable groups at once,

    a_g <- a_g * (out_g / in_g)^eta,   eta = 1 / (4 q)       if q >= p / 2
                                       eta = (p - q) / p^2  if q <  p / 2

kept in the log domain as u_g <- u_g + eta (log out_g - log in_g), where in_g and out_g are the
group sums of the loads (Objective.loads). The update minimises a separable upper bound of F that
touches F at the current point, so F never increases. The solve stops when every factor of the
last sweep satisfies |a_g - 1| < tol, or after ``max_sweeps`` sweeps (then not converged).

Each sweep costs one call to Objective.loads: two passes over every coupling matrix. The loads
after the last step give the final norm, so a solve of k sweeps costs 2 (k + 1) passes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np

from ..unitgraph import UnitGraph
from .couplings import Coupling
from .objective import Objective, imbalance, movable_groups
from .result import SolveResult

logger = logging.getLogger(__name__)


def step_size(p: float, q: float) -> float:
    """The exponent eta of Algorithm 1 that keeps every update monotone."""
    return 1.0 / (4.0 * q) if q >= p / 2.0 else (p - q) / (p * p)


def solve_mu(
    graph: UnitGraph,
    p: float,
    q: float,
    *,
    tol: float,
    max_sweeps: int,
    progress: Callable[[int, float], None] | None = None,
    couplings: tuple[Coupling, ...] | None = None,
) -> SolveResult:
    """Run Algorithm 1 on ``graph`` (dead and cut-off groups already FIXED).

    Returns a SolveResult with ``pinned=()``; :func:`onnxbalance.solver.solve` fills it in.
    Raises ValueError for NaN or infinite couplings (naming the layer) or bad p, q.
    """
    objective = Objective(graph, p, q, couplings)
    eta = step_size(objective.p, objective.q)
    movable = movable_groups(graph)
    # A slice when every group moves (the usual case) avoids copying the loads each sweep.
    selected = slice(None) if movable.all() else np.flatnonzero(movable)
    log_scales = np.zeros(graph.n_groups)
    loads = objective.loads(log_scales)
    imbalance_before = imbalance(loads.incoming, loads.outgoing, movable)
    history = [objective.norm(loads.value)]
    sweeps = 0
    largest = float("nan")  # largest |factor - 1| of the last sweep
    converged = not movable.any()
    message = "nothing to balance: no movable scale groups" if converged else ""
    while not converged and sweeps < max_sweeps:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            step = np.log(loads.outgoing[selected] / loads.incoming[selected])
        step *= eta
        high, low = float(step.max()), float(step.min())
        if not (math.isfinite(high) and math.isfinite(low)):
            bad = graph.group_names[int(np.flatnonzero(movable)[~np.isfinite(step)][0])]
            message = f"stopped after {sweeps} sweeps: the loads of group {bad!r} under/overflowed"
            logger.warning(message)
            break
        log_scales[selected] += step
        loads = objective.loads(log_scales)
        sweeps += 1
        history.append(objective.norm(loads.value))
        if progress is not None:
            progress(sweeps, history[-1])
        # expm1 is monotone: the largest |factor - 1| sits at the largest or smallest step.
        largest = max(math.expm1(high), -math.expm1(low))
        if largest < tol:
            converged = True
            message = f"converged in {sweeps} sweeps: every factor within {tol:g} of 1"
    if not converged and not message:
        message = (
            f"did not converge in {max_sweeps} sweeps: largest factor change of the last sweep "
            f"{largest:.3g} (tolerance {tol:g}); raise max_sweeps or tol"
        )
    logger.debug("mu: %s", message)
    return SolveResult(
        log_scales=log_scales,
        norm_before=history[0],
        norm_after=history[-1],
        sweeps=sweeps,
        passes=objective.passes,
        converged=converged,
        message=message,
        history=tuple(history),
        pinned=(),
        solver="mu",
        p=objective.p,
        q=objective.q,
        imbalance_before=imbalance_before,
        imbalance_after=imbalance(loads.incoming, loads.outgoing, movable),
    )
