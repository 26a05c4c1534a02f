"""Does balancing before per-tensor int8 quantization rescue badly scaled equivalent networks?

Trained models from bundled data (scikit-learn digits and breast_cancer MLPs, a small torch CNN
on the 8x8 digits images), each as trained and as equivalent variants whose hidden units are
rescaled by seeded factors a_h = 10^U(-s, s) (W_in[h, :] * a_h, b[h] * a_h, W_out[:, h] / a_h:
the same function, docs/algorithm.md §1). Every model is quantized with onnxruntime's static QDQ,
per-tensor, int8 quantization (MinMax calibration on the training split) as is, and after
``onnxbalance.balance`` for several (p, q). Accuracy is measured on the test split.

    PYTHONPATH=. python benchmarks/quantization.py [--verbose] [--seeds N] [--quick]
        [--csv F] [--png F] [--replot]

Prints a table, writes docs/quantization.csv and docs/quantization.png. A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from onnxbalance import balance
from onnxbalance.weightstats import format_stats_table

PQ = ((1.0, 1.0), (2.0, 2.0), (1.0, 2.0), (2.0, 1.0), (3.0, 2.0))
SPREADS = (0.0, 1.0, 2.0)  # per-unit factors 10^U(-s, s); s = 0 is the model as trained
SPLIT_SEED = 0  # one train/test split for every model and seed: rows stay comparable
SEEDS = 8  # training seeds; seed k also draws the k-th variant's unit factors


@dataclass(frozen=True)
class Rescale:
    """One hidden layer's units, where they appear in the stored tensors.

    ``in_weight`` has the units along ``in_axis`` (their incoming weights), ``bias`` is their
    bias (units along its last axis), ``out_weight`` has them along ``out_axis`` with ``repeat``
    consecutive entries per unit (a Flatten after a conv spreads one channel over H*W columns).
    """

    in_weight: str
    in_axis: int
    bias: str
    out_weight: str
    out_axis: int
    repeat: int = 1


@dataclass(frozen=True)
class Task:
    name: str
    model: onnx.ModelProto
    hidden: tuple[Rescale, ...]
    x_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    output: str  # class scores or probabilities, argmax = prediction
    seed: int = 0


# --------------------------------------------------------------------------------------------
# models


def _split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=0.3, random_state=SPLIT_SEED, stratify=y)


def _sklearn_mlp(
    name: str, x: np.ndarray, y: np.ndarray, hidden: tuple[int, ...], seed: int
) -> Task:
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    x_train, x_test, y_train, y_test = _split(x.astype(np.float32), y)
    from threadpoolctl import threadpool_limits

    # one BLAS thread: on a shared 2-core machine a threaded BLAS makes this tiny fit ~10x slower
    with threadpool_limits(1):
        clf = MLPClassifier(hidden, max_iter=500, random_state=seed).fit(x_train, y_train)
    # zipmap=False keeps the probabilities a plain tensor (no ZipMap / sequence-of-maps output)
    model = to_onnx(clf, x_train[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    # skl2onnx names the MatMul weights coefficient, coefficient1, ... (input, output)
    suffix = [""] + [str(k) for k in range(1, len(hidden) + 1)]
    layers = tuple(
        Rescale(
            f"coefficient{suffix[k]}", 1, f"intercepts{suffix[k]}", f"coefficient{suffix[k + 1]}", 0
        )
        for k in range(len(hidden))
    )
    return Task(name, model, layers, x_train, x_test, y_test, "probabilities", seed)


def digits_mlp(seed: int = 0) -> Task:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return _sklearn_mlp("digits MLP 64-128-64-10", x / 16.0, y, (128, 64), seed)


def breast_cancer_mlp(seed: int = 0) -> Task:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    # standardise with the training statistics only (same split as _split)
    x_train, _, _, _ = _split(x, y)
    x = (x - x_train.mean(0)) / x_train.std(0)
    return _sklearn_mlp("breast_cancer MLP 30-64-32-2", x, y, (64, 32), seed)


def digits_cnn(seed: int = 0) -> Task:
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = _split(x, y)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )
    train(net, x_train, y_train, epochs=30)
    model = export(net, x_train[:1])
    hidden = (
        Rescale("0.weight", 0, "0.bias", "3.weight", 1),
        Rescale("3.weight", 0, "3.bias", "6.weight", 1, repeat=4 * 4),
    )
    name = "digits CNN c16-c32-fc10"
    return Task(name, model, hidden, x_train, x_test, y_test, "logits", seed)


def train(net, x_train: np.ndarray, y_train: np.ndarray, epochs: int) -> None:
    """Adam (lr 3e-3) on the cross-entropy, batches of 64; the net is left in eval mode."""
    import torch
    from torch import nn

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


def export(net, example: np.ndarray, dynamo: bool = False) -> onnx.ModelProto:
    """The TorchScript export (opset 17, dynamic batch; or the dynamo one, opset 18): input
    ``image``, output ``logits``."""
    import torch

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # the TorchScript exporter is deprecated but writes plain Conv/Relu/MaxPool/Flatten/Gemm
        warnings.simplefilter("ignore", DeprecationWarning)
        path = os.path.join(tmp, "net.onnx")
        torch.onnx.export(
            net,
            (torch.from_numpy(example),),
            path,
            input_names=["image"],
            output_names=["logits"],
            # the dynamo exporter keeps the example's batch size (it wants dynamic_shapes)
            dynamic_axes=None if dynamo else {"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=18 if dynamo else 17,
            dynamo=dynamo,
        )
        return onnx.load(path)


# --------------------------------------------------------------------------------------------
# equivalent variants, quantization, accuracy


def rescale_units(model: onnx.ModelProto, hidden: tuple[Rescale, ...], spread: float, seed: int):
    """An equivalent model whose hidden units are scaled by 10^U(-spread, spread)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    arrays = {name: numpy_helper.to_array(t).astype(np.float64) for name, t in inits.items()}
    rng = np.random.default_rng(seed)
    for layer in hidden:
        n = arrays[layer.bias].shape[-1]
        factors = 10.0 ** rng.uniform(-spread, spread, size=n)
        shape = [1] * arrays[layer.in_weight].ndim
        shape[layer.in_axis] = n
        arrays[layer.in_weight] = arrays[layer.in_weight] * factors.reshape(shape)
        arrays[layer.bias] = arrays[layer.bias] * factors
        shape = [1] * arrays[layer.out_weight].ndim
        shape[layer.out_axis] = n * layer.repeat
        arrays[layer.out_weight] = arrays[layer.out_weight] / np.repeat(
            factors, layer.repeat
        ).reshape(shape)
    for layer in hidden:
        for name in (layer.in_weight, layer.bias, layer.out_weight):
            dtype = numpy_helper.to_array(inits[name]).dtype
            inits[name].CopyFrom(numpy_helper.from_array(arrays[name].astype(dtype), name))
    return out


