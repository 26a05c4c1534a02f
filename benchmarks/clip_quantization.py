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

    PYTHONPATH=. python benchmarks/clip_quantization.py [--seeds N] [--epochs E]
        [--gammas G ...] [--verbose]
    PYTHONPATH=. python benchmarks/clip_quantization.py --full-size

``--full-size`` only counts units on an untrained network of torchvision's mobilenet_v2 sizes
(224x224, 17056 units), both exporters, with and without ``rescale_clip`` and in its ReLU
version: about a minute.

Each network is trained twice: with BatchNorm's scale initialised to 1 (torch's default; ReLU6
then hardly ever reaches 6 on this data) and to 4 (it saturates often, as in ImageNet-trained
MobileNets). 15 to 60 seconds per network on 2 cores; three seeds of each, a few minutes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantization import (  # noqa: E402
    Task,
    _session,
    _split,
    accuracy,
    check_equivalent,
    export,
    quantize,
    scores,
    train,
)

from onnxbalance import balance  # noqa: E402
from onnxbalance.weightstats import layer_stats  # noqa: E402

SIZE = 16  # the 8x8 digits upsampled (bilinear) to SIZE x SIZE
VARIANTS = ("original", "rescale-clip", "relu+balance")


def digits_mobilenet(seed: int, epochs: int, gamma: float) -> Task:
    """The trained network as a Task (benchmarks/quantization.py's record of a model and data).

    ``gamma`` initialises every BatchNorm's scale (torch's default is 1): larger values start
    the pre-activations wider, so that ReLU6 saturates at 6 as often as in ImageNet-trained
    MobileNets, where the peers' ReLU6 -> ReLU changes the function.
    """
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
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.constant_(module.weight, gamma)
    train(net, x_train, y_train, epochs)
    model = export(net, x_train[:1])
    name = f"digits {SIZE}x{SIZE} MobileNetV2-shaped, BN gamma initialised to {gamma:g}"
    return Task(name, model, (), x_train, x_test, y_test, "logits", seed)


