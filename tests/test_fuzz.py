"""Fuzz the command line with damaged models (tests/fuzz_mutations.py).

Whatever the input, the run must end with exit code 2 or 3 and exactly one line on stderr, no
traceback and nothing written, or with exit code 0 and an output that computes what the input
computes. The default budget keeps CI fast; set ONNXBALANCE_FUZZ_SECONDS (total seconds) for a
longer search, and ONNXBALANCE_FUZZ_SEED to replay another sequence.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import random
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch_models
from fuzz_mutations import MUTATIONS
from mlp_models import mlp
from onnx import helper
from onnx.reference import ReferenceEvaluator
from onnx_conv_models import FIXTURES
from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as NoKernel

from onnxbalance import cli, tensors

ROOT = Path(__file__).resolve().parents[1]
BUDGET = float(os.environ.get("ONNXBALANCE_FUZZ_SECONDS", "3"))
SEED = int(os.environ.get("ONNXBALANCE_FUZZ_SEED", "0"))


@functools.cache
def _exported(name: str, fold: bool) -> bytes:
    """A tests/torch_models.py architecture as torch exports it, once per session."""
    return torch_models.fixture(name, fold=fold)[0].model.SerializeToString()


BASES = {
    "mlp32": lambda: mlp(widths=(4, 8, 6, 3), seed=1),
    "mlp64": lambda: mlp(widths=(3, 5, 2), dtype="float64", seed=2),
    "mlp16": lambda: mlp(widths=(4, 6, 3), dtype="float16", seed=3, spread=1.0),
    "conv_bn": lambda: FIXTURES["batchnorm"]().model,
    "concat": lambda: FIXTURES["concat"]().model,
    "matmul_3d": lambda: FIXTURES["matmul_3d"]().model,
    # exporter output: Constant/Shape/Gather/Reshape plumbing, unfused BN, residual ties, attention
    "bottleneck": lambda: onnx.ModelProto.FromString(_exported("bottleneck_projection", False)),
    "transformer": lambda: onnx.ModelProto.FromString(_exported("transformer", True)),
}
_INPUT_DTYPES = {"tensor(double)": np.float64, "tensor(float16)": np.float16}
_SHOWN_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _run_cli(args: list[str]) -> tuple[int, str, str, list[str]]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with (
        warnings.catch_warnings(record=True) as caught,
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        warnings.simplefilter("always")
        code = cli.main(args)
    shown = [str(w.message) for w in caught if not issubclass(w.category, _SHOWN_BY_DEFAULT)]
    return code, stdout.getvalue(), stderr.getvalue(), shown


def _feed(inputs, fill: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded values for (name, shape, dtype) inputs, dynamic dimensions set to ``fill`` (the
    same values whether the model takes float32 or float64)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for name, shape, dtype in inputs:
        shape = [d if isinstance(d, int) and d > 0 else fill for d in shape]
        feed[name] = rng.standard_normal(shape).astype(np.float32).astype(dtype)
    return feed


def _outputs(path: Path, fill: int, seed: int = 3) -> list[np.ndarray]:
    """Outputs by onnxruntime on seeded inputs (:func:`_feed`)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = [
        (value.name, value.shape, _INPUT_DTYPES.get(value.type, np.float32))
        for value in session.get_inputs()
    ]
    return session.run(None, _feed(inputs, fill, seed))


def _reference_outputs(path: Path, fill: int, seed: int = 3) -> list[np.ndarray]:
    """:func:`_outputs` by onnx's reference evaluator (numpy), which runs float64 Conv;
    onnxruntime's CPU provider has float32 Conv kernels only."""
    model = onnx.load(path)
    stored = {tensor.name for tensor in model.graph.initializer}
    inputs = [
        (
            value.name,
            [d.dim_value for d in value.type.tensor_type.shape.dim],
            helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type),
        )
        for value in model.graph.input
        if value.name not in stored
    ]
    return ReferenceEvaluator(model).run(None, _feed(inputs, fill, seed))


