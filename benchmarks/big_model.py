"""Scale benchmark: a Gemm+Relu MLP of about 1 GB stored with external data (float32 by default).

Measures, each in its own process (so memory and time are isolated):

* the baseline: ``onnx.load`` (external data included) + ``onnx.save_model`` with external data;
* ``onnxbalance IN OUT --no-verify`` (time target: at most 2x the baseline);
* ``onnxbalance IN OUT`` with verification (peak RSS target: at most 2.5x the weight bytes);
* one onnxruntime session of the input model run once, as verification runs it (bfloat16
  widened by Casts; seconds inside the process): a verified run makes four such runs, each
  model with its weights as they are and perturbed, which bounds its time from below whatever
  the solver does.

Peak resident memory comes from ``/usr/bin/time -v`` (Maximum resident set size) when it exists,
else from ``resource.getrusage(RUSAGE_CHILDREN)``. The model is generated chunk by chunk, straight
into its external data file (seeded; rows scaled by log-uniform factors so balancing has work to
do), in a temporary folder that is removed at the end unless ``--keep``. ``--gb 2.5`` builds a
model over protobuf's 2 GB limit; ``--dtype float16`` or ``bfloat16`` stores weights, input and
output in that type. ``--arch decoder`` builds an OPT-style decoder instead (LayerNorm,
attention with q/k/v/out projections, a ReLU feed-forward block of 4 x ``--width`` units,
residual Adds; the feed-forward units and attention's value channels balance). Targets
(verified run / baseline time, peak RSS / weight bytes): float16 and bfloat16 1.5 and 1.3,
float32 1.3 and 1.1 (:data:`TARGETS`).
``--before DIR`` measures another source tree (a worktree of an earlier commit) in the same
run, against the same baseline.

    PYTHONPATH=. python benchmarks/big_model.py [--gb 1] [--width 8192] [--dtype float32]
        [--arch mlp|decoder] [--before DIR] [--dir /tmp/x] [--keep]
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"float32": (1.3, 1.1), "float16": (1.5, 1.3), "bfloat16": (1.5, 1.3)}
"""(verified run / onnx load+save, peak RSS / weight bytes) aimed at per dtype."""
ALIGN = 65536
DTYPES = {
    "float32": (np.dtype(np.float32), TensorProto.FLOAT),
    "float16": (np.dtype(np.float16), TensorProto.FLOAT16),
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), TensorProto.BFLOAT16),
}


class _DataFile:
    """Tensors appended to one external data file, each at an aligned offset."""

    def __init__(self, folder: Path, name: str, dtype: str) -> None:
        self.name = name
        self.numpy_type, self.data_type = DTYPES[dtype]
        self.file = open(folder / name, "wb")  # noqa: SIM115 (closed by close())
        self.offset = 0
        self.weight_bytes = 0

    def add(self, name: str, shape: tuple[int, ...], chunks) -> TensorProto:
        """Write float32 ``chunks`` (row blocks, in order) as tensor ``name``; its stub."""
        if self.offset % ALIGN:
            self.file.write(b"\0" * (ALIGN - self.offset % ALIGN))
            self.offset += ALIGN - self.offset % ALIGN
        start = self.offset
        for chunk in chunks:
            self.file.write(chunk.astype(self.numpy_type).tobytes())
        nbytes = int(np.prod(shape)) * self.numpy_type.itemsize
        self.offset += nbytes
        self.weight_bytes += nbytes
        tensor = TensorProto(name=name, data_type=self.data_type, dims=list(shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.name), ("offset", start), ("length", nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        return tensor

    def close(self) -> None:
        self.file.close()


def _scaled_rows(rng, rows: int, cols: int, fan_in: int, normalise: bool):
    """Gaussian rows of variance 2 / fan_in, each row times a log-uniform factor in
    [e^-2, e^2] (normalised to unit mean square when ``normalise``: narrow types keep their
    activations in range), ~64 MB at a time."""
    row_scale = np.exp(rng.uniform(-2, 2, size=rows)).astype(np.float32)
    if normalise:
        row_scale /= np.sqrt(np.mean(row_scale**2))
    block = max(1, (64 * 2**20) // (cols * 4))
    for r in range(0, rows, block):
        chunk = rng.standard_normal((min(block, rows - r), cols), dtype=np.float32)
        chunk *= row_scale[r : r + block, None] * np.float32(np.sqrt(2.0 / fan_in))
        yield chunk


def generate(
    folder: Path, gb: float, width: int, seed: int = 0, dtype: str = "float32"
) -> tuple[Path, int]:
    """Write ``model.onnx`` + ``model.onnx.bin`` (width x width layers); return (path, bytes)."""
    data = _DataFile(folder, "model.onnx.bin", dtype)
    n_layers = max(2, round(gb * 2**30 / (width * width * data.numpy_type.itemsize)))
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    current = "x"
    for k in range(n_layers):
        inits.append(
            data.add(
                f"W{k}", (width, width), _scaled_rows(rng, width, width, width, dtype != "float32")
            )
        )
        bias = rng.standard_normal(width, dtype=np.float32) * 0.1
        inits.append(data.add(f"b{k}", (width,), [bias]))
        last = k == n_layers - 1
        out = "y" if last else f"z{k}"
        nodes.append(
            helper.make_node("Gemm", [current, f"W{k}", f"b{k}"], [out], f"gemm{k}", transB=1)
        )
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"h{k}"], f"relu{k}"))
            current = f"h{k}"
    data.close()
    io_type = data.data_type
    graph = helper.make_graph(
        nodes,
        "big_mlp",
        [helper.make_tensor_value_info("x", io_type, ["N", width])],
        [helper.make_tensor_value_info("y", io_type, ["N", width])],
        inits,
    )
    return _save(folder, graph), data.weight_bytes


def generate_decoder(
    folder: Path, gb: float, hidden: int, seed: int = 0, dtype: str = "float32", heads: int = 16
) -> tuple[Path, int]:
    """An OPT-style stack of pre-LayerNorm decoder layers (attention with q/k/v/out
    projections, a ReLU feed-forward block of 4 x hidden units, residual Adds), written as the
    exporters do (MatMul + Add bias, Reshape/Transpose into heads); return (path, bytes).
    The feed-forward units and the value channels (through the heads to the output projection)
    can be balanced; queries, keys and the residual stream stay fixed, as in real decoders."""
    data = _DataFile(folder, "model.onnx.bin", dtype)
    ffn, head = 4 * hidden, hidden // heads
    layer_bytes = (4 * hidden * hidden + 2 * hidden * ffn) * data.numpy_type.itemsize
    n_layers = max(1, round(gb * 2**30 / layer_bytes))
    rng = np.random.default_rng(seed)
    narrow = dtype != "float32"
    inits, nodes = [], []

    def matrix(name, rows, cols, fan_in):  # stored (in, out) as MatMul reads it
        # rows of the transposed matrix are the units (scaled per unit), as in Gemm's W
        units = np.concatenate(list(_scaled_rows(rng, cols, rows, fan_in, narrow)))
        inits.append(data.add(name, (rows, cols), [np.ascontiguousarray(units.T)]))

    def vector(name, size, value=None):
        values = (
            np.full(size, value, np.float32)
            if value is not None
            else (rng.standard_normal(size, dtype=np.float32) * 0.02)
        )
        inits.append(data.add(name, (size,), [values]))

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], output, **attrs))
        return output

    def linear(x, name, rows, cols):
        matrix(f"{name}.weight", rows, cols, rows)
        vector(f"{name}.bias", cols)
        return node(
            "Add",
            [node("MatMul", [x, f"{name}.weight"], f"{name}/MatMul"), f"{name}.bias"],
            f"{name}/Add",
        )

    const = {
        "heads_shape": np.array([0, 0, heads, head], np.int64),
        "merged_shape": np.array([0, 0, hidden], np.int64),
    }
    for name, value in const.items():
        inits.append(helper.make_tensor(name, TensorProto.INT64, value.shape, value))
    scale = TensorProto(name="scale", data_type=data.data_type, dims=[])
    scale.raw_data = np.asarray(1.0 / np.sqrt(head), data.numpy_type).tobytes()
    inits.append(scale)
    x = "x"
    for k in range(n_layers):
        p = f"layers.{k}"
        vector(f"{p}.ln1.weight", hidden, 1.0)
        vector(f"{p}.ln1.bias", hidden, 0.0)
        h = node("LayerNormalization", [x, f"{p}.ln1.weight", f"{p}.ln1.bias"], f"{p}/ln1", axis=-1)
        split = {}
        for part in ("q", "k", "v"):
            proj = linear(h, f"{p}.attn.{part}", hidden, hidden)
            heads_ = node("Reshape", [proj, "heads_shape"], f"{p}/{part}/Reshape")
            perm = [0, 2, 3, 1] if part == "k" else [0, 2, 1, 3]
            split[part] = node("Transpose", [heads_], f"{p}/{part}/Transpose", perm=perm)
        scores = node("MatMul", [split["q"], split["k"]], f"{p}/scores")
        scaled = node("Mul", [scores, "scale"], f"{p}/scaled")
        weights = node("Softmax", [scaled], f"{p}/softmax", axis=-1)
        context = node("MatMul", [weights, split["v"]], f"{p}/context")
        merged = node(
            "Reshape",
            [
                node("Transpose", [context], f"{p}/context/Transpose", perm=[0, 2, 1, 3]),
                "merged_shape",
            ],
            f"{p}/merged",
        )
        x = node("Add", [x, linear(merged, f"{p}.attn.out", hidden, hidden)], f"{p}/residual1")
        vector(f"{p}.ln2.weight", hidden, 1.0)
        vector(f"{p}.ln2.bias", hidden, 0.0)
        h = node("LayerNormalization", [x, f"{p}.ln2.weight", f"{p}.ln2.bias"], f"{p}/ln2", axis=-1)
        f = node("Relu", [linear(h, f"{p}.fc1", hidden, ffn)], f"{p}/relu")
        x = node("Add", [x, linear(f, f"{p}.fc2", ffn, hidden)], f"{p}/residual2")
    data.close()
    nodes.append(helper.make_node("Identity", [x], ["y"], "output"))
    graph = helper.make_graph(
        nodes,
        "big_decoder",
        [helper.make_tensor_value_info("x", data.data_type, ["N", "S", hidden])],
        [helper.make_tensor_value_info("y", data.data_type, ["N", "S", hidden])],
        inits,
    )
    return _save(folder, graph), data.weight_bytes


def _save(folder: Path, graph) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


_BASELINE = """
import os, sys, time, onnx
# onnx >= 1.20 refuses to write external data over an existing file: each run starts afresh
data = os.path.join(os.path.dirname(sys.argv[2]), "copy.onnx.data")
if os.path.exists(data):
    os.unlink(data)
