"""Speed of Algorithm 1 (method "mu") on the paper's Fig. 2 networks.

Prints, per network: the time of one sweep divided by the time of the raw numpy products
c @ x and c.T @ y over the same full coupling matrices (measured in the same run, interleaved,
minimum and median; a sweep needs exactly those two products per layer, so the target is
<= 1.5), and the sweeps and seconds to tol = 1e-6 for several (p, q).

    PYTHONPATH=. python benchmarks/solver_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from networks import PAPER_SIZES, paper_networks  # noqa: E402

from onnxbalance.solver import solve  # noqa: E402

EXPONENTS = ((1.0, 1.0), (2.0, 2.0), (1.0, 2.0), (2.0, 1.0))


def best_of(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def raw_products(graph):
    """c @ x and c.T @ y for every layer's full coupling matrix: the floor for one sweep."""
    rng = np.random.default_rng(0)
    mats = [np.ascontiguousarray(layer.coupling) for layer in graph.layers]
    xs = [rng.random(c.shape[1]) for c in mats]
    ys = [rng.random(c.shape[0]) for c in mats]

    def run():
        for c, x, y in zip(mats, xs, ys, strict=True):
            c @ x
            c.T @ y

    return run


def sweep_times(graph, p: float, q: float, sweeps: int) -> list[float]:
    """Wall time of each sweep of one solve, from the progress callback's timestamps."""
    stamps: list[float] = []
    solve(
        graph,
        p,
        q,
        method="mu",
        tol=1e-300,
        max_sweeps=sweeps,
        progress=lambda step, norm: stamps.append(time.perf_counter()),
    )
    return list(np.diff(stamps))


def per_sweep_cost(graph, rounds: int = 20) -> tuple[float, float, float, float]:
    """(sweep, raw) seconds as the minimum and the median over interleaved rounds, so that
    load from other processes hits both alike."""
    raw_run = raw_products(graph)
    raw, sweep = [], []
    for _ in range(rounds):
        for _ in range(10):
            start = time.perf_counter()
            raw_run()
            raw.append(time.perf_counter() - start)
        sweep += sweep_times(graph, 2.0, 2.0, 11)
    return min(sweep), min(raw), float(np.median(sweep)), float(np.median(raw))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only (p, q) = (2, 2)")
    args = parser.parse_args()
    exponents = ((2.0, 2.0),) if args.quick else EXPONENTS
    nets = paper_networks()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average {load} on {os.cpu_count()} cores (minimums are the figures to trust)")
    print("Per-sweep cost (p = q = 2): one sweep / (c @ x + c.T @ y over all layers)")
    print(
        f"{'network':<38}{'sweep ms':>10}{'raw ms':>8}{'ratio':>7}"
        f"{'median sweep':>14}{'median raw':>12}{'ratio':>7}{'setup ms':>10}"
    )
    for sizes, net in zip(PAPER_SIZES, nets, strict=True):
        graph = net.unit_graph(2.0)
        sweep, raw, sweep_med, raw_med = per_sweep_cost(graph)
        setup = best_of(lambda g=graph: solve(g, tol=1e-300, max_sweeps=0, method="mu"), 3)
        name = "-".join(map(str, sizes))
        print(
            f"{name:<38}{sweep * 1e3:>10.2f}{raw * 1e3:>8.2f}{sweep / raw:>7.2f}"
            f"{sweep_med * 1e3:>14.2f}{raw_med * 1e3:>12.2f}{sweep_med / raw_med:>7.2f}"
            f"{setup * 1e3:>10.1f}"
        )
    print()
    print("Sweeps and seconds to tol = 1e-6 (max 10000 sweeps)")
    print(
        f"{'network':<38}{'p':>5}{'q':>5}{'sweeps':>8}{'seconds':>9}"
        f"{'converged':>11}{'norm after/before':>19}"
    )
    for sizes, net in zip(PAPER_SIZES, nets, strict=True):
        name = "-".join(map(str, sizes))
        for p, q in exponents:
            graph = net.unit_graph(p)
            start = time.perf_counter()
            result = solve(graph, p, q, tol=1e-6, max_sweeps=10_000, method="mu")
            seconds = time.perf_counter() - start
            ratio = result.norm_after / result.norm_before
            print(
                f"{name:<38}{p:>5g}{q:>5g}{result.sweeps:>8}{seconds:>9.2f}"
                f"{str(result.converged):>11}{ratio:>19.6f}"
            )


if __name__ == "__main__":
    main()
