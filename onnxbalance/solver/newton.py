"""A faster exact solver: Newton-type steps on the log-scales with a pass-free Hessian model.

It minimises the same convex F(u) = ||W||_{p,q}^q as Algorithm 1 (docs/algorithm.md §3-7) on the
same unit graph, tied and pinned groups included, and stops on the same test.

Start: F and the loads at u = 0 come from the row and column sums of the couplings
(couplings.py, curvature.start). Then u moves to the exact minimiser of F over the per-layer
scales (curvature.py: the coarse space, solved without further passes; for r = 1 the new point's
loads follow without a pass too): in a deep network that is the slow, strongly nonlinear part
that Algorithm 1 needs thousands of sweeps for. Then each iteration at u, with gradient
g = q (in - out):

1. Direction d = -M^-1 g with M the Hessian model of lowrank.py: the diagonal plus one
   rank-one term per layer, built from the loads at u (no pass) and inverted exactly. It agrees
   with the Hessian on per-layer constant vectors and, on dense layers, is accurate to a few per
   cent elsewhere, so the steps converge linearly at a rate of a few per cent per step. If the
   model is not positive definite, or its step fails, d solves H d = -g inexactly by conjugate
   gradients (H v costs two passes; Jacobi plus per-layer coarse preconditioner; relative
   residual target min(1/2, sqrt(max |eta log(out/in)|))).
2. Backtracking line search from step 1: accept the first step with
   F(u + a d) <= F(u) + 1e-4 a g.d (Armijo), so F strictly decreases. Trial points are full
   evaluations (two passes), so the accepted one already carries the next gradient.
3. If no direction gives a step, take one step of Algorithm 1 instead: u_g += eta log(out_g /
   in_g). Its auxiliary-function argument guarantees that F does not increase, so every accepted
   step is monotone.

Float32 phase: while the layers have float32 copies (couplings.py) and the scales are moderate,
the trial points of steps 1-2 multiply with the copies (evaluate(fast=True), about 1e-7 relative
error in every load). Such points only steer: they are never accepted steps. The phase ends when
its loads pass the stopping test (at max(tol, FAST_TOL)), when its F can no longer resolve a
step, or when, at the rate of its last step, the next point should pass the stopping test with
room to spare (that point is then evaluated in float64 directly). Its end point is evaluated in
float64 and accepted as one step only if F decreased from the last accepted point (or, at the
round-off level, F stayed and the imbalance shrank); otherwise the phase is dropped and the solve
continues in float64 from that point. Acceptance, the reported norms and the stopping test
therefore always use float64 loads.

Round-off: once the predicted decrease -g.d is below the resolution of the computed F (about
64 eps |log F| relative), F values no longer order the points; a step is then accepted if F stays
within that resolution and Algorithm 1's imbalance max_g |log(out_g / in_g)| shrinks. Algorithm 1
itself is monotone only up to the same round-off.

Stopping: converged when every group's Algorithm-1 factor a_g = (out_g / in_g)^eta satisfies
|a_g - 1| < tol at the current (float64) point, exactly the test that ends Algorithm 1, so both
solvers stop on the same tolerance.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..unitgraph import UnitGraph
from . import lowrank
from .couplings import Coupling
from .curvature import Curvature
from .mu import step_size
from .objective import Objective, imbalance, movable_groups
from .points import Point, evaluate, start
from .result import SolveResult
from .workspace import Workspace

logger = logging.getLogger(__name__)

ARMIJO = 1e-4
MAX_BACKTRACKS = 30
ROUND_OFF = 64 * np.finfo(float).eps
# The float32 phase: its loads carry about 1e-7 relative error, so it stops at this factor
# tolerance (or tol if larger), when its F cannot resolve the predicted decrease, or after
# this many steps; its end point is then certified in float64.
FAST_TOL = 1e-6
FAST_RESOLUTION = 1e-6
MAX_FAST_STEPS = 100
# The float32 phase evaluates its next point in float64 directly when, at the rate of its last
# step, that point's imbalance should be below this share of the one the stopping test allows.
FINAL_MARGIN = 0.5
MODEL_REUSE = 1e-2  # the Hessian model is rebuilt once p max |u - u_model| reaches this


def resolution(value: float) -> float:
    """Relative round-off of a computed F: a sum of many exp(r log rho_o), and exp(x) carries
    a relative error of about |x| eps, so the resolution grows with |log F|."""
    return ROUND_OFF * max(1.0, abs(float(np.log(value)))) if value > 0 else ROUND_OFF


@dataclass(frozen=True)
class NewtonOutcome:
    """What :func:`minimise` found; the dispatcher turns it into a SolveResult."""

    log_scales: np.ndarray
    converged: bool
    iterations: int  # accepted steps
    cg_iterations: int
    mu_fallbacks: int
    values: tuple[float, ...]  # F at the start and after every accepted step
    message: str
    imbalance_before: float  # objective.imbalance at the start and at the end
    imbalance_after: float


def _conjugate_gradients(
    curvature: Curvature, rhs: np.ndarray, rtol: float, max_iter: int
) -> tuple[np.ndarray, int]:
    """Approximately solve H x = rhs; stops early on non-positive curvature."""
    x = np.zeros_like(rhs)
    residual = rhs.copy()
    z = curvature.precondition(residual)
    direction = z.copy()
    rz = float(residual @ z)
    target = rtol * np.sqrt(max(rz, 0.0))
    for iteration in range(1, max_iter + 1):
        h_direction = curvature.matvec(direction)
        curvature_along = float(direction @ h_direction)
        if not curvature_along > 0:
            return (x if iteration > 1 else z), iteration
        alpha = rz / curvature_along
        x += alpha * direction
        residual -= alpha * h_direction
        z = curvature.precondition(residual)
        rz_new = float(residual @ z)
        if np.sqrt(max(rz_new, 0.0)) <= target:
            return x, iteration
        direction = z + (rz_new / rz) * direction
        rz = rz_new
    return x, max_iter


def _spread(point: Point, workspace: Workspace) -> float:
    """max_g |log(out_g / in_g)|: Algorithm 1's stopping measure, scale-free per group."""
    return _spread_of(*_extremes(point.log_ratio[workspace.movable]))


