"""Algorithm 1 vs scipy L-BFGS-B vs the Newton solver on the same unit graphs.

For each network: passes over the coupling matrices (one pass = one product of every coupling
matrix with a vector, c @ x or c.T @ y; see curvature.py for how block products are counted;
Newton's products with the float32 copies count like float64 ones, and its start point, taken
from the row and column sums that couplings.py computes anyway, counts as two passes),
seconds, and the relative difference of the reached minimum F to Algorithm 1's and to a tight
reference (Newton at tol 1e-13). All three stop on the same test: every factor of an Algorithm-1
sweep from the current point within tol of 1 (for L-BFGS-B checked at every evaluation).

Networks (tests/networks.py, Gaussian weights of variance 2 / fan-in, p = q = 2): ReLU MLPs of
width 128 (input 128, output 10) with 4, 16 and 64 hidden layers; the paper's three networks; and
a ResNet-18-style unit graph built here (3x3 conv couplings summed over the taps, residual Adds
as tied groups).

Then, for the deepest paper network written as an ONNX Gemm MLP: the Newton solve time against
onnx.load + onnx.save of that file (best of several runs of each, interleaved), and the solve's
memory-bound work alone: its coupling summary and the products of its evaluations as bare BLAS
calls, the part of the solve time that no reorganisation of the solver's own logic removes; and
where the time of one solve goes (coupling summary, liveness, objective and workspace set-up,
evaluations with their products, the rest of the Newton logic), each part timed by wrapping its
function while the solve runs.

BLAS runs single-threaded (set before numpy loads): on a shared 2-core machine a threaded BLAS
spins and makes every timing noisy; the same setting applies to every solver and to onnx.

Run: PYTHONPATH=. python benchmarks/solver_compare.py [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import functools  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import ExitStack, contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from networks import PAPER_SIZES, Edge, Network, make_network, paper_networks  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from scipy.optimize import minimize  # noqa: E402

import onnxbalance.solver as solver_package  # noqa: E402
from onnxbalance.solver import (
    newton,  # noqa: E402
    solve,  # noqa: E402
)
from onnxbalance.solver.couplings import summarise_graph  # noqa: E402
from onnxbalance.solver.mu import step_size  # noqa: E402
from onnxbalance.solver.objective import Objective  # noqa: E402
from onnxbalance.solver.products import both_times  # noqa: E402
from onnxbalance.unitgraph import FIXED, Layer, UnitGraph  # noqa: E402

P = Q = 2.0
TOL = 1e-6
MU_TIGHT = 1e-10  # Algorithm 1 run to (near) full convergence, for the last column


def resnet_graph(seed: int = 0) -> UnitGraph:
    """ResNet-18 shape: stem 7x7 conv 3->64, 4 stages x 2 basic blocks (64, 128, 256, 512), a
    1x1 projection where the width changes, FC 512 -> 1000. Each residual Add ties the channels
    of its two inputs (the identity edge does not enter the norm), so the stream of one stage
    is one set of tied groups shared by the stem/projection and both blocks' second convs."""
    rng = np.random.default_rng(seed)
    layers: list[Layer] = []
    n = 0

    def new_groups(width: int) -> np.ndarray:
        nonlocal n
        n += width
        return np.arange(n - width, n)

    def conv(name, rows, cols, taps):
        fan_in = len(cols) * taps
        w = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(len(rows), len(cols), taps))
        layers.append(Layer(name, (np.abs(w) ** P).sum(axis=2), rows, cols))

    stream = new_groups(64)
    conv("stem", stream, np.full(3, FIXED), 49)
    width = 64
    for stage, channels in enumerate((64, 128, 256, 512)):
        for block in range(2):
            name = f"s{stage}b{block}"
            inner = new_groups(channels)
            conv(f"{name}.conv1", inner, stream, 9)
            if channels != width:
                projected = new_groups(channels)
                conv(f"{name}.proj", projected, stream, 1)
                stream, width = projected, channels
            conv(f"{name}.conv2", stream, inner, 9)
    w = rng.normal(0.0, np.sqrt(2.0 / width), size=(1000, width))
    layers.append(Layer("fc", np.abs(w) ** P, np.full(1000, FIXED), stream))
    return UnitGraph(tuple(layers), tuple(f"g{g}" for g in range(n)))


class _Done(Exception):
    pass


