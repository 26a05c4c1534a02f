"""Cost of balancing against depth: plain chains of small Gemm+Relu layers (4x4 weights).

Per depth, in a fresh process each (so that its peak RSS is its own): the time of the solve
stage and of the whole in-memory run (load, analyse, solve, rewrite; no verification), and the
process's peak RSS. Targets: 2000 layers solve in at most 2 s, 5000 layers in at most 5 s with
a peak RSS under 300 MB, the solve time linear in depth. Then:

- ``--solver mu`` at 2000 layers (a bounded number of sweeps: its per-sweep cost is what grows
  with depth, not the sweeps it needs),
- the minimum reached on a shallower chain against Algorithm 1 driven to tol 1e-11 (relative
  difference of the norms, target 1e-9),
- how fast SIGTERM ends a CLI run on the deepest chain, sent while it solves (target: within a
  second).

Run: PYTHONPATH=. python benchmarks/depth.py [--quick | --depths 250 500]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxbalance

# the children import the onnxbalance this process imports (PYTHONPATH, not the current folder)
PACKAGE_ROOT = str(Path(onnxbalance.__file__).resolve().parent.parent)
HERE = str(Path(__file__).resolve().parent)

WIDTH = 4
DEPTHS = (250, 500, 1000, 2000, 5000)
QUICK_DEPTHS = (250, 1000, 2000)
SHALLOW = 24  # Algorithm 1 needs many sweeps per digit on a chain: keep the comparison short


def chain(depth: int, width: int = WIDTH, seed: int = 0) -> onnx.ModelProto:
    """Gemm+Relu x depth (no Relu after the last Gemm), Gaussian weights with a random
    per-layer scale so that the balanced scales differ from layer to layer."""
    rng = np.random.default_rng(seed)
    nodes, weights = [], []
    x = "x"
    for k in range(depth):
        w = rng.normal(size=(width, width)) * np.exp(rng.normal(0.0, 0.5))
        weights.append(numpy_helper.from_array(w.astype(np.float32), f"w{k}"))
        weights.append(numpy_helper.from_array(rng.normal(size=width).astype(np.float32), f"b{k}"))
        out = f"h{k}"
        nodes.append(helper.make_node("Gemm", [x, f"w{k}", f"b{k}"], [out], f"fc{k}", transB=1))
        if k < depth - 1:
            nodes.append(helper.make_node("Relu", [out], [f"r{k}"], f"relu{k}"))
            out = f"r{k}"
        x = out
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, width])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def run_one(depth: int, solver: str | None, max_sweeps: int) -> dict:
    """One in-memory run in this process (called in a child)."""
    from onnxbalance.api import balance

    model = chain(depth)
    start = time.perf_counter()
    _, report = balance(model, solver=solver, verify=False, max_sweeps=max_sweeps)
    return {
        "depth": depth,
        "seconds": time.perf_counter() - start,
        "stages": dict(report.seconds),
        "sweeps": report.sweeps,
        "converged": report.converged,
        "norm_after": report.norm_after,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def in_child(depth: int, solver: str | None = None, max_sweeps: int = 10_000) -> dict:
    code = (
        "import json, sys; sys.path[:0] = sys.argv[1:3]; import depth; "
        "print(json.dumps(depth.run_one(int(sys.argv[3]), sys.argv[4] or None, int(sys.argv[5]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, PACKAGE_ROOT, HERE, str(depth), solver or "", str(max_sweeps)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def against_algorithm_1(depth: int) -> tuple[float, float, float, int]:
    """Norm after Newton (default tol) and after Algorithm 1 at tol 1e-11; their relative
    difference; Algorithm 1's sweeps."""
    from onnxbalance.api import balance

    model = chain(depth)
    _, newton = balance(model, solver="newton", verify=False)
    _, mu = balance(model, solver="mu", tol=1e-11, max_sweeps=2_000_000, verify=False)
    relative = abs(newton.norm_after - mu.norm_after) / mu.norm_after
    return newton.norm_after, mu.norm_after, relative, mu.sweeps


def sigterm_latency(depth: int, folder: Path) -> tuple[float, int, float]:
    """Send SIGTERM to a CLI run once it is solving; seconds from the signal to its exit, the
    exit code, and when the signal was sent."""
    source = folder / "chain.onnx"
    onnx.save(chain(depth), source)
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT)
    process = subprocess.Popen(
        [sys.executable, "-m", "onnxbalance", str(source), str(folder / "out.onnx"), "-v"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    start = time.perf_counter()
    assert process.stdout is not None
    for line in process.stdout:  # the stage lines of -v: wait for the solve to begin
        if line.startswith("onnxbalance: solve"):
            break
    time.sleep(0.3)
    sent = time.perf_counter() - start
    process.send_signal(signal.SIGTERM)
    signalled = time.perf_counter()
    process.communicate()
    return time.perf_counter() - signalled, process.returncode, sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer depths")
    parser.add_argument("--depths", type=int, nargs="+", help="these depths only (no extras)")
    args = parser.parse_args()
    depths = args.depths or (QUICK_DEPTHS if args.quick else DEPTHS)
    print(f"chains of {WIDTH}x{WIDTH} Gemm+Relu, Newton solver, one process per depth")
    print(f"{'layers':>7} {'solve s':>8} {'s/layer ms':>10} {'whole s':>8} {'peak MB':>8} steps")
    for depth in depths:
        result = in_child(depth)
        solve_seconds = result["stages"]["solve"]
        print(
            f"{depth:>7} {solve_seconds:>8.2f} {1000 * solve_seconds / depth:>10.2f} "
            f"{result['seconds']:>8.2f} {result['peak_mb']:>8.0f} {result['sweeps']}"
            + ("" if result["converged"] else " NOT CONVERGED"),
            flush=True,
        )
    if args.depths:
        return
    sweeps = 20
    mu = in_child(2000, "mu", sweeps)
    print(
        f"--solver mu, 2000 layers, {sweeps} sweeps: solve {mu['stages']['solve']:.2f} s "
        f"({1000 * mu['stages']['solve'] / sweeps:.0f} ms per sweep), peak {mu['peak_mb']:.0f} MB"
    )
    newton_norm, mu_norm, relative, mu_sweeps = against_algorithm_1(SHALLOW)
    print(
        f"{SHALLOW} layers: Newton norm {newton_norm:.15g}, Algorithm 1 at tol 1e-11 "
        f"{mu_norm:.15g} ({mu_sweeps} sweeps): relative difference {relative:.2e}"
    )
    with tempfile.TemporaryDirectory() as folder:
        latency, code, sent = sigterm_latency(max(depths), Path(folder))
    print(
        f"SIGTERM {sent:.1f} s into a {max(depths)}-layer CLI run: exited {latency:.2f} s "
        f"later with code {code}"
    )


if __name__ == "__main__":
    main()