def _line_search(
    workspace: Workspace, point: Point, direction: np.ndarray, slope: float, fast: bool = False
) -> Point | None:
    """First point along ``direction`` (steps 1, then shrinking) that satisfies Armijo.

    When the predicted decrease -slope is below the resolution of F (round-off), comparing F
    values says nothing; then the full step is taken if F stays within its resolution and the
    imbalance max_g |log(out_g / in_g)| shrinks (in exact arithmetic such a Newton step
    decreases F), else None. With ``fast`` the trial points use the float32 copies and the
    resolution is theirs (FAST_RESOLUTION).
    """
    step = 1.0
    level = FAST_RESOLUTION if fast else resolution(point.value)
    at_round_off = -slope <= level * point.value
    for _ in range(MAX_BACKTRACKS):
        moved = point.log_scales + step * direction
        if np.array_equal(moved, point.log_scales):
            return None
        trial = evaluate(workspace, moved, fast)
        if at_round_off:
            same = trial.value <= point.value * (1.0 + level)
            shrinks = _spread(trial, workspace) < _spread(point, workspace)
            return trial if same and shrinks else None
        if np.isfinite(trial.value):
            if trial.value <= point.value + ARMIJO * step * slope:
                return trial
            # minimiser of the quadratic through F(0), F'(0), F(step), kept in [0.1, 0.5] step
            excess = trial.value - point.value - step * slope
            shrink = -slope * step / (2.0 * excess) if excess > 0 else 0.5
            step *= min(0.5, max(0.1, shrink))
        else:
            step *= 0.1
    return None


class _Models:
    """The last Hessian model and where it was built. Near the minimum the steps shrink below
    MODEL_REUSE in p max |u - u'|: every term t_oi of the loads the model is built from has
    then moved by less than 2%, less than the model's own error of a few per cent (lowrank.py),
    and the model of the last point serves again."""

    def __init__(self, p: float) -> None:
        self.p = p
        self.built: tuple[np.ndarray, lowrank.Model | None] | None = None

    def at(self, curvature: Curvature) -> lowrank.Model | None:
        log_scales = curvature.point.log_scales
        if self.built is not None:
            where, model = self.built
            if model is not None and self.p * np.max(np.abs(log_scales - where)) < MODEL_REUSE:
                return model
        model = curvature.model()
        self.built = (log_scales, model)
        return model


def _direction(
    curvature: Curvature,
    gradient: np.ndarray,
    forcing: float,
    max_cg: int,
    counts: dict[str, int],
    models: _Models,
) -> tuple[np.ndarray, bool]:
    """-M^-1 g with the Hessian model of lowrank.py, or (model not positive definite) the
    inexact Newton direction by preconditioned CG; and whether the model gave it."""
    model = models.at(curvature)
    if model is not None:
        counts["model"] += 1
        return -model.solve(gradient), True
    return _cg_direction(curvature, gradient, forcing, max_cg, counts), False