def lbfgs(graph: UnitGraph, tol: float) -> tuple[float, int, float]:
    """scipy L-BFGS-B on F(u); stops at the first evaluation that passes Algorithm 1's test."""
    objective = Objective(graph, P, Q)
    eta = step_size(P, Q)
    best = {"value": np.inf}

    def fun(u):
        loads = objective.loads(u)
        if loads.value < best["value"]:
            best["value"] = loads.value
        with np.errstate(divide="ignore"):
            step = eta * (np.log(loads.outgoing) - np.log(loads.incoming))
        if np.all(np.abs(np.expm1(step)) < tol):
            best["value"] = loads.value
            raise _Done
        return loads.value, loads.gradient(Q)

    start = time.perf_counter()
    try:
        minimize(
            fun,
            np.zeros(graph.n_groups),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 100_000, "maxfun": 100_000, "ftol": 0.0, "gtol": 0.0},
        )
    except _Done:
        pass
    return best["value"], objective.passes, time.perf_counter() - start


def timed_solve(graph: UnitGraph, method: str, tol: float = TOL):
    start = time.perf_counter()
    result = solve(graph, P, Q, tol=tol, max_sweeps=200_000, method=method)
    return result, time.perf_counter() - start


def row(name: str, graph: UnitGraph) -> None:
    mu, mu_time = timed_solve(graph, "mu")
    value_lbfgs, passes_lbfgs, time_lbfgs = lbfgs(graph, TOL)
    fast, fast_time = timed_solve(graph, "newton")
    exact = solve(graph, P, Q, tol=1e-13, max_sweeps=10_000, method="newton")
    tight = solve(graph, P, Q, tol=MU_TIGHT, max_sweeps=1_000_000, method="mu")
    f_mu, f_fast, f_exact = mu.norm_after**Q, fast.norm_after**Q, exact.norm_after**Q
    f_tight = tight.norm_after**Q
    print(
        f"{name:38s} {mu.passes:7d} {mu_time:8.2f} | {passes_lbfgs:6d} {time_lbfgs:7.2f} | "
        f"{fast.passes:5d} {fast_time:7.3f} | {mu.passes / fast.passes:7.1f}x "
        f"{(f_fast - f_mu) / f_mu:+9.1e} {(value_lbfgs - f_mu) / f_mu:+9.1e} | "
        f"{(f_mu - f_exact) / f_exact:+8.1e} {(value_lbfgs - f_exact) / f_exact:+8.1e} "
        f"{(f_fast - f_exact) / f_exact:+8.1e} | {(f_fast - f_tight) / f_tight:+8.1e}",
        flush=True,
    )
    if not (mu.converged and fast.converged and tight.converged):
        print(f"    not converged: mu: {mu.message}; newton: {fast.message}; {tight.message}")


def gemm_mlp(net: Network) -> onnx.ModelProto:
    weights = [edge.weight for edge in net.edges]
    nodes, inits, x = [], [], "x"
    for k, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"W{k}"))
        inits.append(numpy_helper.from_array(np.zeros(w.shape[0], np.float32), f"b{k}"))
        nodes.append(helper.make_node("Gemm", [x, f"W{k}", f"b{k}"], [f"z{k}"], transB=1))
        x = f"z{k}"
        if k < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"h{k}"]))
            x = f"h{k}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weights[0].shape[1]])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, weights[-1].shape[0]])],
        inits,
    )
    return helper.make_model(graph)