_NARROW = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def _as_float64(path: Path, folder: Path) -> Path:
    """The model at ``path`` with its float32 and float16 tensors, values, Constant nodes and
    Cast targets as float64 (external data read in), saved in ``folder``: it computes the same
    function without their overflow. Written here rather than taken from onnxbalance.upcast,
    which the tool's own verification uses: the fuzz judges the tool independently."""
    model = onnx.load(path)
    graph = model.graph
    constants = [a.t for node in graph.node for a in node.attribute if a.type == a.TENSOR]
    for tensor in [*graph.initializer, *constants]:
        if tensor.data_type in _NARROW:
            values = onnx.numpy_helper.to_array(tensor).astype(np.float64)
            tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i in _NARROW:
                attribute.i = onnx.TensorProto.DOUBLE
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type in _NARROW:
            value.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    folder.mkdir(exist_ok=True)
    wide = folder / f"{path.parent.name}-{path.name}"
    onnx.save(model, wide)
    return wide


def _assert_close(got: np.ndarray, expected: np.ndarray, dtype: np.dtype, label: str) -> None:
    """Rounding of the rescaled weights in ``dtype``: about 1e-7 in float32, 1e-3 in float16."""
    rtol, atol = (1e-2, 1e-2) if dtype == np.float16 else (1e-4, 1e-5)
    scale = float(np.max(np.abs(expected), initial=0.0)) or 1.0
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol * scale, err_msg=label)


def _overflowed(source: Path, balanced: Path, fill: int, dtype: np.dtype, label: str) -> None:
    """Both models in float64: rescaling changes the magnitudes inside the network (that is its
    purpose), so an input that overflows the model's dtype somewhere may come out finite once
    balanced; the function itself must still be the same."""
    wide = source.parent.parent / "float64"
    models = _as_float64(source, wide), _as_float64(balanced, wide)
    try:
        expected, got = (_outputs(model, fill) for model in models)
    except NoKernel:
        expected, got = (_reference_outputs(model, fill) for model in models)
    for a, b in zip(expected, got, strict=True):
        assert np.all(np.isfinite(a)), label
        _assert_close(b, a, dtype, label)