start = time.perf_counter()
model = onnx.load(sys.argv[1])
onnx.save_model(model, sys.argv[2], save_as_external_data=True, all_tensors_to_one_file=True,
                location="copy.onnx.data", size_threshold=1024)
print(time.perf_counter() - start)
"""


_ONNXRUNTIME = """
import sys, time
from onnxbalance.verify import check_runs
start = time.perf_counter()
check_runs(sys.argv[1])  # one run, as verification makes it (bfloat16 widened by Casts)
print(time.perf_counter() - start)
"""


def measure(
    args: list[str], env: dict[str, str], cwd: Path | None = None
) -> dict[str, float | str]:
    """Run a command in ``cwd``; return wall seconds, peak RSS bytes, exit code and its last
    stderr line. (``python -m`` imports from its working folder first: run from the
    repository's, it would take that tree's onnxbalance whatever PYTHONPATH says.)"""
    timer = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    command = [timer, "-v", *args] if timer else args
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
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


def _best(command: list[str], env: dict[str, str], repeat: int, name: str, cwd: Path) -> dict:
    """The fastest of ``repeat`` runs of ``command``, printed; a failed run (often the fastest)
    is never taken over one that succeeded."""
    runs = []
    for _ in range(repeat):
        result = measure(command, env, cwd)
        if result["code"] != 0:
            print(f"{name}: exit {result['code']}: {result['stderr']}")
        runs.append(result)
    best = min(runs, key=lambda run: (run["code"] != 0, run["wall"]))
    print(
        f"{name:24s} wall {best['wall']:7.2f} s   peak RSS {best['peak'] / 2**30:6.2f} GiB"
        f"   exit {best['code']}"
    )
    return best


def _summary(results: dict, suffix: str, weight_bytes: int, report: Path, dtype: str) -> None:
    """The ratios the targets are stated in, and the verified run's stages."""
    base = results["onnx load+save"]["wall"]
    time_target, memory_target = TARGETS[dtype]
    for name in ("--no-verify", "verified"):
        run = results[name + suffix]
        print(
            f"{name + suffix}: time / onnx load+save {run['wall'] / base:.2f}, peak RSS / "
            f"weight bytes {run['peak'] / weight_bytes:.2f}"
            + (f"  (targets <= {time_target}, <= {memory_target})" if name == "verified" else "")
        )
    if report.exists():
        data = json.loads(report.read_text())
        stages = ", ".join(f"{k} {v:.2f}" for k, v in data["seconds"].items())
        print(f"stages of the verified run{suffix} (s): {stages}")
        print(
            f"solver {data['solver']}: {data['sweeps']} steps, {data['passes']} passes, "
            f"norm ratio {data['norm_ratio']:.4f}, converged {data['converged']}, "
            f"units balanced {data['units_balanced']} of {data['units_found']}, "
            f"verification passed {data['verify']['passed']}"
        )


