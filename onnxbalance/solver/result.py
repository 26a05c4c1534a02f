"""The record every solver returns.

Not converging is data (``converged``, ``message``), not an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PinnedGroup:
    """A scale group left at scale 1 by the solver, and why (dead or cut off)."""

    group: int
    name: str
    reason: str


@dataclass(frozen=True)
class SolveResult:
    """Log-scale of every group (0 for pinned groups) and how the solve went.

    ``history`` holds ||W||_{p,q} at the start and after every sweep (Algorithm 1) or accepted
    step (faster solvers), so ``history[0] == norm_before`` and ``history[-1] == norm_after``.
    ``passes`` counts matrix-vector products with every coupling matrix (c @ x or c.T @ y).
    ``imbalance_before`` and ``imbalance_after`` are max |in_g - out_g| / (in_g + out_g) over
    the groups that move (objective.imbalance), from the solver's own float64 loads.
    """

    log_scales: np.ndarray
    norm_before: float
    norm_after: float
    sweeps: int
    passes: int
    converged: bool
    message: str
    history: tuple[float, ...]
    pinned: tuple[PinnedGroup, ...]
    solver: str
    p: float
    q: float
    imbalance_before: float
    imbalance_after: float

    @property
    def scales(self) -> np.ndarray:
        return np.exp(self.log_scales)