def _stored(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(path, load_external_data=False)
    return {t.name: tensors.read_array(t, path.parent) for t in model.graph.initializer}


def _same_function(source: Path, balanced: Path, label: str) -> None:
    """The balanced model computes what the input computes, on batches of 2 when the input
    accepts them (a damaged model may only run with the tool's default of 1)."""
    expected = None
    for fill in (2, 1):
        try:
            expected = _outputs(source, fill)
            break
        except Exception:  # onnxruntime's own exception types
            continue
    if expected is None:
        # onnxruntime cannot run the input at all (a damaged graph the checker lets through):
        # success is only right if the tool changed nothing, i.e. found nothing to balance
        before, after = _stored(source), _stored(balanced)
        assert before.keys() == after.keys(), label
        for name, value in before.items():
            np.testing.assert_array_equal(after[name], value, err_msg=f"{label} {name}")
        return
    got = _outputs(balanced, fill)
    for a, b in zip(expected, got, strict=True):
        finite = np.isfinite(a)  # NaN/Inf weights may give NaN/Inf outputs: the same ones
        if (
            a.dtype != np.float64
            and not finite.all()
            and all(np.isfinite(value).all() for value in _stored(source).values())
        ):  # finite weights, non-finite outputs: an overflow, which float64 does not have
            _overflowed(source, balanced, fill, a.dtype, label)
            return
        np.testing.assert_array_equal(b[~finite], a[~finite], err_msg=label)
        _assert_close(b[finite], a[finite], a.dtype, label)


def check_case(tmp_path: Path, kind: str, base: str, seed: int) -> None:
    case = tmp_path / f"{kind}-{base}-{seed}"
    source, target = case / "in", case / "out"
    source.mkdir(parents=True)
    target.mkdir()
    rng = random.Random(f"{SEED}-{kind}-{base}-{seed}")
    path, what = MUTATIONS[kind](rng, BASES[base](), source)
    label = f"[{kind} {base} seed={seed}: {what}]"
    before = _snapshot(source)
    out = target / "out.onnx"
    try:
        code, stdout, stderr, shown = _run_cli([str(path), str(out), "--quiet"])
    except BaseException as exc:  # any escape is a bug: the CLI must map every failure
        pytest.fail(f"{label} raised {type(exc).__name__}: {exc}")
    assert _snapshot(source) == before, f"{label} modified the input folder"
    assert not shown, f"{label} emitted warnings {shown}"
    assert "Traceback" not in stderr + stdout, f"{label} printed a traceback"
    if code == 0:
        assert stdout == "" and stderr == "", f"{label} --quiet printed {stdout!r} {stderr!r}"
        _same_function(path, out, label)
        return
    assert code in (2, 3), f"{label} exit code {code}: {stderr!r}"
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxbalance: error: "), f"{label} {lines}"
    assert stdout == "", f"{label} printed {stdout!r} on failure"
    assert not any(target.iterdir()), f"{label} left {os.listdir(target)} behind"


@pytest.mark.parametrize("kind", sorted(MUTATIONS))
def test_fuzz(tmp_path, kind):
    """At least one case per mutation and base model, then more until the budget is spent."""
    deadline = time.monotonic() + BUDGET / len(MUTATIONS)
    seed = 0
    while True:
        for base in BASES:
            check_case(tmp_path, kind, base, seed)
        seed += 1
        if time.monotonic() > deadline:
            break


@pytest.mark.parametrize("kind", ["huge_dims"])
def test_fuzz_real_process(tmp_path, kind):
    """The installed entry point, not just main(): real stderr, real exit status."""
    source, target = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    target.mkdir()
    path, what = MUTATIONS[kind](random.Random(kind), BASES["mlp32"](), source)
    proc = subprocess.run(
        [sys.executable, "-m", "onnxbalance", str(path), str(target / "o.onnx"), "--quiet"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=120,
    )
    assert proc.returncode == 2, (what, proc.stderr)
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not any(target.iterdir())


def test_float32_overflow_that_balancing_removes_is_judged_in_float64(tmp_path):
    """A finite weight of 1e38 overflows the hidden layer in float32 before balancing but not
    after: the outputs differ (inf against finite) while the function is the same; a wrong
    balanced model still fails."""
    model = BASES["mlp32"]()
    weight = model.graph.initializer[0]
    values = onnx.numpy_helper.to_array(weight).copy()
    values[0, 0] = 1e38
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    source, balanced = tmp_path / "in" / "in.onnx", tmp_path / "out" / "out.onnx"
    onnx.save(model, source)
    code, _, stderr, _ = _run_cli([str(source), str(balanced), "--quiet"])
    assert code == 0, stderr
    assert not np.isfinite(_outputs(source, 2)[0]).all()
    assert np.isfinite(_outputs(balanced, 2)[0]).all()
    _same_function(source, balanced, "overflow")
    wrong = onnx.load(balanced)
    last = wrong.graph.initializer[-2]  # W2
    last.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(last) * 2, last.name))
    onnx.save(wrong, balanced)
    with pytest.raises(AssertionError):
        _same_function(source, balanced, "wrong")


def test_mutations_really_damage(tmp_path):
    """Each structural mutation produces something onnx itself rejects or that differs."""
    rng = random.Random(0)
    base = BASES["mlp32"]()
    original = base.SerializeToString()
    for kind, mutate in MUTATIONS.items():
        folder = tmp_path / kind
        folder.mkdir()
        path, _ = mutate(rng, base, folder)
        data = path.read_bytes()
        if kind.startswith("external"):
            assert (folder / "in.onnx.bin").exists()
        else:
            assert data != original, kind
        assert base.SerializeToString() == original  # mutations never touch the base model
