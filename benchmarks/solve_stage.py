"""Memory and time of the solve stage alone on a large external-data model (float16 by default).

Generates the Gemm+Relu MLP of ``big_model.py`` (or its decoder, ``--arch decoder``) and, in a
fresh process, loads and analyses it, then resets the process's peak resident set
(``/proc/self/clear_refs``) and times the two parts of the solve stage: building the coupling
matrices (``ModelUnits.unit_graph``) and solving (``onnxbalance.solver.solve``). Printed:
seconds of each, the stage's peak RSS in GiB and as a multiple of the weight bytes (whole, and
above the resident set at its start), the dtype the largest coupling matrix is stored in
("nowhere": squared on use), and the solver's steps, passes and norms (equal norms across
versions show that the same minimum was found).

``--root`` runs another checkout's onnxbalance on the same model (e.g. the main branch, for a
before/after comparison under the same machine load); ``--repeat`` alternates the roots.

    PYTHONPATH=. python benchmarks/solve_stage.py [--gb 0.5] [--dtype float16] [--width 8192]
        [--arch mlp|decoder] [--root /path/to/other/checkout] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from big_model import add_model_options, generated_model  # noqa: E402

_STAGE = """
import json, sys, time
import numpy as np
from pathlib import Path
from onnxbalance import io, tensors
from onnxbalance.analysis import analyse
from onnxbalance.solver import solve

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

with tensors.external_folder(Path(sys.argv[1]).parent):
    units = analyse(io.load_model(sys.argv[1]))
    with open("/proc/self/clear_refs", "w") as reset:
        reset.write("5")  # the peak from here on: the solve stage alone
    start_rss = status("VmRSS:")
    start = time.perf_counter()
    graph = units.unit_graph(2.0, [])
    built = time.perf_counter()
    result = solve(graph, 2.0, 2.0)
    done = time.perf_counter()
largest = max((layer.coupling for layer in graph.layers), key=np.size)
print(json.dumps({
    "couplings": built - start, "solve": done - built, "peak": status("VmHWM:"),
    "before": start_rss, "steps": result.sweeps,
    "dtype": str(largest.dtype) if isinstance(largest, np.ndarray) else "nowhere (squared on use)",
    "passes": result.passes, "norm_before": result.norm_before, "norm_after": result.norm_after,
}))
"""


def run_stage(path: Path, root: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, "-c", _STAGE, str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,  # python -c puts the working folder first on the path
    )
    if proc.returncode != 0:
        raise SystemExit(f"{root}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser, gb=0.5, width=8192, dtype="float16")
    parser.add_argument("--root", type=Path, action="append", default=[], help="other checkout")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each root, alternated")
    options = parser.parse_args()
    with generated_model(options, "onnxbalance-solve-") as (_, path, weight_bytes):
        print(
            f"{options.arch}, {options.dtype} weights {weight_bytes / 2**30:.2f} GiB, width "
            f"{options.width}"
        )
        for _ in range(options.repeat):
            for root in [ROOT, *options.root]:
                r = run_stage(path, root.resolve())
                print(
                    f"{str(root):28s} couplings {r['couplings']:6.2f} s  solve {r['solve']:6.2f} s"
                    f"  peak RSS {r['peak'] / 2**30:5.2f} GiB ({r['peak'] / weight_bytes:4.2f}x"
                    f" weights; {(r['peak'] - r['before']) / weight_bytes:4.2f}x above the"
                    f" {r['before'] / 2**30:.2f} GiB at its start)  stored {r['dtype']}"
                    f"  {r['steps']} steps, {r['passes']} passes,"
                    f" norm {r['norm_before']:.10g} -> {r['norm_after']:.15g}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
