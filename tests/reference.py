"""An independent implementation of the balancing objective, minimised by scipy's L-BFGS-B.

Built straight from raw weight matrices (no coupling matrices, no onnxbalance.solver): each
layer is (W, row_groups, col_groups) with one group index per row / raw column, FIXED (-1) for
units of scale 1. With log-scales u,

    log rho_o = logsumexp_i ( p log|W[o, i]| + p (u_o - u_i) )
    log F     = logsumexp_o ( (q / p) log rho_o )

log F is convex in u with the same minimiser as F, and its gradient is computed by hand:
d log F / d u_o = q w_o for a live row o and d log F / d u_i = -q sum_o w_o s_oi, where w is the
softmax of the row terms and s_oi the softmax within row o. Working in logs keeps weights of
1e-30..1e30 and scales far from 1 representable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from onnxbalance.unitgraph import FIXED


def _unit_u(theta_full: np.ndarray, groups: np.ndarray) -> np.ndarray:
    groups = np.asarray(groups)
    return np.where(groups == FIXED, 0.0, theta_full[np.maximum(groups, 0)])


def _row_terms(layers, u, p):
    """Per layer: the matrix T[o, i] of log terms and log rho_o."""
    out = []
    for weight, rows, cols in layers:
        with np.errstate(divide="ignore"):
            log_c = p * np.log(np.abs(np.asarray(weight, dtype=np.float64)))
        terms = log_c + p * (_unit_u(u, rows)[:, None] - _unit_u(u, cols)[None, :])
        out.append((terms, logsumexp(terms, axis=1)))
    return out


def log_objective(layers, u, p, q) -> tuple[float, np.ndarray]:
    """log F(u) and its gradient with respect to every group's log-scale."""
    r = q / p
    per_layer = _row_terms(layers, u, p)
    row_logs = np.concatenate([log_rho for _, log_rho in per_layer])
    live = np.isfinite(row_logs)
    log_f = float(logsumexp(r * row_logs[live]))
    grad = np.zeros_like(u)
    for (terms, log_rho), (_, rows, cols) in zip(per_layer, layers, strict=True):
        ok = np.isfinite(log_rho)
        w = np.where(ok, np.exp(r * np.where(ok, log_rho, 0.0) - log_f), 0.0)
        s = np.where(ok[:, None], np.exp(terms - np.where(ok, log_rho, 0.0)[:, None]), 0.0)
        row_grad = q * w
        col_grad = -q * (w @ s)
        rows, cols = np.asarray(rows), np.asarray(cols)
        np.add.at(grad, rows[rows != FIXED], row_grad[rows != FIXED])
        np.add.at(grad, cols[cols != FIXED], col_grad[cols != FIXED])
    return log_f, grad


def objective(layers, u, p, q) -> float:
    """F(u) = ||W rescaled by exp(u)||_{p,q}^q (inf where it exceeds float64)."""
    with np.errstate(over="ignore"):
        return float(np.exp(log_objective(layers, np.asarray(u, dtype=np.float64), p, q)[0]))


def loads(layers, n_groups, u, p, q) -> tuple[np.ndarray, np.ndarray]:
    """(in_g, out_g) straight from their definitions (docs/algorithm.md §3, §6); inf where a load
    exceeds float64."""
    r = q / p
    incoming, outgoing = np.zeros(n_groups), np.zeros(n_groups)
    for (terms, log_rho), (_, rows, cols) in zip(_row_terms(layers, u, p), layers, strict=True):
        ok = np.isfinite(log_rho)
        with np.errstate(over="ignore"):
            rho_in = np.where(ok, np.exp(r * np.where(ok, log_rho, 0.0)), 0.0)
            back = np.where(
                ok[:, None], np.exp((r - 1.0) * np.where(ok, log_rho, 0.0)[:, None] + terms), 0.0
            ).sum(axis=0)
        rows, cols = np.asarray(rows), np.asarray(cols)
        np.add.at(incoming, rows[rows != FIXED], rho_in[rows != FIXED])
        np.add.at(outgoing, cols[cols != FIXED], back[cols != FIXED])
    return incoming, outgoing


@dataclass(frozen=True)
class Minimum:
    value: float  # F at the minimiser
    norm: float  # ||W||_{p,q} = F^(1/q)
    log_scales: np.ndarray  # per group, 0 for pinned and unused groups
    success: bool
    message: str


def minimise(layers, n_groups, p, q, *, pinned=(), x0=None) -> Minimum:
    """Minimise F over the log-scales of every group not in ``pinned`` (those stay at 0)."""
    free = np.zeros(n_groups, dtype=bool)
    for _, rows, cols in layers:
        for groups in (np.asarray(rows), np.asarray(cols)):
            free[groups[groups != FIXED]] = True
    free[list(pinned)] = False
    index = np.flatnonzero(free)

    def fun(theta):
        u = np.zeros(n_groups)
        u[index] = theta
        value, grad = log_objective(layers, u, p, q)
        return value, grad[index]

    if index.size == 0:  # nothing to optimise
        log_f = log_objective(layers, np.zeros(n_groups), p, q)[0]
        return Minimum(float(np.exp(log_f)), float(np.exp(log_f / q)), np.zeros(n_groups), True, "")
    start = np.zeros(index.size) if x0 is None else np.asarray(x0, dtype=np.float64)[index]
    result = minimize(
        fun,
        start,
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 100_000, "maxcor": 50},
    )
    u = np.zeros(n_groups)
    u[index] = result.x
    log_f = float(result.fun)
    return Minimum(
        float(np.exp(log_f)), float(np.exp(log_f / q)), u, bool(result.success), str(result.message)
    )