def _onnxruntime_floor(path: Path, folder: Path, base: float) -> None:
    """Print what four onnxruntime runs of the input model cost against the baseline."""
    run = measure(
        [sys.executable, "-c", _ONNXRUNTIME, str(path)], dict(os.environ, PYTHONPATH=str(ROOT)),
        folder,
    )  # fmt: skip
    if run["code"] != 0:
        print(f"onnxruntime run: exit {run['code']}: {run['stderr']}")
        return
    seconds = float(str(run["stdout"]).splitlines()[-1])
    print(
        f"onnxruntime, one run    {seconds:7.2f} s   four of them (verification's): "
        f"{4 * seconds / base:.2f}x onnx load+save"
    )


def add_model_options(parser: argparse.ArgumentParser, gb: float, width: int, dtype: str) -> None:
    """The options of the generated model (with these defaults) and of its work folder."""
    parser.add_argument("--gb", type=float, default=gb, help="total weight size in GiB")
    parser.add_argument("--width", type=int, default=width, help="MLP width / decoder hidden size")
    parser.add_argument(
        "--arch", choices=("mlp", "decoder"), default="mlp",
        help="Gemm+Relu MLP (every layer balanced) or OPT-style decoder (FFN and value units)",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=dtype)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")


@contextmanager
def generated_model(options: argparse.Namespace, prefix: str) -> Iterator[tuple[Path, Path, int]]:
    """(work folder, model path, weight bytes) of the model ``options`` describe, generated in
    a fresh folder that is removed afterwards unless ``--keep``."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=options.dir))
    try:
        make = generate if options.arch == "mlp" else generate_decoder
        path, weight_bytes = make(folder, options.gb, options.width, dtype=options.dtype)
        yield folder, path, weight_bytes
    finally:
        if options.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser, gb=1.0, width=8192, dtype="float32")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each (best kept)")
    parser.add_argument(
        "--before", type=Path, default=None,
        help="another source tree (a worktree of an earlier commit) measured in the same run",
    )  # fmt: skip
    options = parser.parse_args()
    start = time.perf_counter()
    with generated_model(options, "onnxbalance-big-") as (folder, path, weight_bytes):
        what = (
            f"{options.dtype} Gemm+Relu layers of {options.width}x{options.width}"
            if options.arch == "mlp"
            else f"{options.dtype} decoder layers, hidden {options.width}"
        )
        graph = onnx.load(path, load_external_data=False).graph
        n_layers = sum(n.op_type == "Relu" for n in graph.node) + (options.arch == "mlp")
        print(
            f"model: {n_layers} {what}, weights {weight_bytes / 2**30:.2f} GiB, generated in "
            f"{time.perf_counter() - start:.1f} s ({folder})"
        )
        env = dict(os.environ)
        trees = {"": ROOT} if options.before is None else {"": ROOT, " [before]": options.before}
        results = {"onnx load+save": _best(
            [sys.executable, "-c", _BASELINE, str(path), str(folder / "copy.onnx")],
            env, options.repeat, "onnx load+save", folder,
        )}  # fmt: skip
        _onnxruntime_floor(path, folder, results["onnx load+save"]["wall"])
        for suffix, tree in trees.items():
            tree_env = dict(os.environ, PYTHONPATH=str(tree))
            balance = [sys.executable, "-m", "onnxbalance", str(path), str(folder / "out.onnx")]
            report = folder / ("report-before.json" if suffix else "report.json")
            for name, extra, repeat in (
                ("--no-verify", ["--no-verify", "--quiet"], options.repeat),
                ("verified", ["--quiet", "--report", str(report)], 1),
            ):
                results[name + suffix] = _best(
                    balance + extra, tree_env, repeat, name + suffix, folder
                )
            _summary(results, suffix, weight_bytes, report, options.dtype)
    return 1 if any(result["code"] != 0 for result in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
