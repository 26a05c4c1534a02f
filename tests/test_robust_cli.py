"""Unattended runs through the command line: external data, dtypes, overflow refusal, safe and
deterministic writes, interrupts, quiet pipelines."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mlp_models import DTYPES, mlp, save
from onnx import numpy_helper
from test_external_data import _forward

from onnxbalance import safewrite, tensors, verify
from onnxbalance.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(*args) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def ort_outputs(path: Path, width: int, dtype=np.float32) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(5).standard_normal((7, width)).astype(dtype)
    return session.run(None, {"x": x})[0]


@pytest.fixture
def dirs(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path / "in", tmp_path / "out"


@pytest.mark.parametrize("threshold", [0, 100, None])
def test_layout_kept_and_input_untouched(dirs, threshold):
    """External data goes next to OUT (each tensor stored as in IN); inline stays inline."""
    src_dir, out_dir = dirs
    model = mlp(widths=(4, 8, 6, 3), seed=2)
    src = save(model, src_dir / "m.onnx", external=threshold is not None, threshold=threshold or 0)
    before = snapshot(src_dir)
    code, out, err = run(src, out_dir / "b.onnx", "-q", "--report", out_dir / "r.json")
    assert (code, out, err) == (0, "", "")
    assert snapshot(src_dir) == before
    expected_files = ["b.onnx", "r.json"] + (["b.onnx.data"] if threshold is not None else [])
    assert sorted(os.listdir(out_dir)) == sorted(expected_files)
    layout = tensors.external_names(onnx.load(src, load_external_data=False))
    written = onnx.load(out_dir / "b.onnx", load_external_data=False)
    assert tensors.external_names(written) == layout
    for tensor in written.graph.initializer:
        if tensors.is_external(tensor):
            assert {e.key: e.value for e in tensor.external_data}["location"] == "b.onnx.data"
    np.testing.assert_allclose(
        ort_outputs(out_dir / "b.onnx", 4), ort_outputs(src, 4), rtol=1e-4, atol=1e-5
    )
    report = json.loads((out_dir / "r.json").read_text())
    assert report["verify"]["passed"] and report["norm_after"] < 0.9 * report["norm_before"]


def test_output_never_overwrites_input_data(dirs):
    src_dir, _ = dirs
    model = mlp()
    src = src_dir / "m.onnx"
    onnx.save_model(model, src, save_as_external_data=True, location="b.onnx.data",
                    size_threshold=0)  # fmt: skip
    before = snapshot(src_dir)
    code, out, err = run(src, src_dir / "b.onnx", "-q")
    assert (code, out, err) == (0, "", "")  # OUT's data takes a name no file has
    assert sorted(os.listdir(src_dir)) == ["b.onnx", "b.onnx.1.data", "b.onnx.data", "m.onnx"]
    assert {name: digest for name, digest in snapshot(src_dir).items() if name in before} == before
    np.testing.assert_allclose(
        ort_outputs(src_dir / "b.onnx", 4), ort_outputs(src, 4), rtol=1e-4, atol=1e-5
    )
    code, out, err = run(src, src_dir / "b.onnx.data")
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert "same file as the input" in err or "input's external data" in err
    assert {name: digest for name, digest in snapshot(src_dir).items() if name in before} == before


def test_models_over_the_protobuf_limit(dirs, monkeypatch):
    """The >2 GB path on a small model: the limits are lowered, the code path is the same."""
    src_dir, out_dir = dirs
    src = save(mlp(widths=(4, 64, 64, 3), seed=1), src_dir / "m.onnx")  # inline
    monkeypatch.setattr(safewrite, "INLINE_BUDGET", 10_000)
    monkeypatch.setattr(verify, "_PROTOBUF_LIMIT", 1_000)  # protos go to onnxruntime as files
    code, out, err = run(src, out_dir / "b.onnx", "-q")
    assert (code, err) == (0, "")
    written = onnx.load(out_dir / "b.onnx", load_external_data=False)
    assert tensors.external_names(written) == {"W1"}  # the one tensor over the budget
    np.testing.assert_allclose(
        ort_outputs(out_dir / "b.onnx", 4), ort_outputs(src, 4), rtol=1e-4, atol=1e-5
    )
    import onnxbalance

    balanced, report = onnxbalance.balance(onnx.load(src))  # a proto "too big" to serialize
    assert report.verify.passed and not tensors.external_names(balanced)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("external", [False, True])
def test_dtypes(dirs, dtype, external):
    src_dir, out_dir = dirs
    model = mlp(widths=(6, 16, 12, 4), dtype=dtype, seed=3, spread=1.5)
    src = save(model, src_dir / "m.onnx", external=external)
    code, out, err = run(src, out_dir / "b.onnx", "-q", "--report", out_dir / "r.json")
    assert (code, err) == (0, "")
    report = json.loads((out_dir / "r.json").read_text())
    assert report["norm_after"] < 0.9 * report["norm_before"]
    (output,) = report["verify"]["outputs"]
    assert output["passed"] and 0 < output["noise_floor"] < output["atol"]
    written = onnx.load(out_dir / "b.onnx")
    assert {t.data_type for t in written.graph.initializer} == {DTYPES[dtype]}
    x = np.random.default_rng(2).standard_normal((5, 6))
    reference, result = _forward(model, x), _forward(written, x)
    eps = {"float16": 2**-11, "bfloat16": 2**-8, "float64": 2**-53}[dtype]
    np.testing.assert_allclose(result, reference, atol=40 * eps * np.abs(reference).max())


def overflowing_fp16_model() -> onnx.ModelProto:
    """Hidden unit 0 has a tiny incoming weight, a unit outgoing weight and a bias of 60000:
    balancing wants a = (1 / 1e-6)^(1/4) = 31.6, and 60000 * 31.6 does not fit in float16.
    Unit 1 is an ordinary unbalanced unit."""
    model = mlp(widths=(1, 2, 1), dtype="float16")
    values = {
        "W0": np.array([[1e-3], [4.0]]),
        "b0": np.array([60000.0, 0.5]),
        "W1": np.array([[1.0, 0.01]]),
        "b1": np.array([0.0]),
    }
    for tensor in model.graph.initializer:
        array = values[tensor.name].astype(np.float16)
        tensor.CopyFrom(tensors.make_tensor(tensor.name, array, DTYPES["float16"]))
    return model


def test_units_that_would_overflow_are_refused_with_a_reason(dirs):
    src_dir, out_dir = dirs
    src = save(overflowing_fp16_model(), src_dir / "m.onnx")
    code, out, err = run(src, out_dir / "b.onnx", "-q", "--report", out_dir / "r.json")
    assert (code, out, err) == (0, "", "")  # quiet: the warning is not printed either
    report = json.loads((out_dir / "r.json").read_text())
    reasons = [entry["reason"] for entry in report["units_fixed"]]
    assert any("would overflow float16" in reason for reason in reasons), reasons
    assert report["units_balanced"] == 1 and report["verify"]["passed"]
    written = {
        t.name: numpy_helper.to_array(t) for t in onnx.load(out_dir / "b.onnx").graph.initializer
    }
    assert written["b0"][0] == np.float16(60000.0)  # the refused unit is untouched
    assert np.isfinite(
        np.concatenate([w.ravel().astype(np.float64) for w in written.values()])
    ).all()
    assert written["W0"][1, 0] != np.float16(4.0)  # the other unit moved


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (1e152, "weights too large to balance in float64 (|w|^p sums to 1e+304, at most"),
        (1e160, "has NaN or infinite weights (or weights so large that |w|^p overflows"),
        (1.7e308, "has NaN or infinite weights (or weights so large that |w|^p overflows"),
    ],
)
def test_weights_beyond_float64s_range_for_the_norm_are_refused(dirs, weight, message):
    """Finite float64 weights whose |w|^2 overflows, or sums near float64's limit, where the
    solvers' loads and gradients would overflow: one line naming the layer, no warnings, the
    input untouched, nothing written."""
    import warnings

    src_dir, out_dir = dirs
    model = mlp(widths=(3, 5, 2), dtype="float64", seed=2)
    weight_tensor = model.graph.initializer[0]
    values = numpy_helper.to_array(weight_tensor).copy()
    values[0, 0] = weight
    weight_tensor.CopyFrom(numpy_helper.from_array(values, weight_tensor.name))
    src = save(model, src_dir / "m.onnx")
    before = snapshot(src_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, out, err = run(src, out_dir / "b.onnx")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err
    assert "layer 'gemm0'" in err
    assert snapshot(src_dir) == before and not any(out_dir.iterdir())


@pytest.mark.parametrize(
    ("dtype", "bits"),
    [("float32", np.uint32(0x7F800001)), ("float64", np.uint64(0x7FF0000000000001)),
     ("float16", np.uint16(0x7C01))],
)  # fmt: skip
@pytest.mark.parametrize("tensor", ["W1", "b0"])
@pytest.mark.parametrize("alpha", [None, 2.0])
def test_signalling_nans_raise_no_warnings(dirs, dtype, bits, tensor, alpha):
    """A bit flip can make a signalling NaN, whose casts and squares raise numpy's 'invalid'
    flag: a NaN weight or bias is still refused by name, with one line and no warning; also
    where Gemm's alpha multiplies the weights first."""
    import warnings

    src_dir, out_dir = dirs
    model = mlp(widths=(3, 5, 4, 2), dtype=dtype, seed=2)
    if alpha is not None:
        for node in model.graph.node:
            if node.op_type == "Gemm":
                node.attribute.append(onnx.helper.make_attribute("alpha", alpha))
    (stored,) = [t for t in model.graph.initializer if t.name == tensor]
    values = numpy_helper.to_array(stored).copy()
    values.view(bits.dtype).reshape(-1)[0] = bits
    stored.CopyFrom(numpy_helper.from_array(values, stored.name))
    src = save(model, src_dir / "m.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, out, err = run(src, out_dir / "b.onnx", "-q")
    assert out == "" and err.count("\n") == 1 and not any(out_dir.iterdir())
    if tensor == "W1":
        assert code == 2 and "layer 'gemm1' has NaN or infinite weights" in err
    else:
        assert code == 2 and "tensor 'b0' holds NaN or infinity (at [0])" in err


@pytest.mark.parametrize(
    ("scale", "var", "epsilon"),
    [(1.0, -2.0, 1e-5), (1.0, 0.0, 0.0), (np.inf, 1.0, 1e-5), (1.0, np.nan, 1e-5),
     (1.0, 1.0, float("nan")), (np.uint32(0x7F800001), 1.0, 1e-5)],
)  # fmt: skip
def test_a_batchnorm_that_computes_nan_is_named(dirs, scale, var, epsilon):
    """gamma / sqrt(var + eps) not finite (a corrupt running variance, a zero or NaN epsilon,
    a signalling NaN from a flipped bit) makes the model compute NaN or infinity whatever
    balancing does: one line names the node and the channel, with no numpy warning and
    nothing written."""
    import warnings

    from onnx_conv_models import FIXTURES

    src_dir, out_dir = dirs
    model = FIXTURES["batchnorm"]().model
    (node,) = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    node.attribute.append(onnx.helper.make_attribute("epsilon", epsilon))
    stored = {t.name: t for t in model.graph.initializer}
    for name, value in ((node.input[1], scale), (node.input[4], var)):
        values = numpy_helper.to_array(stored[name]).copy()
        if isinstance(value, np.uint32):  # a bit pattern
            values.view(np.uint32)[1] = value
        else:
            values[1] = value
        stored[name].CopyFrom(numpy_helper.from_array(values, name))
    src = save(model, src_dir / "m.onnx")
    before = snapshot(src_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, out, err = run(src, out_dir / "b.onnx", "-q")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    first_bad = 0 if np.isnan(epsilon) else 1  # a NaN epsilon spoils every channel
    assert f"BatchNormalization '{node.name}', channel {first_bad}:" in err
    assert snapshot(src_dir) == before and not any(out_dir.iterdir())


def test_a_norm_beyond_float64_is_refused_without_warnings(dirs):
    """Weights near 1e30 are fine for p = q = 2, but ||W||_{2,20}^20 reaches about 1e600: the
    layer is named before any load overflows; trial points that overflow stay silent."""
    import warnings

    src_dir, out_dir = dirs
    model = mlp(widths=(4, 6, 5, 3), seed=2, spread=2.0)
    weight = model.graph.initializer[2]  # W1
    scaled = numpy_helper.to_array(weight).astype(np.float64) * 1e30
    weight.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), weight.name))
    src = save(model, src_dir / "m.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, out, err = run(src, out_dir / "b.onnx", "-q", "--p", "2", "--q", "20")
        assert code == 2 and err.count("\n") == 1 and not any(out_dir.iterdir())
        assert "layer 'gemm1': ||W||_{2,20}^20 of its weights reaches about 1e6" in err
        assert "choose a smaller q / p" in err
        assert run(src, out_dir / "b.onnx", "-q")[0] == 0  # p = q = 2: balanced
        tiny = mlp(widths=(4, 6, 5, 3), seed=2, spread=2.0)
        weight = tiny.graph.initializer[2]
        scaled = numpy_helper.to_array(weight).astype(np.float64) * 1e-10
        weight.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), weight.name))
        tiny_src = save(tiny, src_dir / "tiny.onnx")
        code, out, err = run(tiny_src, out_dir / "t.onnx", "-q", "--p", "0.5", "--q", "20")
        assert (code, out, err) == (0, "", "")  # far-out trial points overflow, silently