def hidden_units(task: Task) -> int:
    dims = {t.name: tuple(t.dims) for t in task.model.graph.initializer}
    return sum(dims[layer.bias][-1] for layer in task.hidden)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def scores(model: onnx.ModelProto, task: Task) -> np.ndarray:
    sess = _session(model)
    return sess.run([task.output], {sess.get_inputs()[0].name: task.x_test})[0]


def accuracy(model: onnx.ModelProto, task: Task) -> float:
    return float(np.mean(np.argmax(scores(model, task), axis=1) == task.y_test))


def check_equivalent(reference: onnx.ModelProto, model: onnx.ModelProto, task: Task, what: str):
    """Fail loudly if a model meant to be equivalent computes something else in float32."""
    ref, out = scores(reference, task), scores(model, task)
    diff = float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-12))
    if diff > 1e-3 or not np.array_equal(np.argmax(ref, 1), np.argmax(out, 1)):
        raise RuntimeError(f"{task.name}: {what} is not equivalent (relative diff {diff:.2e})")


class _Batches(CalibrationDataReader):
    def __init__(self, input_name: str, x: np.ndarray, batch: int = 128) -> None:
        self._items = iter([{input_name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def quantize(model: onnx.ModelProto, task: Task) -> onnx.ModelProto:
    """Static QDQ per-tensor int8 (activations and weights), MinMax on the training split.

    The recommended onnxruntime flow: ``quant_pre_process`` (shape inference, graph
    optimisation), then ``quantize_static``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        src, pre = os.path.join(tmp, "f32.onnx"), os.path.join(tmp, "pre.onnx")
        dst = os.path.join(tmp, "int8.onnx")
        onnx.save(model, src)
        quant_pre_process(src, pre)
        quantize_static(
            pre,
            dst,
            _Batches(model.graph.input[0].name, task.x_train),
            quant_format=QuantFormat.QDQ,
            per_channel=False,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return onnx.load(dst)


# --------------------------------------------------------------------------------------------
# balancing (onnxbalance) and per-layer statistics


def _balance(model: onnx.ModelProto, task: Task, p: float, q: float):
    """The balanced model and its report, or None and why there is nothing to compare."""
    balanced, report = balance(
        model, p=p, q=q, inputs={model.graph.input[0].name: task.x_test[:64]}
    )
    if report.units_balanced == 0:
        return None, "n/a: nothing to balance"
    return balanced, report


# --------------------------------------------------------------------------------------------
# driver


def run(tasks: list[Task], pqs, spreads, verbose: bool) -> list[dict]:
    rows = []
    for task in tasks:
        for spread in spreads:
            t0 = time.perf_counter()
            model = task.model
            if spread:
                model = rescale_units(task.model, task.hidden, spread, task.seed)
                check_equivalent(task.model, model, task, f"the 10^±{spread:g} variant")
            row: dict = {
                "model": task.name,
                "seed": task.seed,
                "variant": "as trained" if spread == 0 else f"10^±{spread:g}",
                "float32": accuracy(model, task),
                "int8": accuracy(quantize(model, task), task),
            }
            for p, q in pqs:
                key = f"int8 balanced p={p:g} q={q:g}"
                balanced, report = _balance(model, task, p, q)
                if balanced is None:
                    row[key] = report
                    continue
                if (p, q) == (2.0, 2.0):
                    row["hidden units"] = hidden_units(task)
                    row["units balanced"] = report.units_balanced
                check_equivalent(model, balanced, task, f"the balanced (p={p:g}, q={q:g}) model")
                row[key] = accuracy(quantize(balanced, task), task)
                if verbose and task.seed == 0 and (p, q) == (2.0, 2.0):
                    title = f"{task.name}, {row['variant']}: per-layer weights, before | after"
                    print(f"\n{title} p=q=2")
                    print(format_stats_table(report.layers_before, report.layers_after))
            rows.append(row)
            print(
                f"  {task.name:<30} seed {task.seed} {row['variant']:<11} "
                f"done in {time.perf_counter() - t0:5.1f} s",
                file=sys.stderr,
            )
    return rows


def _fmt(value) -> str:
    return f"{100 * value:5.1f}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict], pqs) -> None:
    keys = ["float32", "int8"] + [f"int8 balanced p={p:g} q={q:g}" for p, q in pqs]
    heads = ["float32", "int8"] + [f"bal({p:g},{q:g})" for p, q in pqs] + ["balanced"]
    print(f"\n{'model':<30} {'seed':>4} {'variant':<11} " + " ".join(f"{h:>10}" for h in heads))
    for row in rows:
        cells = []
        for k in keys:
            v = row.get(k, "")
            cells.append(f"{_fmt(v):>10}" if isinstance(v, float) else f"{'n/a':>10}")
        units = f"{row['units balanced']}/{row['hidden units']}" if "hidden units" in row else "-"
        cells.append(f"{units:>10}")
        print(f"{row['model']:<30} {row['seed']:>4} {row['variant']:<11} " + " ".join(cells))
    notes = {
        v for row in rows for k, v in row.items() if isinstance(v, str) and v.startswith("n/a")
    }
    for note in sorted(notes):
        print(f"  {note}")
    print("accuracy on the test split, %; int8 = onnxruntime quantize_static QDQ per-tensor;")
    print("balanced = hidden units onnxbalance rescaled (p = q = 2) / hidden units in the model")


def summarize(rows: list[dict], pqs) -> list[dict]:
    """Per (p, q), the issue's two targets in percentage points.

    On rescaled variants: float32 - int8 after balancing (target: at most 1).
    As trained: int8 without balancing - int8 after balancing (target: at most 0.5).
    """
    summary = []
    for p, q in pqs:
        key = f"int8 balanced p={p:g} q={q:g}"
        measured = [row for row in rows if isinstance(row.get(key), float)]
        variants = [100 * (r["float32"] - r[key]) for r in measured if r["variant"] != "as trained"]
        trained = [100 * (r["int8"] - r[key]) for r in measured if r["variant"] == "as trained"]
        summary.append(
            {
                "p": p,
                "q": q,
                "rows": len(measured),
                "variants worst loss vs float32": max(variants, default=float("nan")),
                "variants mean loss vs float32": float(np.mean(variants)) if variants else np.nan,
                "as trained worst loss vs int8": max(trained, default=float("nan")),
                "mean int8 balanced": 100 * float(np.mean([r[key] for r in measured]))
                if measured
                else float("nan"),
            }
        )
    return summary


def print_summary(summary: list[dict], n_rows: int) -> None:
    print(
        f"\n{'(p, q)':<10} {'rows':>5}   {'variants: worst / mean loss vs float32':<42}"
        f"{'as trained: worst loss vs int8':<34}{'mean int8':>9}"
    )
    for s in summary:
        worst, mean = s["variants worst loss vs float32"], s["variants mean loss vs float32"]
        trained = s["as trained worst loss vs int8"]
        verdict_v = "ok" if worst <= 1.0 else "MISSED"
        verdict_t = "ok" if trained <= 0.5 else "MISSED"
        pq = f"({s['p']:g}, {s['q']:g})"
        print(
            f"{pq:<10} {s['rows']:>2}/{n_rows:<2}   {worst:>6.2f} / {mean:5.2f}  {verdict_v:<26}"
            f"{trained:>6.2f}  {verdict_t:<26}{s['mean int8 balanced']:>9.2f}"
        )
    print("percentage points; targets: variants <= 1, as trained <= 0.5")


def markdown_table(rows: list[dict], pqs) -> str:
    """Mean accuracy over seeds per model and variant, as a Markdown table (for the README)."""
    keys = ["float32", "int8"] + [f"int8 balanced p={p:g} q={q:g}" for p, q in pqs]
    heads = ["float32", "int8"] + [f"int8 balanced ({p:g},{q:g})" for p, q in pqs]
    lines = [
        "| model | variant | " + " | ".join(heads) + " |",
        "|---|---|" + "---:|" * len(heads),
    ]
    for (model, variant), group in _groups(rows).items():
        cells = []
        for key in keys:
            vals = [r[key] for r in group if isinstance(r.get(key), float)]
            cells.append(f"{100 * np.mean(vals):.1f}" if vals else "n/a")
        lines.append(f"| {model} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["variant"]), []).append(row)
    return groups


def write_csv(rows: list[dict], path: Path) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()}
            )


def read_csv(path: Path) -> list[dict]:
    """Rows as written by :func:`write_csv` (numbers back to float, reasons stay strings)."""
    rows = []
    with path.open(newline="") as fh:
        for raw in csv.DictReader(fh):
            row: dict = {}
            for key, value in raw.items():
                if value == "":
                    continue
                if key in ("seed", "hidden units", "units balanced"):
                    row[key] = int(value)
                    continue
                try:
                    row[key] = float(value)
                except ValueError:
                    row[key] = value
            rows.append(row)
    return rows


def _tick(variant: str) -> str:
    if variant.startswith("10^±"):
        s = variant[4:]
        return f"units $\\times\\,10^{{U(-{s},{s})}}$"
    return variant


def write_png(rows: list[dict], pqs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row["model"] for row in rows))
    series = [("float32", "float32", "0.25")] + [("int8", "int8, not balanced", "tab:red")]
    colors = ["tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:cyan", "tab:olive"]
    series += [
        (f"int8 balanced p={p:g} q={q:g}", f"int8, balanced p={p:g} q={q:g}", colors[i % 6])
        for i, (p, q) in enumerate(pqs)
    ]
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.6), sharey=True)
    axes = np.atleast_1d(axes)
    width = 0.8 / len(series)
    n_seeds = len({row["seed"] for row in rows})
    for ax, name in zip(axes, models, strict=True):
        mrows = [row for row in rows if row["model"] == name]
        variants = list(dict.fromkeys(row["variant"] for row in mrows))
        x = np.arange(len(variants))
        for j, (key, label, color) in enumerate(series):
            values = []
            for variant in variants:
                vals = [r.get(key) for r in mrows if r["variant"] == variant]
                values.append([100 * v for v in vals if isinstance(v, float)])
            mean = [np.mean(v) if v else 0.0 for v in values]
            low = [m - min(v) if v else 0.0 for m, v in zip(mean, values, strict=True)]
            high = [max(v) - m if v else 0.0 for m, v in zip(mean, values, strict=True)]
            offset = x + (j - (len(series) - 1) / 2) * width
            ax.bar(offset, mean, width, color=color, label=label)
            if n_seeds > 1:
                ax.errorbar(offset, mean, yerr=[low, high], fmt="none", ecolor="k", lw=0.8)
            for xi, v in zip(offset, values, strict=True):
                if not v:
                    ax.text(xi, 2, "n/a", rotation=90, ha="center", fontsize=7)
        ax.set_xticks(x, [_tick(v) for v in variants])
        notes = sorted(
            {v for row in mrows for v in row.values() if isinstance(v, str) and v.startswith("n/a")}
        )
        # the reason goes in the title: a box inside the axes would hide bars
        ax.set_title("\n".join([name, *(f"balancing {n}" for n in notes)]), fontsize=10)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(series), fontsize=8, frameon=False)
    seeds = f"mean of {n_seeds} training seeds, whiskers min..max" if n_seeds > 1 else "one seed"
    fig.suptitle(
        "Per-tensor int8 (onnxruntime static QDQ) of equivalent networks, without and with "
        f"onnxbalance ({seeds})",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import logging

    # quantize_static warns on the root logger for every model; keep the output a table
    logging.getLogger().setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=Path("docs/quantization.csv"))
    parser.add_argument("--png", type=Path, default=Path("docs/quantization.png"))
    parser.add_argument("--verbose", action="store_true", help="per-layer weight statistics")
    parser.add_argument("--seeds", type=int, default=SEEDS, help="training seeds per model")
    parser.add_argument("--replot", action="store_true", help="only redraw --png from --csv")
    parser.add_argument("--quick", action="store_true", help="only p = q = 2, digits MLP, 1 seed")
    args = parser.parse_args(argv)
    if args.replot:
        rows = read_csv(args.csv)
        keys = [k for k in rows[0] if k.startswith("int8 balanced p=")]
        pqs = [tuple(float(v[2:]) for v in k.split()[-2:]) for k in keys]
        write_png(rows, pqs, args.png)
        print(f"wrote {args.png}")
        return 0
    builders = [digits_mlp] if args.quick else [digits_mlp, breast_cancer_mlp, digits_cnn]
    pqs = ((2.0, 2.0),) if args.quick else PQ
    seeds = range(1 if args.quick else args.seeds)
    t0 = time.perf_counter()
    tasks = [build(seed) for build in builders for seed in seeds]
    print(f"trained {len(tasks)} models in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    rows = run(tasks, pqs, SPREADS, args.verbose)
    print_table(rows, pqs)
    print_summary(summarize(rows, pqs), len(rows))
    print(f"\nmean over {len(seeds)} seeds, test accuracy (%):\n")
    print(markdown_table(rows, pqs))
    write_csv(rows, args.csv)
    write_png(rows, pqs, args.png)
    print(f"wrote {args.csv} and {args.png} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
