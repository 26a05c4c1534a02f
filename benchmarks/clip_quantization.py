"""ReLU6 networks before per-tensor int8 quantization: balanced exactly (``--rescale-clip``)
against the peers' approximation (ReLU6 replaced by ReLU, then balanced).

A MobileNetV2-shaped network (sample_models/mobilenet.py: inverted residuals, depthwise convs,
ReLU6, linear bottlenecks) is trained on scikit-learn's digits, upsampled to 16x16, and
exported with the TorchScript exporter (Conv with BatchNormalization folded, Clip(0, 6)). For each
training seed, float32 and per-tensor int8 accuracy on the test split (onnxruntime static QDQ,
MinMax calibration on the training split: benchmarks/quantization.py's ``quantize``) of

* original       the model as trained;
* rescale-clip   ``balance(model, rescale_clip=True)``: the same function, every ReLU6 a
                 per-channel Min(Relu(z), 6 a_c);
* relu+balance   every Clip(0, 6) replaced by Relu, then ``balance(model)``: what the peers'
                 cross-layer equalization does (it changes the function).

and, per variant, the spread of the activations' per-channel ranges after each ReLU6 (or what
replaced it), max_c r_c / median_c r_c with r_c = max |activation| of channel c over the
calibration data (onnxbalance.weightstats' statistic, applied to activations): per-tensor
activation quantization shares one step size across the channels, so a large spread leaves the
small channels few levels.

    PYTHONPATH=. python benchmarks/clip_quantization.py [--seeds N] [--epochs E] [--verbose]

About a minute per seed on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantization import Task, _session, _split, accuracy, check_equivalent, quantize  # noqa: E402

from onnxbalance import balance  # noqa: E402
from onnxbalance.weightstats import layer_stats  # noqa: E402

SIZE = 16  # the 8x8 digits upsampled (bilinear) to SIZE x SIZE
VARIANTS = ("original", "rescale-clip", "relu+balance")


def digits_mobilenet(seed: int, epochs: int) -> Task:
    """The trained network as a Task (benchmarks/quantization.py's record of a model and data)."""
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    from sample_models.mobilenet import MobileNetV2Like

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    x, y = load_digits(return_X_y=True)
    images = torch.from_numpy((x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8))
    images = nn.functional.interpolate(images, size=(SIZE, SIZE), mode="bilinear")
    x_train, x_test, y_train, y_test = _split(images.numpy(), y)
    net = MobileNetV2Like()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for start in range(0, len(xt), 64):
            idx = perm[start : start + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    net.eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warning
        path = os.path.join(tmp, "mobilenet.onnx")
        torch.onnx.export(
            net, (torch.from_numpy(x_train[:1]),), path, input_names=["image"],
            output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17, dynamo=False,
        )  # fmt: skip
        model = onnx.load(path)
    name = f"digits {SIZE}x{SIZE} MobileNetV2-shaped"
    return Task(name, model, (), x_train, x_test, y_test, "logits", seed)


def relu_for_relu6(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every Clip replaced by a Relu writing the same output (the peers' pre-processing)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for k, node in enumerate(out.graph.node):
        if node.op_type == "Clip":
            relu = helper.make_node("Relu", [node.input[0]], list(node.output), name=node.name)
            out.graph.node[k].CopyFrom(relu)
    return out


def activation_spreads(model: onnx.ModelProto, names: list[str], task: Task) -> list[float]:
    """Per tensor in ``names``: max_c r_c / median_c r_c over the calibration data."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    values = _session(probe).run(names, {probe.graph.input[0].name: task.x_train})
    # channels first: layer_stats reads one unit per row
    return [layer_stats(n, v.swapaxes(0, 1)).spread for n, v in zip(names, values, strict=True)]


def run(seeds: int, epochs: int, verbose: bool) -> list[dict]:
    rows = []
    for seed in range(seeds):
        t0 = time.perf_counter()
        task = digits_mobilenet(seed, epochs)
        trained = time.perf_counter() - t0
        model = task.model
        clipped = [n.output[0] for n in model.graph.node if n.op_type == "Clip"]
        feed = {model.graph.input[0].name: task.x_test[:64]}
        exact, report = balance(model, inputs=feed, rescale_clip=True)
        check_equivalent(model, exact, task, "the --rescale-clip balanced model")
        peers, peer_report = balance(relu_for_relu6(model), inputs=feed)
        variants = {"original": model, "rescale-clip": exact, "relu+balance": peers}
        for variant, candidate in variants.items():
            spreads = activation_spreads(candidate, clipped, task)
            rows.append(
                {
                    "seed": seed,
                    "variant": variant,
                    "float32": accuracy(candidate, task),
                    "int8": accuracy(quantize(candidate, task), task),
                    "spreads": spreads,
                    "balanced": {"original": 0, "rescale-clip": report.units_balanced,
                                 "relu+balance": peer_report.units_balanced}[variant],
                    "ratio": {"original": 1.0, "rescale-clip": report.ratio,
                              "relu+balance": peer_report.ratio}[variant],
                }  # fmt: skip
            )
            if verbose:
                text = " ".join(f"{s:.3g}" for s in spreads)
                print(f"seed {seed} {variant:<13} activation spreads: {text}")
        print(
            f"seed {seed}: trained in {trained:.0f} s, {len(clipped)} ReLU6, "
            f"{report.units_behind_clips} units behind them, {report.units_balanced} balanced "
            f"with --rescale-clip ({len(report.clips_replaced)} clips replaced), "
            f"{peer_report.units_balanced} after ReLU6 -> ReLU; {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    return rows


def print_table(rows: list[dict]) -> None:
    print()
    print(
        "| variant | units balanced | norm ratio | float32 acc | int8 acc | "
        "activation spread, median layer | worst layer |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        f32 = np.array([r["float32"] for r in mine])
        i8 = np.array([r["int8"] for r in mine])
        spreads = np.array([r["spreads"] for r in mine])
        print(
            f"| {variant} | {np.mean([r['balanced'] for r in mine]):.0f} "
            f"| {np.mean([r['ratio'] for r in mine]):.3f} "
            f"| {100 * f32.mean():.1f}% (min {100 * f32.min():.1f}) "
            f"| {100 * i8.mean():.1f}% (min {100 * i8.min():.1f}) "
            f"| {np.median(spreads, axis=1).mean():.2f} | {spreads.max(axis=1).mean():.2f} |"
        )
    print(f"\n{len(rows) // len(VARIANTS)} training seeds; accuracy on the test split (540).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds (default 3)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    parser.add_argument("--verbose", action="store_true", help="per-layer activation spreads")
    args = parser.parse_args(argv)
    print_table(run(args.seeds, args.epochs, args.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