def test_quiet_prints_nothing_and_report_survives_failed_verification(dirs, monkeypatch):
    from onnxbalance import rewrite

    src_dir, out_dir = dirs
    src = save(mlp(seed=4), src_dir / "m.onnx", external=True)
    old = out_dir / "b.onnx"
    old.write_bytes(b"previous output")
    real = rewrite.rescaled_blocks

    def wrong(tensor, edits, scales):  # a broken rescaling of W1: verification must catch it
        shape, dtype, blocks = real(tensor, edits, scales)
        if tensor.name != "W1":
            return shape, dtype, blocks
        return shape, dtype, (block * 3 for block in blocks)

    monkeypatch.setattr(rewrite, "rescaled_blocks", wrong)
    code, out, err = run(src, old, "-q", "--report", out_dir / "r.json")
    assert code == 3 and out == ""
    assert len(err.splitlines()) == 1 and "differs" in err
    assert sorted(os.listdir(out_dir)) == ["b.onnx", "r.json"]
    assert old.read_bytes() == b"previous output"  # replaced only by a complete, verified one
    report = json.loads((out_dir / "r.json").read_text())
    assert report["verify"]["passed"] is False


def test_deterministic_bytes(dirs, tmp_path):
    src_dir, out_dir = dirs
    src = save(mlp(widths=(4, 8, 6, 3), seed=6), src_dir / "m.onnx", external=True)
    other = tmp_path / "again"
    other.mkdir()
    assert run(src, out_dir / "b.onnx", "-q")[0] == 0
    assert run(src, other / "b.onnx", "-q")[0] == 0
    first = snapshot(out_dir)
    assert first == snapshot(other)
    # over an existing output the data file takes the other name (the old model references
    # the first until the new model replaces it): same data bytes, and back to the first name
    assert run(src, out_dir / "b.onnx", "-q")[0] == 0
    second = snapshot(out_dir)
    assert sorted(second) == ["b.onnx", "b.onnx.1.data"]
    assert second["b.onnx.1.data"] == first["b.onnx.data"]
    assert run(src, out_dir / "b.onnx", "-q")[0] == 0
    assert snapshot(out_dir) == first


