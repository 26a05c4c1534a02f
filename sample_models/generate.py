"""Deterministic sample models: the paper's three random networks and a small quick-start MLP.

The paper (Saul, TMLR 2023, Fig. 2) runs Algorithm 1 on three randomly initialised ReLU networks
with 200 inputs, 3750 hidden units and 10 outputs:

    paper_a  200-2500-1250-10
    paper_b  200-2000-1000-500-250-10
    paper_c  200-1000-750-750-500-500-250-10

with zero biases and weights W[o, i] ~ N(0, 2 / fan_in). Each network is written the way
``torch.onnx.export`` writes ``nn.Linear`` layers: Gemm(x, W, b, transB=1) with W stored as
(out_features, in_features), Relu between layers, float32, input ``input`` of shape
["batch", 200] and output ``output`` of shape ["batch", 10].

``mlp`` (16-64-32-4, committed as sample_models/mlp.onnx for the README) is drawn the same way
with small random biases, then every hidden unit h is rescaled by a factor a_h = exp(s_h),
s_h ~ U(-2, 2): incoming row and bias times a_h, outgoing column divided by a_h. The function is
unchanged (ReLU is positively homogeneous) but the weights are far from balanced, so balancing
visibly lowers the norm.

Every model comes from a fixed seed and contains nothing that varies between runs, so the
written files are byte-identical across runs on the same numpy/onnx versions.

Usage::

    python -m sample_models.generate [OUTDIR] [--only NAME ...]

OUTDIR defaults to sample_models/generated (git-ignored: the paper networks are ~10-15 MB each).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # what torch.onnx.export writes for opset 17; every onnxruntime since 1.11 reads it
DEFAULT_OUTDIR = Path(__file__).resolve().parent / "generated"


@dataclass(frozen=True)
class Spec:
    """One sample network: layer sizes (inputs first), its seed, and how its weights are drawn."""

    name: str
    sizes: tuple[int, ...]
    seed: int
    bias_std: float = 0.0
    hidden_log_scale: float = 0.0  # hidden units rescaled by exp(U(-s, s)); 0 = as drawn
    description: str = ""


SPECS: dict[str, Spec] = {
    spec.name: spec
    for spec in (
        Spec("paper_a", (200, 2500, 1250, 10), seed=1, description="Saul (2023) Fig. 2, net 1"),
        Spec("paper_b", (200, 2000, 1000, 500, 250, 10), seed=2, description="Fig. 2, net 2"),
        Spec(
            "paper_c",
            (200, 1000, 750, 750, 500, 500, 250, 10),
            seed=3,
            description="Fig. 2, net 3",
        ),
        Spec(
            "mlp",
            (16, 64, 32, 4),
            seed=4,
            bias_std=0.1,
            hidden_log_scale=2.0,
            description="quick-start MLP with unevenly scaled hidden units",
        ),
    )
}
PAPER_NETWORKS = ("paper_a", "paper_b", "paper_c")


def gaussian_layers(
    sizes: Sequence[int], seed: int, bias_std: float = 0.0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W, b) per layer, W of shape (fan_out, fan_in) with entries N(0, 2 / fan_in), float32.

    Drawn in float64 from one seeded generator, layer by layer, weights before biases.
    """
    rng = np.random.default_rng(seed)
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=False):
        weight = rng.standard_normal((fan_out, fan_in)) * np.sqrt(2.0 / fan_in)
        bias = rng.standard_normal(fan_out) * bias_std if bias_std else np.zeros(fan_out)
        layers.append((weight.astype(np.float32), bias.astype(np.float32)))
    return layers


def unbalance(
    layers: list[tuple[np.ndarray, np.ndarray]], log_scale: float, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rescale every hidden unit h by a_h = exp(U(-log_scale, log_scale)); same function.

    W[o, i] <- W[o, i] * a_o / a_i and b[o] <- b[o] * a_o with a = 1 on inputs and outputs.
    """
    rng = np.random.default_rng(seed)
    factors = [np.ones(layers[0][0].shape[1])]
    for weight, _ in layers[:-1]:
        factors.append(np.exp(rng.uniform(-log_scale, log_scale, weight.shape[0])))
    factors.append(np.ones(layers[-1][0].shape[0]))
    rescaled = []
    for k, (weight, bias) in enumerate(layers):
        row, col = factors[k + 1], factors[k]
        new_weight = weight.astype(np.float64) * row[:, None] / col[None, :]
        rescaled.append((new_weight.astype(np.float32), (bias * row).astype(np.float32)))
    return rescaled


def spec_layers(spec: Spec) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (W, b) of every layer of ``spec``, exactly as stored in its ONNX file."""
    layers = gaussian_layers(spec.sizes, spec.seed, spec.bias_std)
    if spec.hidden_log_scale:
        layers = unbalance(layers, spec.hidden_log_scale, spec.seed + 1000)
    return layers


def mlp_model(
    layers: Sequence[tuple[np.ndarray, np.ndarray]], name: str, doc: str = ""
) -> onnx.ModelProto:
    """A Gemm(transB=1)/Relu chain with the given (W, b) per layer, as torch exports nn.Linear."""
    nodes, initializers = [], []
    current = "input"
    for k, (weight, bias) in enumerate(layers, start=1):
        last = k == len(layers)
        prefix = f"fc{k}"
        initializers += [
            numpy_helper.from_array(weight, f"{prefix}.weight"),
            numpy_helper.from_array(bias, f"{prefix}.bias"),
        ]
        gemm_out = "output" if last else f"/{prefix}/Gemm_output_0"
        nodes.append(
            helper.make_node(
                "Gemm",
                [current, f"{prefix}.weight", f"{prefix}.bias"],
                [gemm_out],
                name=f"/{prefix}/Gemm",
                alpha=1.0,
                beta=1.0,
                transB=1,
            )
        )
        current = gemm_out
        if not last:
            relu_out = f"/relu{k}/Relu_output_0"
            nodes.append(helper.make_node("Relu", [current], [relu_out], name=f"/relu{k}/Relu"))
            current = relu_out
    n_in, n_out = layers[0][0].shape[1], layers[-1][0].shape[0]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", n_out])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="onnxbalance.sample_models",
        producer_version="1",
        doc_string=doc,
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model)
    return model


def build(name: str) -> onnx.ModelProto:
    """The ONNX model of sample ``name`` (a key of :data:`SPECS`)."""
    spec = SPECS[name]
    sizes = "-".join(map(str, spec.sizes))
    doc = (
        f"{spec.description}: {sizes} ReLU MLP, W ~ N(0, 2/fan_in), seed {spec.seed}; "
        "written by sample_models/generate.py"
    )
    return mlp_model(spec_layers(spec), name, doc)


def write(name: str, outdir: Path) -> Path:
    """Write sample ``name`` to ``outdir/<name>.onnx`` and return the path."""
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"{name}.onnx"
    path.write_bytes(build(name).SerializeToString())
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sample_models.generate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("outdir", nargs="?", type=Path, default=DEFAULT_OUTDIR)
    parser.add_argument(
        "--only", action="append", choices=sorted(SPECS), help="write only this model (repeatable)"
    )
    args = parser.parse_args(argv)
    for name in args.only or list(SPECS):
        path = write(name, args.outdir)
        print(f"{path}  ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
