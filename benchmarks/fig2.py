"""Reproduce Fig. 2 of Saul (TMLR 2023): Algorithm 1 on three random ReLU networks.

For each of the paper's networks (sample_models.generate: 200-2500-1250-10,
200-2000-1000-500-250-10, 200-1000-750-750-500-500-250-10; zero biases, W ~ N(0, 2/fan_in))
and each (p, q), run Algorithm 1 (``solve(..., method="mu")``: parallel multiplicative updates,
eta = 1/(4q) or (p-q)/p^2) from the weights as initialised and record

    ||W_t||_{p,q} / ||W_0||_{p,q}      after t = 0, 1, 2, ... sweeps

until every factor of a sweep is within ``tol`` of 1 or ``max_sweeps`` is reached. The models
go through the tool's own path: ONNX file -> analysis -> unit graph -> solver.

Writes docs/fig2.png (one panel per network, one curve per (p, q) labelled with its final
ratio, and a panel of sweeps to convergence against depth) and docs/fig2.csv (every plotted
point: network, layers, p, q, sweep, norm, norm_ratio). About 15 s of CPU on one idle core
(dominated by the 18 solves; up to ~90 s wall on a busy 2-core machine). Usage, from the repo
root::

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
        return f"({self.p:g}, {self.q:g})"


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
    """One panel per network (one curve per (p, q), legend = final ratio and sweeps), and a last
    panel with the sweeps each run took against depth.

    Two columns, so that the figure keeps legible text at README width.
    """
    networks = list(dict.fromkeys(curve.network for curve in curves))
    n_rows = (len(networks) + 2) // 2
    fig = new_figure(figsize=(11.0, 4.3 * n_rows), layout="constrained")
    axes = list(fig.subplots(n_rows, 2, squeeze=False).ravel())
    panels, summary = axes[: len(networks)], axes[len(networks)]
    xlabel = XLABELS.get(solver, "steps")
    for ax, network in zip(panels, networks, strict=True):
        mine = [curve for curve in curves if curve.network == network]
        histories = {curve.label: curve.history for curve in mine}
        draw_convergence(ax, histories, _network_title(mine[0].sizes), log_x=True, xlabel=xlabel)
        ax.get_legend().remove()  # the curves are labelled at their ends instead
        _label_ends(ax, mine)
        if ax is not panels[0]:
            ax.sharex(panels[0])
            ax.sharey(panels[0])
    # one x-range for all (deeper needs more sweeps), with room on the right for the end labels
    panels[0].set_xlim(0, 15 * max(curve.sweeps for curve in curves))
    _draw_sweeps(summary, curves, networks, "sweeps" if solver == "mu" else "steps")
    for ax in axes[len(networks) + 1 :]:
        ax.set_visible(False)
    method = "Algorithm 1 (multiplicative updates)" if solver == "mu" else f"solver {solver!r}"
    fig.suptitle(
        f"{method} on random ReLU networks, after Saul (2023) Fig. 2\n"
        "labels: (p, q) and final norm ratio; stop when all factors of a sweep are within"
        f" {tol:g} of 1 (cap {max_sweeps} sweeps)"
    )
    save_figure(fig, path, dpi=100)


def _label_ends(ax, curves: Sequence[Curve], min_gap: float = 0.045) -> None:
    """Write "(p, q) final ratio" right of each curve's last point, nudged apart vertically."""
    ends = sorted((norm_ratios(c.history)[-1], k) for k, c in enumerate(curves))
    placed: list[float] = []
    for ratio, _ in ends:
        placed.append(max(ratio, placed[-1] + min_gap) if placed else ratio)
    shift = max(0.0, placed[-1] - 0.97) if placed else 0.0  # keep the top label inside
    lines = ax.get_lines()
    for y, (ratio, k) in zip(placed, ends, strict=True):
        curve = curves[k]
        ax.annotate(
            f"{curve.label}  {ratio:.3f}",
            xy=(curve.sweeps, ratio),
            xytext=(curve.sweeps * 1.15 + 0.5, y - shift),
            color=lines[k].get_color(),
            fontsize=9,
            va="center",
        )


def _network_title(sizes: Sequence[int]) -> str:
    return f"{'-'.join(map(str, sizes))}  ({len(sizes) - 2} hidden layers)"


def _draw_sweeps(ax, curves: Sequence[Curve], networks: Sequence[str], unit: str) -> None:
    """Sweeps (or solver steps) to convergence against the number of hidden layers."""
    depth = {c.network: len(c.sizes) - 2 for c in curves}
    order = sorted(networks, key=depth.__getitem__)
    for label in dict.fromkeys(curve.label for curve in curves):
        runs = {c.network: c for c in curves if c.label == label}
        xs = [depth[n] for n in order if n in runs]
        ax.plot(xs, [runs[n].sweeps for n in order if n in runs], marker="o", label=label)
    ax.set_ylim(bottom=0)
    ax.set_xticks(sorted(set(depth.values())))
    ax.set_xlabel("hidden layers (3750 hidden units in every network)")
    ax.set_ylabel(f"{unit} until converged")
    ax.set_title(f"deeper networks need more {unit}" if unit == "sweeps" else f"{unit}, by depth")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9, title="(p, q)", title_fontsize=9)


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
    unit = "sweeps" if args.solver == "mu" else "steps"
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
                f"{network} p={curve.p:g} q={curve.q:g}: {curve.sweeps} {unit} "
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