@contextmanager
def wrapped(owner, name: str, around: Callable[[Callable], Callable]) -> Iterator[None]:
    """``owner.name`` replaced by ``around(original)`` while the block runs."""
    original = getattr(owner, name)
    setattr(owner, name, around(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def evaluation_kinds(graph: UnitGraph) -> tuple[int, int]:
    """How many float32 (steering) and float64 evaluations one Newton solve of ``graph`` makes,
    counted by wrapping newton.evaluate."""
    exact = []

    def counting(original):
        def evaluate(workspace, log_scales, fast=False):
            point = original(workspace, log_scales, fast)
            exact.append(point.exact)
            return point

        return evaluate

    with wrapped(newton, "evaluate", counting):
        solve(graph, P, Q, tol=TOL, method="newton")
    return exact.count(False), exact.count(True)


SOLVE_PARTS = (
    ("coupling summary", solver_package, "summarise_graph"),
    ("liveness", solver_package, "pin_dead_and_cut_off"),
    ("objective", newton, "Objective"),
    ("workspace", newton, "Workspace"),
    ("evaluations", newton, "evaluate"),
)
"""The parts of one Newton solve timed by :func:`solve_parts`; everything else is its other
logic (coarse solve, Hessian models, line searches, stopping tests)."""


def solve_parts(graph: UnitGraph) -> dict[str, float]:
    """Seconds of one Newton solve of ``graph`` in total and per part of SOLVE_PARTS (each
    function wrapped while the solve runs), with ``"other logic"`` for the remainder."""
    seconds = {name: 0.0 for name, _, _ in SOLVE_PARTS}

    def timed(name, original):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start

        return call

    with ExitStack() as stack:
        for name, owner, attribute in SOLVE_PARTS:
            stack.enter_context(wrapped(owner, attribute, functools.partial(timed, name)))
        start = time.perf_counter()
        solve(graph, P, Q, tol=TOL, method="newton")
        total = time.perf_counter() - start
    seconds["other logic"] = total - sum(seconds.values())
    seconds["total"] = total
    return seconds


def products_alone(graph: UnitGraph, single: int, double: int) -> float:
    """Seconds of the solve's memory-bound work without its logic: the coupling summary (one
    read of every float64 coupling, writing the float32 copies), then ``single`` evaluations'
    two products with the copies and ``double`` with the float64 couplings, as the solver makes
    them (products.both_times for r = 1)."""
    start = time.perf_counter()
    couplings = [c for c in summarise_graph(graph) if c.single is not None]
    for _ in range(single):
        for c in couplings:
            np.dot(c.single, np.ones(c.single.shape[1], np.float32))
            np.dot(np.ones(c.single.shape[0], np.float32), c.single)
    for _ in range(double):
        for c in couplings:
            rows, cols = c.matrix.shape
            both_times(c.matrix, np.ones(cols), np.ones(rows), np.zeros(rows), np.zeros(cols))
    return time.perf_counter() - start


def io_versus_solve(net: Network, repeats: int = 7) -> None:
    # The solver sees the weights as stored in the file (float32).
    stored = [Edge(e.src, e.dst, e.weight.astype(np.float32).astype(np.float64)) for e in net.edges]
    graph = Network(net.sizes, tuple(stored), net.biases, net.groups, net.n_groups).unit_graph(P)
    single, double = evaluation_kinds(graph)
    with tempfile.TemporaryDirectory() as folder:
        path, copy = Path(folder) / "mlp.onnx", Path(folder) / "copy.onnx"
        onnx.save(gemm_mlp(net), path)
        io_times, solve_times, floor_times, parts = [], [], [], []
        for _ in range(repeats):
            start = time.perf_counter()
            onnx.save(onnx.load(path), copy)
            io_times.append(time.perf_counter() - start)
            result, elapsed = timed_solve(graph, "newton")
            solve_times.append(elapsed)
            parts.append(solve_parts(graph))
            floor_times.append(products_alone(graph, single, double))
        size = path.stat().st_size / 1e6
    fastest = min(parts, key=lambda seconds: seconds["total"])
    print(
        f"\n{'-'.join(map(str, net.sizes))} as ONNX ({size:.1f} MB): onnx.load + onnx.save "
        f"best {min(io_times) * 1e3:.1f} ms (median {np.median(io_times) * 1e3:.1f}); "
        f"newton solve best {min(solve_times) * 1e3:.1f} ms "
        f"(median {np.median(solve_times) * 1e3:.1f}) incl. liveness and set-up; "
        f"{result.passes} passes, converged={result.converged}; the solve's memory-bound work "
        f"alone (summary, {single} float32 and {double} float64 evaluations' products) best "
        f"{min(floor_times) * 1e3:.1f} ms (median {np.median(floor_times) * 1e3:.1f})"
    )
    print(
        "where the time of the fastest timed-by-parts solve goes, ms: "
        + ", ".join(f"{name} {seconds * 1e3:.2f}" for name, seconds in fastest.items())
    )


def main() -> None:
    quick = "--quick" in sys.argv
    depths = (4, 16) if quick else (4, 16, 64)
    print(f"p = q = {P:g}, tol = {TOL:g}; passes = products of every coupling matrix with a vector")
    print(
        f"{'network':38s} {'mu pass':>7s} {'mu s':>8s} | {'lbfgs':>6s} {'s':>7s} | "
        f"{'newt':>5s} {'s':>7s} | {'mu/newt':>8s} {'dF newt':>9s} {'dF lbfgs':>9s} | "
        f"{'vs exact: mu':>8s} {'lbfgs':>8s} {'newton':>8s} | {'newt-mu*':>8s}"
    )
    print(
        "(dF: relative difference of the reached minimum F to Algorithm 1's at the same tol; "
        "'vs exact': to Newton at tol 1e-13; newt-mu*: Newton at tol 1e-6 vs Algorithm 1 at "
        f"tol {MU_TIGHT:g})"
    )
    for depth in depths:
        net = make_network((128,) * (depth + 1) + (10,), seed=depth, paper_init=True)
        row(f"MLP 128 x {depth}", net.unit_graph(P))
    papers = paper_networks()
    for sizes, net in zip(PAPER_SIZES, papers, strict=True):
        row("paper " + "-".join(map(str, sizes)), net.unit_graph(P))
    row("ResNet-18-style", resnet_graph())
    io_versus_solve(papers[-1])


if __name__ == "__main__":
    main()