@pytest.mark.parametrize("external", [False, True])
def test_streamed_and_in_memory_rewrites_write_the_same_bytes(dirs, tmp_path, external):
    """Streaming rescaled weights into the file (into holes of the serialized model, or into the
    data file) gives exactly the bytes of the in-memory rewrite saved whole."""
    import onnxbalance
    from onnxbalance import io

    src_dir, out_dir = dirs
    src = save(mlp(widths=(4, 8, 6, 3), seed=6), src_dir / "m.onnx", external=external)
    assert run(src, out_dir / "b.onnx", "-q")[0] == 0
    balanced, _ = onnxbalance.balance(src)  # rewritten in memory, self-contained
    in_memory = tmp_path / "in_memory"
    in_memory.mkdir()
    layout = tensors.external_names(onnx.load(src, load_external_data=False))
    io.save_model(balanced, in_memory / "b.onnx", external=layout)
    assert snapshot(in_memory) == snapshot(out_dir)


def _spawn(args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "onnxbalance", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_while_writing_leaves_nothing(dirs, tmp_path, signum):
    src_dir, out_dir = dirs
    src = save(mlp(seed=8), src_dir / "m.onnx", external=True)
    (out_dir / "b.onnx").write_bytes(b"previous output")
    before, source_before = snapshot(out_dir), snapshot(src_dir)
    marker = tmp_path / "paused"
    proc = _spawn([src, out_dir / "b.onnx", "-q"], {safewrite._PAUSE_ENV: f"{marker}:60"})
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()
    staged = [p for p in out_dir.iterdir() if p.name.startswith(".")]
    assert staged  # the complete output is staged, verified, about to be committed
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum
    assert out == "" and err.strip() == "onnxbalance: error: interrupted"
    assert snapshot(out_dir) == before and snapshot(src_dir) == source_before


def test_terminate_at_any_moment_leaves_nothing_or_a_complete_output(dirs):
    """SIGTERM at several moments of a run: the folder is either as before (nothing written)
    or holds the complete output (the signal came after the commit)."""
    src_dir, out_dir = dirs
    src = save(mlp(widths=(8, 64, 64, 8), seed=9), src_dir / "m.onnx", external=True)
    outcomes = set()
    for delay in (0.3, 0.8, 1.5, 3.0):
        for path in out_dir.iterdir():
            path.unlink()
        proc = _spawn([src, out_dir / "b.onnx", "-q"])
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err
        names = sorted(os.listdir(out_dir))
        if names:
            assert names == ["b.onnx", "b.onnx.data"]
            np.testing.assert_allclose(
                ort_outputs(out_dir / "b.onnx", 8), ort_outputs(src, 8), rtol=1e-4, atol=1e-5
            )
        else:
            assert proc.returncode in (143, -signal.SIGTERM)
        outcomes.add(bool(names))


def test_api_and_check_on_external_data(dirs):
    """balance(path) returns a model that stands alone; --check reads external data lazily."""
    import onnxbalance

    src_dir, _ = dirs
    src = save(mlp(seed=11), src_dir / "m.onnx", external=True)
    before = snapshot(src_dir)
    balanced, report = onnxbalance.balance(src)
    assert report.verify.passed and not tensors.external_names(balanced)
    session = ort.InferenceSession(balanced.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(5).standard_normal((7, 4)).astype(np.float32)
    np.testing.assert_allclose(
        session.run(None, {"x": x})[0], ort_outputs(src, 4), rtol=1e-4, atol=1e-5
    )
    code, out, err = run(src, "--check", "-q")
    assert code == 1 and err == ""  # not balanced
    assert snapshot(src_dir) == before


def _external_with_data_named(folder: Path, location: str) -> Path:
    src = folder / "m.onnx"
    onnx.save_model(mlp(seed=3), src, save_as_external_data=True, location=location,
                    size_threshold=0)  # fmt: skip
    return src


@pytest.mark.parametrize("option", ["--report", "--plot"])
@pytest.mark.parametrize("check", [False, True])
def test_side_outputs_never_write_the_inputs_data(dirs, option, check):
    """IN's external data file (any name, here w.raw) is never a --report or --plot target,
    with --check too: one line, exit 2, IN and OUT's folder untouched."""
    pytest.importorskip("matplotlib")
    src_dir, out_dir = dirs
    src = _external_with_data_named(src_dir, "w.raw")
    before = snapshot(src_dir)
    target = ["--check"] if check else [out_dir / "b.onnx"]
    code, out, err = run(src, *target, option, src_dir / "w.raw")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "is the external data file w.raw of the input" in err
    assert snapshot(src_dir) == before and not any(out_dir.iterdir())


@pytest.mark.parametrize(
    ("report", "plot", "needle"),
    [("b.onnx.data", None, "would be OUT's data file"),
     ("b.onnx.1.data", None, "would be OUT's data file"),
     (None, "b.onnx.data", "would be OUT's data file"),
     ("b.onnx", None, "is OUT"),
     ("r.png", "r.png", "plot is the same file as the report"),
     ("x.npz", None, "same file as the input")],
)  # fmt: skip
def test_side_outputs_never_collide_with_out_its_data_or_each_other(dirs, report, plot, needle):
    pytest.importorskip("matplotlib")
    src_dir, out_dir = dirs
    src = save(mlp(seed=4), src_dir / "m.onnx", external=True)
    np.savez(out_dir / "x.npz", x=np.ones((2, 4), np.float32))
    (out_dir / "b.onnx").write_bytes(b"previous output")
    before = snapshot(out_dir)
    args = [src, out_dir / "b.onnx", "--inputs", out_dir / "x.npz"]
    args += ["--report", out_dir / report] if report else []
    args += ["--plot", out_dir / plot] if plot else []
    code, out, err = run(*args)
    assert code == 2 and out == "" and err.count("\n") == 1 and needle in err, err
    assert snapshot(out_dir) == before


def test_a_plot_replaces_its_file_never_a_hard_link_to_it(dirs):
    """The plot is written like every output (a rename), so another name of the old file keeps
    its bytes; an unsupported format is refused before OUT is written."""
    pytest.importorskip("matplotlib")
    src_dir, out_dir = dirs
    src = save(mlp(seed=4), src_dir / "m.onnx")
    kept = src_dir / "kept.png"
    kept.write_bytes(b"another name of the same file")
    os.link(kept, out_dir / "p.png")
    code, out, err = run(src, out_dir / "b.onnx", "--plot", out_dir / "p.png", "-q")
    assert (code, out, err) == (0, "", "")
    assert kept.read_bytes() == b"another name of the same file"
    assert (out_dir / "p.png").read_bytes()[:4] == b"\x89PNG"
    code, out, err = run(src, out_dir / "c.onnx", "--plot", out_dir / "p.txt")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "cannot draw a .txt image; use one of" in err and ".png" in err
    assert sorted(os.listdir(out_dir)) == ["b.onnx", "p.png"]


@pytest.mark.parametrize("kind", ["a FIFO", "a character device"])
def test_out_naming_a_special_file_is_refused_never_replaced(dirs, kind):
    """OUT a FIFO, or a symlink to /dev/null (the test never names /dev/null itself: code that
    renames over OUT would replace the machine's /dev/null): one line, the node untouched."""
    import stat

    src_dir, out_dir = dirs
    src = save(mlp(seed=4), src_dir / "m.onnx")
    target = out_dir / "b.onnx"
    if kind == "a FIFO":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/null")
    code, out, err = run(src, target)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"{target}: output is {kind}, not a regular file" in err
    if kind == "a FIFO":
        assert stat.S_ISFIFO(os.lstat(target).st_mode)
    else:
        assert target.is_symlink() and stat.S_ISCHR(os.stat(target).st_mode)
    assert os.listdir(out_dir) == ["b.onnx"]


def test_report_into_a_fifo_is_written_not_replaced(dirs):
    import stat
    import threading

    src_dir, out_dir = dirs
    src = save(mlp(seed=4), src_dir / "m.onnx")
    fifo = out_dir / "report.pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    code, out, err = run(src, out_dir / "b.onnx", "--report", fifo, "-q")
    reader.join(timeout=60)
    assert (code, out, err) == (0, "", "")
    assert json.loads(received[0])["verify"]["passed"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_report_to_stdout(dirs):
    """`--report -` and a symlink to /proc/self/fd/1 (what /dev/stdout is) write the JSON to
    stdout; with `-` stdout carries the JSON alone and the summary goes to stderr; the symlink
    stays a symlink."""
    src_dir, out_dir = dirs
    src = save(mlp(seed=4), src_dir / "m.onnx")
    code, out, err = run(src, out_dir / "b.onnx", "--report", "-")
    assert code == 0 and json.loads(out)["norm_ratio"] < 1
    assert "norm before" in err and "onnxbalance: error" not in err
    link = out_dir / "stdout"
    link.symlink_to("/proc/self/fd/1")
    proc = _spawn([src, out_dir / "c.onnx", "--report", link, "-q"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err == ""
    assert json.loads(out)["output"] == str(out_dir / "c.onnx")
    assert link.is_symlink() and os.readlink(link) == "/proc/self/fd/1"


def test_a_report_failing_after_out_is_committed_has_its_own_exit_code(dirs, monkeypatch):
    """Side outputs are checked before any work; if the disk then fails for the report, OUT is
    in place: exit 4 and a line that says so (not 2, 'OUT cannot be written')."""
    from onnxbalance import io as obio
    from onnxbalance.errors import OutputError

    src_dir, out_dir = dirs
    src = save(mlp(seed=4), src_dir / "m.onnx", external=True)

    def disk_full(path, data):
        raise OutputError(f"{path}: cannot write: No space left on device")

    monkeypatch.setattr(obio, "write_bytes", disk_full)
    code, out, err = run(src, out_dir / "b.onnx", "--report", out_dir / "r.json", "-q")
    assert code == 4 and out == "" and err.count("\n") == 1
    assert "No space left on device" in err and f"OUT {out_dir / 'b.onnx'} was written" in err
    np.testing.assert_allclose(
        ort_outputs(out_dir / "b.onnx", 4), ort_outputs(src, 4), rtol=1e-4, atol=1e-5
    )


def test_long_names_are_not_refused_for_temporary_names(dirs):
    """OUT and the report may use every one of NAME_MAX's 255 bytes their data file leaves."""
    src_dir, out_dir = dirs
    src = save(mlp(seed=4), src_dir / "m.onnx", external=True)
    out = out_dir / ("o" * 235 + ".onnx")
    report = out_dir / ("r" * 250 + ".json")
    code, stdout, err = run(src, out, "--report", report, "-q")
    assert (code, stdout, err) == (0, "", "")
    assert sorted(os.listdir(out_dir)) == sorted([out.name, out.name + ".data", report.name])


def _zero_width_layer(folder: Path) -> list:
    return [save(mlp(widths=(4, 0, 3), seed=4), folder / "zero.onnx")]


HOSTILE = {
    "zero-width hidden layer": (
        _zero_width_layer, [], "layer 'gemm0' has an empty weight (shape (0, 4)): a zero-width"
    ),
    "q 1e-300": (None, ["--q", "1e-300"], "--q must be between 0.01 and 100, got 1e-300"),
    "p 1e300": (None, ["--p", "1e300"], "--p must be between 0.01 and 100, got 1e+300"),
    "seed -1": (None, ["--seed", "-1"], "--seed must be an integer from 0 to 2**64 - 1, got -1"),
    "huge input shape": (
        None, ["--input-shape", "x=99999999999999999999,4"],
        "4e+20 elements, more than the 2147483647 a verification input can hold",
    ),
    "plot format": (None, ["--plot", "p.txt"], "cannot draw a .txt image"),
}  # fmt: skip


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_inputs_and_options_are_one_line_exit_2(dirs, case):
    """Each of these was a traceback (exit 1); now one line naming the problem, exit 2, nothing
    written (the plot's format is refused before OUT exists), IN untouched."""
    src_dir, out_dir = dirs
    make, options, needle = HOSTILE[case]
    src = make(src_dir)[0] if make else save(mlp(seed=4), src_dir / "m.onnx")
    options = [str(out_dir / o) if o.endswith(".txt") else o for o in options]
    before = snapshot(src_dir)
    code, out, err = run(src, out_dir / "b.onnx", *options)
    assert code == 2 and out == "", err
    assert err.startswith("onnxbalance: error: ") and err.count("\n") == 1 and needle in err, err
    assert snapshot(src_dir) == before and not any(out_dir.iterdir())


@pytest.mark.parametrize("size", [-1, -3])
def test_a_negative_input_dimension_is_dynamic(dirs, size):
    """onnxruntime takes a negative declared size for a dynamic one, and paddle2onnx writes -1:
    such a model balances and is verified on a batch of 8 like any dynamic batch."""
    src_dir, out_dir = dirs
    model = mlp(seed=4)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = size  # onnx.checker allows it
    src = save(model, src_dir / "neg.onnx")
    code, out, err = run(src, out_dir / "b.onnx", "--report", out_dir / "r.json", "-q")
    assert (code, out, err) == (0, "", "")
    report = json.loads((out_dir / "r.json").read_text())
    assert report["units_balanced"] > 0 and report["verify"]["passed"]
    assert report["verify"]["input_shapes"]["x"][0] == 8, report["verify"]["input_shapes"]


def test_in_memory_models_are_checked_like_files():
    import onnxbalance
    from onnxbalance.errors import InputError

    model = mlp(seed=4)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    assert onnxbalance.balance(model)[1].verify.passed
    with pytest.raises(InputError, match="--seed must be an integer"):
        onnxbalance.balance(mlp(seed=4), seed=-1)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_start_up_is_one_line(dirs, signum):
    """The handlers are installed before numpy, onnx and typer load: a signal at any moment of
    the first second ends with the one line, 128 + signal, no traceback, nothing written."""
    src_dir, out_dir = dirs
    src = save(mlp(seed=4), src_dir / "m.onnx")
    interrupted = 0
    for delay in (0.3, 0.45, 0.6, 0.8, 1.0, 1.3):
        out = out_dir / f"after-{delay}"  # a run the signal came too late for writes its own
        out.mkdir()
        proc = _spawn([src, out / "b.onnx", "-q"])
        time.sleep(delay)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        written = sorted(p.name for p in out.iterdir())
        if proc.returncode in (0, -signum):
            # too late (the run was over, or the interpreter was shutting down and had given the
            # signal its default action back) or too early (before the interpreter ran any code)
            assert err == ""
            assert written in ([], ["b.onnx"])
            if written:
                onnx.checker.check_model(onnx.load(out / "b.onnx"))
            continue
        assert written == []
        assert (proc.returncode, err) == (128 + signum, "onnxbalance: error: interrupted\n")
        interrupted += 1
    assert interrupted >= 1


_LOST_IN_A_CALLBACK = """
import os, signal, sys, time, weakref
from onnxbalance.__main__ import handle_interrupts
from onnxbalance.errors import Interrupted
if sys.argv[1] == "handled":
    handle_interrupts()
else:  # what raising from the handler alone does
    def handler(signum, frame):
        raise Interrupted(signum)
    signal.signal(signal.SIGTERM, handler)
class Held:
    pass
held = Held()
def callback(ref):
    os.kill(os.getpid(), signal.SIGTERM)  # the handler runs in here, where raising is ignored
ref = weakref.ref(held, callback)
try:
    del held
    time.sleep(5)
    print("not interrupted")
except Interrupted as exc:
    print("interrupted", exc.signum)
"""


@pytest.mark.parametrize("handling", ["handled", "plain"])
def test_an_interrupt_landing_in_a_weakref_callback_is_not_lost(handling):
    """A signal can arrive while a weakref callback runs (the import system has them): Python
    prints the raised interrupt as "Exception ignored" and drops it. The command's handling
    delivers it again once the main thread is back where it can be raised, silently."""
    done = subprocess.run(
        [sys.executable, "-c", _LOST_IN_A_CALLBACK, handling], capture_output=True, text=True
    )
    if handling == "handled":
        assert (done.stdout, done.stderr) == (f"interrupted {int(signal.SIGTERM)}\n", "")
    else:  # the failure the handling exists for, still there in Python itself
        assert done.stdout == "not interrupted\n"
        assert "Exception ignored" in done.stderr


def test_in_memory_verification_failure_speaks_of_no_file(monkeypatch):
    """balance() writes nothing: its failure names the model it would have returned."""
    import onnxbalance
    from onnxbalance import rewrite
    from onnxbalance.errors import VerificationError

    real = rewrite.rewrite

    def wrong(model, units, log_scales, **kwargs):
        balanced = real(model, units, log_scales, **kwargs)
        (w1,) = [t for t in balanced.graph.initializer if t.name == "W1"]
        w1.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w1) * 3, "W1"))
        return balanced

    monkeypatch.setattr(rewrite, "rewrite", wrong)
    with pytest.raises(VerificationError) as info:
        onnxbalance.balance(mlp(seed=4))
    message = str(info.value)
    assert "written" not in message and "file" not in message
    assert message.endswith("the balanced model is not returned (see error.model)")
    assert isinstance(info.value.model, onnx.ModelProto)


def test_sigkill_leaves_a_staging_folder_that_the_next_run_removes(dirs, tmp_path):
    """SIGKILL cannot be caught: the staged output stays behind, hidden, and the previous OUT
    is intact; the next run on the same OUT removes it."""
    src_dir, out_dir = dirs
    src = save(mlp(seed=8), src_dir / "m.onnx", external=True)
    assert run(src, out_dir / "b.onnx", "-q")[0] == 0
    before = snapshot(out_dir)
    marker = tmp_path / "paused"
    pause = {safewrite._PAUSE_ENV: f"{marker}:60"}
    proc = _spawn([src, out_dir / "b.onnx", "-q", "--p", "1"], pause)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()
    proc.kill()
    proc.communicate(timeout=60)
    (staging,) = [p for p in out_dir.iterdir() if p.name.startswith(".onnxbalance-")]
    assert any(staging.iterdir())  # the complete staged output, never committed
    visible = {name: digest for name, digest in snapshot(out_dir).items() if name[0] != "."}
    assert visible == before
    assert run(src, out_dir / "b.onnx", "-q")[0] == 0
    assert sorted(os.listdir(out_dir)) == ["b.onnx", "b.onnx.1.data"]


def _promise_cases(src: Path, src_dir: Path, out_dir: Path) -> dict[str, list]:
    out = out_dir / "b.onnx"
    fifo = out_dir / "fifo"
    return {
        "report is IN": [src, out, "--report", src],
        "report is IN's data": [src, out, "--report", src_dir / "m.onnx.bin"],
        "check, report is IN's data": [src, "--check", "--report", src_dir / "m.onnx.bin"],
        "plot is IN's data": [src, out, "--plot", src_dir / "m.onnx.bin"],
        "report is OUT's data": [src, out, "--report", out_dir / "b.onnx.data"],
        "report is OUT's next data": [src, out, "--report", out_dir / "b.onnx.1.data"],
        "report is OUT": [src, out, "--report", out],
        "plot is the report": [src, out, "--report", out_dir / "r", "--plot", out_dir / "r"],
        "OUT is IN": [src, src],
        "OUT is IN's data": [src, src_dir / "m.onnx.bin"],
        "OUT is a FIFO": [src, fifo],
        "plot format": [src, out, "--plot", out_dir / "p.txt"],
        "q 1e-300": [src, out, "--q", "1e-300"],
        "seed -1": [src, out, "--seed", "-1"],
        "huge shape": [src, out, "--input-shape", "x=99999999999999999999,4"],
        "quiet and verbose": [src, out, "-q", "-v"],
        "two OUTs": [src, out, out_dir / "c.onnx"],
        "fine, over the old OUT": [src, out, "-q"],
    }


@pytest.mark.parametrize("case", list(_promise_cases(Path("m"), Path("i"), Path("o"))))
def test_readme_promises_hold_against_hostile_paths_and_options(dirs, case):
    """The README promises: IN (and every file it references) is never written; OUT is complete
    or absent (an existing OUT is replaced only by a complete, verified output); every error is
    one line, never a traceback. Each case breaks one of them on a tool that does not keep
    them."""
    src_dir, out_dir = dirs
    src = save(mlp(seed=8), src_dir / "m.onnx", external=True)
    assert run(src, out_dir / "b.onnx", "-q", "--p", "1")[0] == 0  # an existing OUT
    os.mkfifo(out_dir / "fifo")
    previous_out, previous_in = snapshot(out_dir), snapshot(src_dir)
    code, out, err = run(*_promise_cases(src, src_dir, out_dir)[case])
    assert snapshot(src_dir) == previous_in
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]
    if code == 0:
        assert err == ""
        np.testing.assert_allclose(
            ort_outputs(out_dir / "b.onnx", 4), ort_outputs(src, 4), rtol=1e-4, atol=1e-5
        )
    else:
        assert code == 2 and out == "" and "Traceback" not in err
        assert err.startswith("onnxbalance: error: ") and err.count("\n") == 1, err
        assert snapshot(out_dir) == previous_out


@pytest.mark.parametrize("during", ["renames", "summary"])
@pytest.mark.parametrize("report", [False, True])
def test_an_interrupt_once_out_is_written_is_too_late(dirs, monkeypatch, during, report):
    """A signal that lands while OUT is renamed into place (held until the renames and the
    clean-up are done) or after it (while the summary is made) cannot unwrite OUT: the run
    succeeded, silently with --quiet. Only a report still to be written makes it an interrupt,
    whose one line says OUT was written."""
    import onnxbalance.cli as cli

    src_dir, out_dir = dirs
    src = save(mlp(seed=4), src_dir / "m.onnx")
    out = out_dir / "b.onnx"
    patched, name = (safewrite, "_fsync_dir") if during == "renames" else (cli, "_finish")
    original = getattr(patched, name)

    def interrupted_then(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs at the next bytecode: it has, by now
        return original(*args, **kwargs)

    monkeypatch.setattr(patched, name, interrupted_then)
    options = ["--report", str(out_dir / "r.json")] if report else []
    code, stdout, stderr = run(src, out, "-q", *options)
    assert sorted(p.name for p in out_dir.iterdir()) == ["b.onnx"]  # no staging folder left
    onnx.checker.check_model(onnx.load(out))
    assert stdout == ""
    if report:
        assert code == 128 + signal.SIGINT
        assert stderr == f"onnxbalance: error: interrupted (OUT {out} was written)\n"
    else:
        assert (code, stderr) == (0, "")


def _deep_constant_chain(reader: str, links: int = 3000) -> onnx.ModelProto:
    """x -> MatMul -> Relu -> a reader whose constant passes ``links`` nodes first: a Gemm's
    bias behind Identity nodes, or an LSTM's input weight behind Slices (then Unsqueeze)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    stored = [
        numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "first"),
        numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(size=(8,)).astype(np.float32), "b"),
        numpy_helper.from_array(rng.normal(size=(1, 8, 2)).astype(np.float32), "R"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([2**62], np.int64), "end"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "first"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
    ]
    source = "b" if reader == "Gemm" else "W"
    for k in range(links):
        inputs = [source] if reader == "Gemm" else [source, "zero", "end", "zero"]
        nodes.append(
            helper.make_node("Identity" if reader == "Gemm" else "Slice", inputs, [f"c{k}"])
        )
        source = f"c{k}"
    if reader == "Gemm":
        nodes.append(helper.make_node("Gemm", ["a", "W", source], ["y"], transB=1))
        output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 8])
    else:
        nodes.append(helper.make_node("Unsqueeze", [source, "zero"], ["Wx"]))
        nodes.append(helper.make_node("LSTM", ["a", "Wx", "R"], ["y"], hidden_size=2))
        output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 1, 2])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 3])]
    if reader == "LSTM":
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, 3])]
    graph = helper.make_graph(nodes, "deep", inputs, [output], stored)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("reader", "balanced"), [("Gemm", 4), ("LSTM", 0)])
def test_thousands_of_nodes_before_a_constant_are_no_traceback(dirs, reader, balanced):
    # the chain is followed a few links deep at most: beyond, the constant counts as computed
    # (the Gemm's rows, whose bias it is, are no hidden units; the LSTM's weight fixes them)
    src, out = dirs
    onnx.save(_deep_constant_chain(reader), src / "deep.onnx")
    code, stdout, stderr = run(src / "deep.onnx", out / "o.onnx", "--report", "-", "-q")
    assert code == 0 and not stderr, stderr
    report = json.loads(stdout)
    assert report["units_found"] == 4 and report["units_balanced"] == balanced
    assert report["verify"]["passed"] if balanced else report["verify"] is None