def relu_for_relu6(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every Clip replaced by a Relu writing the same output (the peers' pre-processing)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for k, node in enumerate(out.graph.node):
        if node.op_type == "Clip":
            relu = helper.make_node("Relu", [node.input[0]], list(node.output), name=node.name)
            out.graph.node[k].CopyFrom(relu)
    read = {name for node in out.graph.node for name in node.input}
    unread = [
        k
        for k, n in enumerate(out.graph.node)
        if n.op_type == "Constant" and n.output[0] not in read
    ]
    for k in reversed(unread):  # the bounds, which onnxruntime would warn about
        del out.graph.node[k]
    return out


def output_change(reference: onnx.ModelProto, model: onnx.ModelProto, task: Task) -> float:
    """max |logits - reference logits| on the test split, relative to the reference's range."""
    ref, out = scores(reference, task), scores(model, task)
    return float(np.abs(out - ref).max() / np.ptp(ref))


def clipped_fraction(model: onnx.ModelProto, names: list[str], task: Task) -> float:
    """The fraction of the ReLU6 outputs at 6 (where ReLU would differ) on the test split."""
    values = _probe(model, names, task.x_test)
    return float(sum((v >= 6).sum() for v in values) / sum(v.size for v in values))


def activation_spreads(model: onnx.ModelProto, names: list[str], task: Task) -> list[float]:
    """Per tensor in ``names``: max_c r_c / median_c r_c over the calibration data."""
    values = _probe(model, names, task.x_train)
    # channels first: layer_stats reads one unit per row
    return [layer_stats(n, v.swapaxes(0, 1)).spread for n, v in zip(names, values, strict=True)]


def _probe(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    """The values of the tensors ``names`` on ``x``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return _session(probe).run(names, {probe.graph.input[0].name: x})


def run(seeds: int, epochs: int, gamma: float, verbose: bool) -> list[dict]:
    rows = []
    for seed in range(seeds):
        t0 = time.perf_counter()
        task = digits_mobilenet(seed, epochs, gamma)
        trained = time.perf_counter() - t0
        model = task.model
        clipped = [n.output[0] for n in model.graph.node if n.op_type == "Clip"]
        feed = {model.graph.input[0].name: task.x_test[:64]}
        exact, report = balance(model, inputs=feed, rescale_clip=True)
        check_equivalent(model, exact, task, "the --rescale-clip balanced model")
        peers, peer_report = balance(relu_for_relu6(model), inputs=feed)
        variants = {"original": model, "rescale-clip": exact, "relu+balance": peers}
        at_six = clipped_fraction(model, clipped, task)
        for variant, candidate in variants.items():
            spreads = activation_spreads(candidate, clipped, task)
            rows.append(
                {
                    "seed": seed,
                    "at_six": at_six,
                    "variant": variant,
                    "float32": accuracy(candidate, task),
                    "int8": accuracy(quantize(candidate, task), task),
                    "spreads": spreads,
                    "change": output_change(model, candidate, task),
                    "balanced": {
                        "original": 0,
                        "rescale-clip": report.units_balanced,
                        "relu+balance": peer_report.units_balanced,
                    }[variant],
                    "ratio": {
                        "original": 1.0,
                        "rescale-clip": report.norm_ratio,
                        "relu+balance": peer_report.norm_ratio,
                    }[variant],
                }  # fmt: skip
            )
            if verbose:
                text = " ".join(f"{s:.3g}" for s in spreads)
                print(f"seed {seed} {variant:<13} activation spreads: {text}")
        print(
            f"seed {seed}: trained in {trained:.0f} s, {100 * at_six:.2f}% of ReLU6 outputs at 6, "
            f"{len(clipped)} ReLU6, "
            f"{report.units_behind_clips} units behind them, {report.units_balanced} balanced "
            f"with --rescale-clip ({len(report.clips_replaced)} clips replaced), "
            f"{peer_report.units_balanced} after ReLU6 -> ReLU; {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    return rows


def print_table(rows: list[dict], gamma: float) -> None:
    at_six = 100 * np.mean([r["at_six"] for r in rows])
    print(f"\nBN gamma initialised to {gamma:g}: {at_six:.2f}% of the ReLU6 outputs at 6\n")
    print(
        "| variant | units balanced | norm ratio | output change | float32 acc | int8 acc | "
        "activation spread, median layer | worst layer |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        f32 = np.array([r["float32"] for r in mine])
        i8 = np.array([r["int8"] for r in mine])
        spreads = np.array([r["spreads"] for r in mine])
        print(
            f"| {variant} | {np.mean([r['balanced'] for r in mine]):.0f} "
            f"| {np.mean([r['ratio'] for r in mine]):.3f} "
            f"| {max(r['change'] for r in mine):.2g} "
            f"| {100 * f32.mean():.1f}% (min {100 * f32.min():.1f}) "
            f"| {100 * i8.mean():.1f}% (min {100 * i8.min():.1f}) "
            f"| {np.median(spreads, axis=1).mean():.2f} | {spreads.max(axis=1).mean():.2f} |"
        )
    print(
        f"\n{len(rows) // len(VARIANTS)} training seeds, means (min); accuracy on the test "
        "split (540 images); output change: max |logits - original| / original logits' range "
        "(worst seed); activation spread: max_c / median_c of the channels' ranges after each "
        "ReLU6 (or its replacement), median and worst layer, mean over seeds."
    )


def full_size(dynamo: bool) -> None:
    """Unit counts on a torchvision-sized mobilenet_v2 (224x224, untrained: torch's default
    weights and random BatchNorm statistics) and on its ReLU version, exported once each."""
    import torch
    from torch import nn

    from sample_models.mobilenet import FULL_SETTINGS, MobileNetV2Like

    print(f"\nmobilenet_v2 sizes, {'dynamo' if dynamo else 'TorchScript'} export:")
    for act in (nn.ReLU6, nn.ReLU):
        torch.manual_seed(0)
        net = MobileNetV2Like(3, 1000, 32, 1280, FULL_SETTINGS, act).eval()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
                bn.weight.uniform_(0.5, 2.0, generator=gen)
                bn.bias.uniform_(-0.5, 0.5, generator=gen)
                bn.running_mean.uniform_(-0.5, 0.5, generator=gen)
                bn.running_var.uniform_(0.3, 3.0, generator=gen)
        model = export(net, np.zeros((1, 3, 224, 224), np.float32), dynamo=dynamo)
        for rescale_clip in (False, True) if act is nn.ReLU6 else (False,):
            t0 = time.perf_counter()
            _, report = balance(model, rescale_clip=rescale_clip)
            seconds = time.perf_counter() - t0
            verified = "not run" if report.verify is None else f"{report.verify.max_rel_diff:.2g}"
            print(
                f"  {act.__name__:<5} rescale_clip={rescale_clip!s:<5}: "
                f"{report.units_found} units, {report.units_behind_clips} behind clips, "
                f"{report.units_balanced} balanced, "
                f"{len(report.clips_replaced)} clips replaced, norm ratio {report.norm_ratio:.4f}, "
                f"max rel diff {verified}, {seconds:.1f} s"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds (default 3)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    parser.add_argument(
        "--gammas", type=float, nargs="+", default=[1.0, 4.0], help="BN scale initialisations"
    )
    parser.add_argument("--verbose", action="store_true", help="per-layer activation spreads")
    parser.add_argument(
        "--full-size", action="store_true", help="only unit counts on mobilenet_v2's sizes"
    )
    args = parser.parse_args(argv)
    if args.full_size:
        for dynamo in (False, True):
            full_size(dynamo)
        return 0
    for gamma in args.gammas:
        print_table(run(args.seeds, args.epochs, gamma, args.verbose), gamma)
    return 0


if __name__ == "__main__":
    sys.exit(main())