def _cg_direction(
    curvature: Curvature,
    gradient: np.ndarray,
    forcing: float,
    max_cg: int,
    counts: dict[str, int],
) -> np.ndarray:
    curvature.build_coarse()
    direction, used = _conjugate_gradients(curvature, -gradient, forcing, max_cg)
    counts["cg"] += used
    return direction


def minimise(
    objective: Objective,
    movable: np.ndarray,
    *,
    tol: float = 1e-6,
    max_steps: int = 10_000,
    max_cg: int = 50,
    progress: Callable[[int, float], None] | None = None,
) -> NewtonOutcome:
    """Minimise F over the movable groups from u = 0 (the other groups stay at 0).

    Args:
        objective: F(u) on the unit graph; its ``passes`` counter is advanced honestly.
        movable: boolean mask of the groups that may move.
        tol: Algorithm 1's tolerance delta on the per-group factors.
        max_steps: accepted steps before giving up (reported as not converged).
        max_cg: conjugate-gradient iterations per Newton iteration.
        progress: optional callable(step, ||W||_{p,q}) after every accepted step.

    Returns:
        The log-scales, whether the stopping test passed, and F after every accepted step.
    """
    workspace = Workspace(objective, movable)
    movable = workspace.movable
    eta = step_size(objective.p, objective.q)
    point = start(workspace)
    certified = point  # the last accepted point (exact F and loads)
    imbalance_before = imbalance(point.incoming, point.outgoing, movable)
    values = [point.value]
    counts = {"cg": 0, "fallback": 0, "model": 0, "fast": 0}
    fast = workspace.has_single  # the float32 phase (module docstring)
    models = _Models(objective.p)

    def outcome(converged: bool, message: str) -> NewtonOutcome:
        return NewtonOutcome(
            certified.log_scales,
            converged,
            len(values) - 1,
            counts["cg"],
            counts["fallback"],
            tuple(values),
            message,
            imbalance_before,
            imbalance(certified.incoming, certified.outgoing, movable),
        )

    def accept(trial: Point) -> None:
        nonlocal point, certified
        point = certified = trial
        values.append(point.value)
        if progress is not None:
            progress(len(values) - 1, objective.norm(point.value))

    def end_fast_phase() -> None:
        """Certify the float32 phase's end point in float64 as one step, or drop the phase."""
        nonlocal point, fast
        fast = False
        if point is certified:
            return
        exact = evaluate(workspace, point.log_scales)
        if _certifies(exact, certified, workspace):
            accept(exact)
        else:
            point = certified

    first = True
    selected = slice(None) if movable.all() else np.flatnonzero(movable)
    previous = np.inf  # spread (max |log(out/in)|) at the previous point of the float32 phase
    final_target = FINAL_MARGIN * np.log1p(tol) / eta  # spread that surely passes the test
    anything_moves = bool(movable.any())
    while True:
        ratio = point.log_ratio[selected]
        high, low = _extremes(ratio)
        spread = _spread_of(high, low)
        finite = spread < np.inf
        target = max(tol, FAST_TOL) if fast else tol
        if not anything_moves or (finite and _factors_within(high, low, eta, target)):
            if fast:
                end_fast_phase()
                continue
            return outcome(
                True,
                f"converged in {len(values) - 1} steps: every factor of an "
                f"Algorithm-1 sweep within {tol:g} of 1",
            )
        if len(values) - 1 >= max_steps:
            return outcome(False, f"did not converge in {max_steps} steps; raise max_sweeps or tol")
        if fast and counts["fast"] >= MAX_FAST_STEPS:
            end_fast_phase()
            continue
        curvature = Curvature(workspace, point)
        if first:
            # The per-layer scales are the slow, strongly nonlinear part: solve them exactly.
            first = False
            shift = curvature.coarse_minimiser()
            if np.any(shift):
                trial = curvature.shifted_point() or evaluate(
                    workspace, point.log_scales + shift, fast
                )
                if trial.value < point.value:
                    if fast and not trial.exact:
                        point = trial
                        counts["fast"] += 1
                    else:
                        accept(trial)
                    continue
        gradient = np.zeros(objective.n_groups)
        gradient[selected] = objective.q * (point.incoming[selected] - point.outgoing[selected])
        forcing = min(0.5, float(np.sqrt(eta * spread))) if finite else 0.5
        direction, modelled = _direction(curvature, gradient, forcing, max_cg, counts, models)
        slope = float(gradient @ direction)
        if fast:
            # Linear convergence at the rate of the last step: if the next point should pass
            # the stopping test with room to spare, evaluate it in float64 straight away.
            predicted = spread * min(spread / previous, 1.0) if previous < np.inf else np.inf
            previous = spread
            if slope < 0 and modelled and predicted < final_target:
                trial = evaluate(workspace, point.log_scales + direction)
                fast = False
                if _certifies(trial, certified, workspace):
                    accept(trial)
                else:
                    end_fast_phase()
                continue
        trial = _line_search(workspace, point, direction, slope, fast) if slope < 0 else None
        if trial is None and modelled and not fast:
            # The model's step failed: the inexact Newton step by CG before Algorithm 1's.
            direction = _cg_direction(curvature, gradient, forcing, max_cg, counts)
            slope = float(gradient @ direction)
            trial = _line_search(workspace, point, direction, slope) if slope < 0 else None
        if fast:
            if trial is None:
                end_fast_phase()
            else:
                point = trial
                counts["fast"] += 1
            continue
        if trial is None:
            # Algorithm 1's step cannot raise F: the check only allows for the round-off in F.
            counts["fallback"] += 1
            mu_step = np.zeros(objective.n_groups)
            mu_step[selected] = np.where(np.isfinite(ratio), eta * ratio, 0.0)
            trial = evaluate(workspace, point.log_scales + mu_step)
            if not trial.value <= point.value * (1.0 + resolution(point.value)):
                return outcome(False, "stalled: no step decreases the norm (round-off level)")
        accept(trial)
        logger.debug("newton step %d: F=%.17g %s", len(values) - 1, point.value, counts)


