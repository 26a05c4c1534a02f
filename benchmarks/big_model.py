"""Scale benchmark: a Gemm+Relu MLP of about 1 GB stored with external data (float32 by default).

Measures, each in its own process (so memory and time are isolated):

* the baseline: ``onnx.load`` (external data included) + ``onnx.save_model`` with external data;
* ``onnxbalance IN OUT --no-verify`` (time target: at most 2x the baseline);
* ``onnxbalance IN OUT`` with verification (peak RSS target: at most 2.5x the weight bytes).

Peak resident memory comes from ``/usr/bin/time -v`` (Maximum resident set size) when it exists,
else from ``resource.getrusage(RUSAGE_CHILDREN)``. The model is generated chunk by chunk, straight
into its external data file (seeded; rows scaled by log-uniform factors so balancing has work to
do), in a temporary folder that is removed at the end unless ``--keep``. ``--gb 2.5`` builds a
model over protobuf's 2 GB limit; ``--dtype float16`` or ``bfloat16`` stores weights, input and
output in that type (the targets there: the verified run within 1.5x the baseline's time, peak
RSS within 1.3x the weight bytes).

    PYTHONPATH=. python benchmarks/big_model.py [--gb 1] [--width 8192] [--dtype float32]
        [--dir /tmp/x] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
ALIGN = 65536
DTYPES = {
    "float32": (np.dtype(np.float32), TensorProto.FLOAT),
    "float16": (np.dtype(np.float16), TensorProto.FLOAT16),
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), TensorProto.BFLOAT16),
}


def generate(
    folder: Path, gb: float, width: int, seed: int = 0, dtype: str = "float32"
) -> tuple[Path, int]:
    """Write ``model.onnx`` + ``model.onnx.bin`` (width x width layers); return (path, bytes)."""
    numpy_type, data_type = DTYPES[dtype]
    layer_bytes = width * width * numpy_type.itemsize
    n_layers = max(2, round(gb * 2**30 / layer_bytes))
    rng = np.random.default_rng(seed)
    path = folder / "model.onnx"
    data_name = "model.onnx.bin"
    inits, nodes = [], []
    offset = 0
    weight_bytes = 0
    block = max(1, (64 * 2**20) // (width * 4))  # ~64 MB of rows at a time
    with open(folder / data_name, "wb") as data:
        current = "x"
        for k in range(n_layers):
            for name, shape in ((f"W{k}", (width, width)), (f"b{k}", (width,))):
                if offset % ALIGN:
                    data.write(b"\0" * (ALIGN - offset % ALIGN))
                    offset += ALIGN - offset % ALIGN
                start = offset
                if len(shape) == 2:
                    row_scale = np.exp(rng.uniform(-2, 2, size=width)).astype(np.float32)
                    if dtype != "float32":  # activations of unit variance stay in range
                        row_scale /= np.sqrt(np.mean(row_scale**2))
                    for r in range(0, width, block):
                        rows = min(block, width - r)
                        chunk = rng.standard_normal((rows, width), dtype=np.float32)
                        chunk *= row_scale[r : r + rows, None] * np.float32(np.sqrt(2.0 / width))
                        data.write(chunk.astype(numpy_type).tobytes())
                else:
                    bias = rng.standard_normal(width, dtype=np.float32) * 0.1
                    data.write(bias.astype(numpy_type).tobytes())
                nbytes = int(np.prod(shape)) * numpy_type.itemsize
                offset += nbytes
                weight_bytes += nbytes
                tensor = TensorProto(name=name, data_type=data_type, dims=list(shape))
                tensor.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", start), ("length", nbytes)):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, str(value)
                inits.append(tensor)
            last = k == n_layers - 1
            out = "y" if last else f"z{k}"
            nodes.append(
                helper.make_node("Gemm", [current, f"W{k}", f"b{k}"], [out], f"gemm{k}", transB=1)
            )
            if not last:
                nodes.append(helper.make_node("Relu", [out], [f"h{k}"], f"relu{k}"))
                current = f"h{k}"
    graph = helper.make_graph(
        nodes,
        "big_mlp",
        [helper.make_tensor_value_info("x", data_type, ["N", width])],
        [helper.make_tensor_value_info("y", data_type, ["N", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path, weight_bytes


_BASELINE = """
import sys, time, onnx
start = time.perf_counter()
model = onnx.load(sys.argv[1])
onnx.save_model(model, sys.argv[2], save_as_external_data=True, all_tensors_to_one_file=True,
                location="copy.onnx.data", size_threshold=1024)
