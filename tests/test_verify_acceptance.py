"""Verification on what users verify: exported nets balance and pass, planted errors fail.

Every check here is against an independent fact: the balanced file is run again in onnxruntime
next to the input on fresh inputs, the planted errors are known to change the function, and the
integer ranges are those of the tables the model stores.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import verify_models as vm
from gemm_mlp import gemm_mlp

import onnxbalance
from onnxbalance.cli import main
from onnxbalance.verify import FACTOR, index_bounds, make_inputs, run_model

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def exported():
    """Each acceptance model once: float32 as exported, and its keep_io_types float16 form."""
    models = {kind: vm.torch_model(kind, seed=0) for kind in ("resnet", "inception", "sigmoid")}
    models |= {f"{kind} float16": vm.float16(m) for kind, m in list(models.items())}
    return models


def _fresh_deviation(a: onnx.ModelProto, b: onnx.ModelProto) -> float:
    """max |b - a| / max |a| on inputs the verification never saw."""
    x = np.random.default_rng(99).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ya, yb = (run_model(m, {"x": x}, "it")["y"].astype(np.float64) for m in (a, b))
    return float(np.abs(yb - ya).max() / np.abs(ya).max())


@pytest.mark.parametrize(
    "kind",
    ["resnet", "inception", "sigmoid", "resnet float16", "inception float16", "sigmoid float16"],
)
def test_exported_models_balance_and_are_written_on_several_seeds(exported, kind, tmp_path):
    model = exported[kind]
    src = tmp_path / "in.onnx"
    onnx.save(model, src)
    for seed in SEEDS:
        out, report_path = tmp_path / f"out{seed}.onnx", tmp_path / f"r{seed}.json"
        code = main([str(src), str(out), "--seed", str(seed), "--report", str(report_path), "-q"])
        assert code == 0 and out.exists()
        report = json.loads(report_path.read_text())
        assert report["units_balanced"] > 0 and report["norm_ratio"] < 0.9
        verify = report["verify"]
        assert verify["passed"] and verify["rule"] == "noise_floor" and verify["n_inputs"] == 4
        assert verify["input_shapes"] == {"x": [1, 3, 32, 32]}
        (output,) = verify["outputs"]
        assert 0 < output["noise_floor"] and output["max_abs_diff"] <= output["atol"]
        assert output["tolerance_ratio"] < 1
    # the function really is the same: within float16's or float32's round-off on fresh inputs
    limit = 0.05 if "float16" in kind else 1e-4
    assert _fresh_deviation(model, onnx.load(out)) < limit


def test_the_sigmoid_output_is_near_zero_and_its_tolerance_is_not_1e_9(exported):
    _, report = onnxbalance.balance(exported["sigmoid"])
    (output,) = report.verify.outputs
    y = run_model(exported["sigmoid"], {"x": np.ones((1, 3, 32, 32), np.float32)}, "it")["y"]
    assert float(y.max()) < 2e-3  # the output is tiny on any input
    assert output.passed and output.atol > 1e-7 and output.noise_floor > 0


@pytest.fixture(scope="module")
def planted_bases(exported):
    """Balanced models that planted errors are hidden in: the Inception net (a deep, wide
    conv net) and an MLP, in float32 and as float16 conversions."""
    mlp = gemm_mlp([16, 32, 32, 4], seed=0)
    bases = {"inception": exported["inception"], "mlp": mlp, "mlp float16": vm.float16(mlp)}
    bases["inception float16"] = exported["inception float16"]
    return {name: onnxbalance.balance(model)[0] for name, model in bases.items()}


PLANTED_FLOAT32 = {
    "one unit's incoming weights x 1.001": lambda m: vm.scaled_unit(m, 1.001),
    "output channels 0 and 1 swapped": vm.swapped_outputs,
    "output bias moved by 1e-3 of its range": lambda m: vm.shifted_bias(m, 1e-3),
    "weights replaced by the float16 rounding of values 1% away": vm.rerounded,
}
# In float16 one unit in the last place is 2^-10 ~ 1e-3 relative: a 1.001 scaling or a 1e-3
# shift is as large as the rounding every balanced weight undergoes, so no check can tell it
# from round-off (measured: 0.01 of the tolerance at most). The errors planted there are larger;
# the unit is scaled only in the MLP, where one unit of 32 carries a visible share of the output
# (in the Inception net it is one of 64 channels averaged by the pooling: within the noise).
PLANTED_FLOAT16 = {
    "one unit's incoming weights x 1.25": lambda m: vm.scaled_unit(m, 1.25),
    "output channels 0 and 1 swapped": vm.swapped_outputs,
    "weights replaced by the float16 rounding of values 10% away": lambda m: vm.rerounded(m, 0.1),
}


@pytest.mark.parametrize("base", ["inception", "mlp"])
@pytest.mark.parametrize("plant", list(PLANTED_FLOAT32))
def test_planted_errors_fail_in_float32(planted_bases, base, plant):
    _assert_caught(planted_bases[base], PLANTED_FLOAT32[plant](planted_bases[base]))


@pytest.mark.parametrize(
    ("base", "plant"),
    [("mlp float16", plant) for plant in PLANTED_FLOAT16]
    + [("inception float16", plant) for plant in list(PLANTED_FLOAT16)[1:]],
)
def test_planted_errors_fail_in_float16(planted_bases, base, plant):
    _assert_caught(planted_bases[base], PLANTED_FLOAT16[plant](planted_bases[base]))


def _assert_caught(model: onnx.ModelProto, planted: onnx.ModelProto) -> None:
    assert onnxbalance.compare(model, model).passed  # the base itself is fine
    for seed in SEEDS:
        result = onnxbalance.compare(model, planted, seed=seed)
        assert not result.passed
        (failure,) = result.failures
        assert failure.tolerance_ratio > 1 and "outside tolerance" in failure.reason


def test_compare_command_exit_codes_and_report(planted_bases, tmp_path, capsys):
    model = planted_bases["inception"]
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(model, good)
    onnx.save(vm.swapped_outputs(model), bad)
    assert main(["compare", str(good), str(good), "--report", str(tmp_path / "r.json")]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "PASSED" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verify"]["passed"] and report["first"] == str(good)
    assert main(["compare", str(good), str(bad), "-q"]) == 3
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith("onnxbalance: error: ") and "times the tolerance" in err
    assert "--inputs" in err and "--rtol/--atol" in err
    # the same difference accepted when the caller says it is tolerable
    assert main(["compare", str(good), str(bad), "-q", "--atol", "1e3"]) == 0
    assert main(["compare", str(good), str(tmp_path / "missing.onnx"), "-q"]) == 2
    _, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and "missing.onnx" in err
    assert main(["compare", str(good), str(good), "--atol", "-1", "-q"]) == 2


def test_the_positional_form_still_balances(tmp_path, capsys):
    src, out = tmp_path / "compare", tmp_path / "out.onnx"  # a file named like the command
    onnx.save(gemm_mlp([4, 8, 3], seed=1, scale_hidden=[10.0]), src)
    assert main([str(src), str(out), "--p", "2", "--q", "2", "-q"]) == 0 and out.exists()


def test_a_failed_balance_says_how_far_and_what_to_try(tmp_path, capsys):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(gemm_mlp([4, 8, 3], seed=1, scale_hidden=[10.0]), src)
    assert main([str(src), str(out), "-q", "--rtol", "0", "--atol", "1e-30"]) == 3
    _, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and "times the tolerance" in err and not out.exists()
    for option in ("--inputs", "--rtol/--atol", "--no-verify"):
        assert option in err


def test_integer_inputs_follow_the_tables_they_index():
    model = vm.embedding_ffn(seed=0)
    assert index_bounds(model) == {"input_ids": vm.VOCABULARY, "token_type_ids": vm.TOKEN_TYPES}
    (feed,) = make_inputs(model)  # dynamic batch: one draw of 8 rows of 16 tokens
    ids, types = feed["input_ids"], feed["token_type_ids"]
    assert ids.shape == types.shape == (8, 16)
    assert ids.min() >= 0 and ids.max() < vm.VOCABULARY and ids.max() > 0.9 * vm.VOCABULARY
    assert len(np.unique(ids)) > 100  # spread over the vocabulary, not a handful of ids
    assert set(np.unique(types)) == {0, 1}
    _, report = onnxbalance.balance(model)
    assert report.verify.passed and report.verify.n_inputs == 8
    assert report.verify.input_shapes == {"input_ids": (8, 16), "token_type_ids": (8, 16)}


def test_integer_inputs_reach_the_table_through_cast_and_unsqueeze():
    model = vm.embedding_ffn(seed=0)
    gather = next(n for n in model.graph.node if n.input[1:] == ["input_ids"])
    gather.input[1] = "ids_cast"
    model.graph.node.insert(
        0, onnx.helper.make_node("Cast", ["input_ids"], ["ids_cast"], to=onnx.TensorProto.INT32)
    )
    assert index_bounds(model)["input_ids"] == vm.VOCABULARY


def test_the_noise_floor_factor_separates_rescaled_from_changed_models():
    """An equivalent model rescaled by large factors passes well inside the tolerance; the
    same model with one weight 1% off fails far outside it."""
    original = gemm_mlp([10, 20, 20, 4], seed=1)
    rescaled = gemm_mlp([10, 20, 20, 4], seed=1, scale_hidden=[1e3, 1e-3])
    passed = onnxbalance.compare(original, rescaled)
    assert passed.passed and passed.tolerance_ratio < 1 / 2
    changed = vm.scaled_unit(rescaled, 1.01)
    assert onnxbalance.compare(original, changed).tolerance_ratio > FACTOR


def test_compare_help_and_report_to_stdout(tmp_path, capsys):
    assert main(["compare", "--help"]) == 0
    helped = capsys.readouterr().out
    assert helped.startswith("Usage: onnxbalance compare [OPTIONS] A B")
    assert "{A}" not in helped and "<bool>" not in helped and "--rtol R" in helped
    model = tmp_path / "m.onnx"
    onnx.save(gemm_mlp([4, 8, 3], seed=1), model)
    assert main(["compare", str(model), str(model), "--report", "-"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["verify"]["passed"] and "onnxbalance compare" in err  # the table
    assert main(["compare", str(model), str(model), "--report", str(model), "-q"]) == 2
    assert "m.onnx" in capsys.readouterr().err
