"""Reproduce Fig. 2 of Saul (TMLR 2023): Algorithm 1 on three random ReLU networks.

For each of the paper's networks (sample_models.generate: 200-2500-1250-10,
200-2000-1000-500-250-10, 200-1000-750-750-500-500-250-10; zero biases, W ~ N(0, 2/fan_in))
and each (p, q), run Algorithm 1 (``solve(..., method="mu")``: parallel multiplicative updates,
eta = 1/(4q) or (p-q)/p^2) from the weights as initialised and record

    ||W_t||_{p,q} / ||W_0||_{p,q}      after t = 0, 1, 2, ... sweeps

until every factor of a sweep is within ``tol`` of 1 or ``max_sweeps`` is reached. The models
go through the tool's own path: ONNX file -> analysis -> unit graph -> solver.

Writes docs/fig2.png (one panel per network, one curve per (p, q)) and docs/fig2.csv (every
plotted point: network, layers, p, q, sweep, norm, norm_ratio). Usage, from the repo root::

    python -m benchmarks.fig2 [--outdir docs] [--max-sweeps 5000] [--tol 1e-6]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxbalance.analysis import analyse
from onnxbalance.plot import draw_convergence, new_figure, norm_ratios, save_figure
from onnxbalance.solver import solve
from sample_models.generate import DEFAULT_OUTDIR, PAPER_NETWORKS, SPECS, write

PAIRS: tuple[tuple[float, float], ...] = ((1, 1), (1, 2), (2, 1), (2, 2), (3, 2), (2, 3))
XLABELS = {"mu": "sweeps of multiplicative updates (log scale)"}
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Curve:
    """One run of Algorithm 1: the norms at the start and after every sweep."""

    network: str
    sizes: tuple[int, ...]
    p: float
    q: float
    history: tuple[float, ...]
    converged: bool
    seconds: float

    @property
    def sweeps(self) -> int:
        return len(self.history) - 1

    @property
    def label(self) -> str:
        return f"p={self.p:g}, q={self.q:g}"


def convergence(
    model: onnx.ModelProto,
    network: str,
    sizes: Sequence[int],
    pairs: Iterable[tuple[float, float]] = PAIRS,
    *,
    tol: float = 1e-6,
    max_sweeps: int = 5000,
    solver: str = "mu",
) -> list[Curve]:
    """Run the solver (Algorithm 1 unless told otherwise) once per (p, q); return the curves."""
    units = analyse(model)
    curves = []
    for p, q in pairs:
        start = time.perf_counter()
        result = solve(units.unit_graph(p), p, q, tol=tol, max_sweeps=max_sweeps, method=solver)
        curves.append(
            Curve(
                network,
                tuple(sizes),
                float(p),
                float(q),
                tuple(result.history),
                result.converged,
                time.perf_counter() - start,
            )
        )
    return curves


def write_csv(curves: Sequence[Curve], path: Path) -> None:
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["network", "layers", "p", "q", "sweep", "norm", "norm_ratio"])
        for curve in curves:
            layers = "-".join(map(str, curve.sizes))
            for sweep, (norm, ratio) in enumerate(
                zip(curve.history, norm_ratios(curve.history), strict=True)
            ):
                out.writerow(
                    [curve.network, layers, f"{curve.p:g}", f"{curve.q:g}", sweep]
                    + [repr(float(norm)), repr(float(ratio))]
                )


def draw(
    curves: Sequence[Curve], path: Path, *, tol: float, max_sweeps: int, solver: str = "mu"
) -> None:
    """One panel per network, one curve per (p, q); legend entries give the final ratio."""
    networks = list(dict.fromkeys(curve.network for curve in curves))
    fig = new_figure(figsize=(5.2 * len(networks), 4.8), layout="constrained")
    axes = fig.subplots(1, len(networks), sharex=True, sharey=True, squeeze=False)[0]
    for ax, network in zip(axes, networks, strict=True):
        mine = [curve for curve in curves if curve.network == network]
        histories = {}
        for curve in mine:
            end = f"{norm_ratios(curve.history)[-1]:.3f}"
            stop = f"{curve.sweeps} sweeps" if curve.converged else f"cap {curve.sweeps}"
            histories[f"{curve.label}: {end} ({stop})"] = curve.history
        sizes = mine[0].sizes
        title = f"{'-'.join(map(str, sizes))}\n({len(sizes) - 2} hidden layers)"
        draw_convergence(ax, histories, title, log_x=True, xlabel=XLABELS.get(solver, "steps"))
        if ax is not axes[0]:
            ax.set_ylabel("")
    axes[0].set_xlim(0, max(curve.sweeps for curve in curves))  # shared: deeper needs more
    method = "Algorithm 1 (multiplicative updates)" if solver == "mu" else f"solver {solver!r}"
    fig.suptitle(
        f"{method} on random ReLU networks, after Saul (2023) Fig. 2\n"
        "norm ratio after each sweep, from the initial weights until every factor of a sweep is"
        f" within {tol:g} of 1 (cap {max_sweeps} sweeps)"
    )
    save_figure(fig, path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fig2", description=__doc__)
    parser.add_argument("--outdir", type=Path, default=REPO / "docs")
    parser.add_argument("--models", type=Path, default=DEFAULT_OUTDIR, help="where the ONNX go")
    parser.add_argument("--max-sweeps", type=int, default=5000)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--solver", default="mu", help="mu = Algorithm 1, the paper's method")
    parser.add_argument("--networks", nargs="+", choices=list(SPECS), default=PAPER_NETWORKS)
    args = parser.parse_args(argv)

    args.outdir.mkdir(parents=True, exist_ok=True)
    curves: list[Curve] = []
    total = time.perf_counter()
    for network in args.networks:
        model = onnx.load(write(network, args.models))
        runs = convergence(
            model,
            network,
            SPECS[network].sizes,
            tol=args.tol,
            max_sweeps=args.max_sweeps,
            solver=args.solver,
        )
        for curve in runs:
            ratio = norm_ratios(curve.history)[-1]
            print(
                f"{network} p={curve.p:g} q={curve.q:g}: {curve.sweeps} sweeps "
                f"({'converged' if curve.converged else 'NOT converged'}), "
                f"ratio {ratio:.6f}, {curve.seconds:.1f} s",
                flush=True,
            )
            curves.append(curve)
    write_csv(curves, args.outdir / "fig2.csv")
    draw(
        curves,
        args.outdir / "fig2.png",
        tol=args.tol,
        max_sweeps=args.max_sweeps,
        solver=args.solver,
    )
    print(f"wrote {args.outdir / 'fig2.png'} and fig2.csv in {time.perf_counter() - total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