print(time.perf_counter() - start)
"""


def measure(args: list[str], env: dict[str, str]) -> dict[str, float | str]:
    """Run a command; return wall seconds, peak RSS bytes, exit code and its last stderr line."""
    timer = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    command = [timer, "-v", *args] if timer else args
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    peak = None
    if timer:
        found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        peak = int(found.group(1)) * 1024 if found else None
    if peak is None:  # getrusage keeps the largest child so far: only right if this one is
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        peak = after * 1024 if after > before else None
    lines = [
        line
        for line in proc.stderr.splitlines()
        if line and not line.startswith(("\t", " ", "Command exited"))
    ]
    return {
        "wall": wall,
        "peak": peak or float("nan"),
        "code": proc.returncode,
        "stdout": proc.stdout.strip(),
        "stderr": lines[-1] if lines else "",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="total weight size in GiB")
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each (best kept)")
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="onnxbalance-big-", dir=options.dir))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        start = time.perf_counter()
        path, weight_bytes = generate(folder, options.gb, options.width, dtype=options.dtype)
        print(
            f"model: {len(onnx.load(path, load_external_data=False).graph.initializer) // 2} "
            f"{options.dtype} Gemm layers of {options.width}x{options.width}, weights "
            f"{weight_bytes / 2**30:.2f} GiB, generated in {time.perf_counter() - start:.1f} s "
            f"({folder})"
        )
        python = sys.executable
        runs = {
            "onnx load+save": [python, "-c", _BASELINE, str(path), str(folder / "copy.onnx")],
            "onnxbalance --no-verify": [
                python, "-m", "onnxbalance", str(path), str(folder / "out.onnx"), "--no-verify",
                "--quiet",
            ],
            "onnxbalance (verify)": [
                python, "-m", "onnxbalance", str(path), str(folder / "out.onnx"), "--quiet",
                "--report", str(folder / "report.json"),
            ],
        }  # fmt: skip
        results = {}
        for name, command in runs.items():
            best = None
            for _ in range(options.repeat if name != "onnxbalance (verify)" else 1):
                result = measure(command, env)
                if result["code"] != 0:
                    print(f"{name}: exit {result['code']}: {result['stderr']}")
                if best is None or result["wall"] < best["wall"]:
                    best = result
            results[name] = best
            print(
                f"{name:26s} wall {best['wall']:7.2f} s   peak RSS {best['peak'] / 2**30:6.2f} GiB"
                f" ({best['peak'] / weight_bytes:4.2f}x weights)   exit {best['code']}"
            )
        base = results["onnx load+save"]["wall"]
        fast = results["onnxbalance --no-verify"]["wall"]
        peak = results["onnxbalance (verify)"]["peak"]
        verified = results["onnxbalance (verify)"]["wall"]
        print(f"time ratio (no verify / onnx load+save): {fast / base:.2f}  (target <= 2)")
        print(f"time ratio (verified run / onnx load+save): {verified / base:.2f}")
        print(
            f"peak RSS with verification / weight bytes: {peak / weight_bytes:.2f}  (target <= 2.5)"
        )
        report = folder / "report.json"
        if report.exists():
            data = json.loads(report.read_text())
            stages = ", ".join(f"{k} {v:.2f}" for k, v in data["seconds"].items())
            print(f"stages of the verified run (s): {stages}")
            print(
                f"solver {data['solver']}: {data['sweeps']} steps, {data['passes']} passes, "
                f"norm ratio {data['norm_ratio']:.4f}, converged {data['converged']}, "
                f"verification passed {data['verify']['passed']}"
            )
    finally:
        if options.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