def _extremes(ratio: np.ndarray) -> tuple[float, float]:
    """The largest and the smallest entry (0, 0 if there are none)."""
    if not ratio.size:
        return 0.0, 0.0
    return float(ratio.max()), float(ratio.min())


def _spread_of(high: float, low: float) -> float:
    """max |log(out/in)| from its largest and smallest value; inf if either is not finite (a
    NaN shows in both)."""
    return max(high, -low) if np.isfinite(high) and np.isfinite(low) else np.inf


def _factors_within(high: float, low: float, eta: float, tol: float) -> bool:
    """Algorithm 1's test |exp(eta log(out/in)) - 1| < tol for every group, given the largest
    and the smallest log(out/in) (expm1 is monotone: the extreme ratios decide)."""
    return max(np.expm1(eta * high), -np.expm1(eta * low)) < tol


def _certifies(exact: Point, certified: Point, workspace: Workspace) -> bool:
    """Whether the float64 point ``exact`` may follow ``certified`` as an accepted step: F
    decreases, or (within the round-off of F) stays and the imbalance shrinks."""
    limit = certified.value * (1.0 + resolution(certified.value))
    return exact.value <= limit and (
        exact.value < certified.value or _spread(exact, workspace) < _spread(certified, workspace)
    )


def solve_newton(
    graph: UnitGraph,
    p: float,
    q: float,
    *,
    tol: float,
    max_sweeps: int,
    progress: Callable[[int, float], None] | None = None,
    couplings: tuple[Coupling, ...] | None = None,
) -> SolveResult:
    """Run the Newton solver on ``graph`` (dead and cut-off groups already FIXED).

    ``max_sweeps`` bounds the number of accepted steps. Returns a SolveResult with
    ``pinned=()``; :func:`onnxbalance.solver.solve` fills it in.
    """
    objective = Objective(graph, p, q, couplings)
    found = minimise(
        objective, movable_groups(graph), tol=tol, max_steps=max_sweeps, progress=progress
    )
    history = tuple(objective.norm(value) for value in found.values)
    logger.debug(
        "newton: %s (%d passes, %d CG iterations)",
        found.message,
        objective.passes,
        found.cg_iterations,
    )
    return SolveResult(
        log_scales=found.log_scales,
        norm_before=history[0],
        norm_after=history[-1],
        sweeps=found.iterations,
        passes=objective.passes,
        converged=found.converged,
        message=found.message,
        history=history,
        pinned=(),
        solver="newton",
        p=objective.p,
        q=objective.q,
        imbalance_before=found.imbalance_before,
        imbalance_after=found.imbalance_after,
    )
