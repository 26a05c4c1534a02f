"""The command line: exit codes, one-line errors, nothing left behind, input never touched."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gemm_mlp import gemm_mlp, linear_model
from typer.testing import CliRunner

from onnxbalance.cli import app, main, parse_input_shapes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path):
    onnx.save(gemm_mlp([10, 16, 16, 4], seed=7, scale_hidden=[6.0, 0.1]), tmp_path / "in.onnx")
    return tmp_path


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(err: str, *needles: str) -> None:
    assert err.startswith("onnxbalance: error: "), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def outputs_of(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_balance_writes_output_and_report(folder, capsys):
    src, dst, rep = folder / "in.onnx", folder / "out.onnx", folder / "r.json"
    before = digest(src)
    code, out, err = cli(capsys, src, dst, "--p", 2, "--q", 2, "--report", rep)
    assert code == 0, err
    assert err == ""
    assert listing(folder) == ["in.onnx", "out.onnx", "r.json"]
    assert digest(src) == before
    for row in ("units found", "units balanced", "norm before", "norm after", "ratio",
                "solver", "PASSED", "seconds write"):  # fmt: skip
        assert row in out
    data = json.loads(rep.read_text())
    for key in ("p", "q", "norm_before", "norm_after", "sweeps", "converged", "units_balanced",
                "units_fixed", "verify", "seconds", "solver", "passes", "history"):  # fmt: skip
        assert key in data
    assert data["verify"]["passed"] is True and data["units_balanced"] == 32
    assert set(data["seconds"]) == {"load", "analyse", "solve", "rewrite", "verify", "write"}
    assert data["norm_after"] < data["norm_before"]
    x = np.random.default_rng(1).standard_normal((32, 10)).astype(np.float32)
    np.testing.assert_allclose(outputs_of(dst, x), outputs_of(src, x), rtol=1e-4, atol=1e-5)


def test_quiet_prints_nothing(folder, capsys):
    code, out, err = cli(capsys, folder / "in.onnx", folder / "out.onnx", "--quiet")
    assert (code, out, err) == (0, "", "")
    assert (folder / "out.onnx").exists()


def test_verbose_logs_stages_on_stderr(folder, capsys):
    code, out, err = cli(capsys, folder / "in.onnx", folder / "out.onnx", "-v", "--no-verify")
    assert code == 0
    assert "analyse" in err and "verification" in out and "skipped" in out
    assert "onnxbalance" in out  # the table goes to stdout, logs to stderr


def test_check_mode_exit_codes_and_writes_nothing(folder, capsys):
    src = folder / "in.onnx"
    code, out, _ = cli(capsys, src, "--check")
    assert code == 1 and "NOT balanced" in out
    assert listing(folder) == ["in.onnx"]
    assert cli(capsys, src, folder / "out.onnx", "--quiet")[0] == 0
    code, out, err = cli(capsys, folder / "out.onnx", "--check")
    assert code == 0 and "balanced" in out and "NOT" not in out, err
    code, out, err = cli(capsys, src, "--check", "--quiet")
    assert (code, out, err) == (1, "", "")


def test_check_with_report(folder, capsys):
    code, _, _ = cli(capsys, folder / "in.onnx", "--check", "--report", folder / "c.json", "-q")
    assert code == 1
    data = json.loads((folder / "c.json").read_text())
    assert data["input_balanced"] is False and data["verify"] is None


def test_nothing_to_balance_copies(tmp_path, capsys):
    onnx.save(linear_model(), tmp_path / "lin.onnx")
    code, out, err = cli(capsys, tmp_path / "lin.onnx", tmp_path / "copy.onnx")
    assert code == 0, err
    assert "nothing to balance" in out
    original = onnx.load(tmp_path / "lin.onnx")
    assert onnx.load(tmp_path / "copy.onnx").SerializeToString() == original.SerializeToString()


def _bad_inputs(folder: Path) -> dict[str, tuple[list, str]]:
    src = folder / "in.onnx"
    (folder / "text.onnx").write_text("hello, not onnx\n")
    (folder / "cut.onnx").write_bytes(src.read_bytes()[:700])
    (folder / "link.onnx").symlink_to(src)
    np.savez(folder / "wrong.npz", z=np.ones((1, 10), np.float32))
    return {
        "missing": ([folder / "nope.onnx", folder / "o.onnx"], "no such file"),
        "not onnx": ([folder / "text.onnx", folder / "o.onnx"], "text.onnx"),
        "truncated": ([folder / "cut.onnx", folder / "o.onnx"], "cut.onnx"),
        "out folder missing": ([src, folder / "no" / "o.onnx"], "does not exist"),
        "out is in": ([src, src], "same file"),
        "out is a symlink to in": ([src, folder / "link.onnx"], "same file"),
        "p zero": ([src, folder / "o.onnx", "--p", "0"], "--p must be a positive"),
        "p negative": ([src, folder / "o.onnx", "--p", "-1"], "--p must be a positive"),
        "q negative": ([src, folder / "o.onnx", "--q", "-2"], "--q must be a positive"),
        "no OUT": ([src], "missing OUT"),
        "two OUTs": ([src, folder / "o.onnx", folder / "p.onnx"], "several models are for --check"),
        "quiet and verbose": ([src, folder / "o.onnx", "-q", "-v"], "--quiet and --verbose"),
        "OUT is stdout": ([src, "-"], "OUT -: only --report can go to stdout"),
        "plot to stdout": ([src, folder / "o.onnx", "--plot", "-"], "--plot -: only --report"),
        "report with several checks": (
            [src, src, "--check", "--report", folder / "r.json"],
            "--report and --plot take a single",
        ),
        "bad input shape": ([src, folder / "o.onnx", "--input-shape", "x"], "NAME=D1"),
        "unknown input": ([src, folder / "o.onnx", "--input-shape", "z=1,10"], "z"),
        "missing npz": ([src, folder / "o.onnx", "--inputs", folder / "a.npz"], "a.npz"),
        "npz names": ([src, folder / "o.onnx", "--inputs", folder / "wrong.npz"], "missing x"),
        "report is in": ([src, folder / "o.onnx", "--report", src], "same file"),
        "unknown option": ([src, folder / "o.onnx", "--frobnicate"], "frobnicate"),
        "bad solver": ([src, folder / "o.onnx", "--solver", "magic"], "magic"),
        "p not a number": ([src, folder / "o.onnx", "--p", "two"], "--p"),
    }


BAD = [
    "missing", "not onnx", "truncated", "out folder missing", "out is in",
    "out is a symlink to in", "p zero", "p negative", "q negative", "no OUT", "two OUTs",
    "quiet and verbose", "report with several checks", "OUT is stdout", "plot to stdout",
    "bad input shape", "unknown input", "missing npz", "npz names", "report is in",
    "unknown option",
    "bad solver", "p not a number",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_usage_and_inputs_exit_2_with_one_line(folder, capsys, case):
    args, needle = _bad_inputs(folder)[case]
    before = listing(folder)
    src_digest = digest(folder / "in.onnx")
    code, out, err = cli(capsys, *args)
    assert code == 2
    assert out == ""
    assert_one_line_error(err, needle)
    assert listing(folder) == before  # no output, no temporary file
    assert digest(folder / "in.onnx") == src_digest


def test_verification_failure_exit_3_writes_report_not_model(folder, capsys, monkeypatch):
    import onnxbalance.rewrite as rewrite_module

    real = rewrite_module.rescaled_blocks

    def wrong(tensor, edits, scales):  # W2 rescaled wrongly as it is written
        shape, dtype, blocks = real(tensor, edits, scales)
        if tensor.name != "W2":
            return shape, dtype, blocks
        return shape, dtype, (block * np.float32(3) for block in blocks)

    monkeypatch.setattr(rewrite_module, "rescaled_blocks", wrong)
    src, rep = folder / "in.onnx", folder / "r.json"
    code, out, err = cli(capsys, src, folder / "out.onnx", "--report", rep)
    assert code == 3
    assert_one_line_error(err, "differs")
    assert "FAILED" in out
    assert listing(folder) == ["in.onnx", "r.json"]
    data = json.loads(rep.read_text())
    assert data["verify"]["passed"] is False and data["verify"]["max_rel_diff"] > 0.1
    code, out, err = cli(capsys, src, folder / "out.onnx", "--no-verify", "-q")
    assert code == 0 and (folder / "out.onnx").exists()


def test_inputs_npz_and_input_shape(folder, capsys):
    x = np.random.default_rng(3).standard_normal((5, 10)).astype(np.float32)
    np.savez(folder / "x.npz", x=x)
    code, _, err = cli(capsys, folder / "in.onnx", folder / "a.onnx", "--inputs",
                       folder / "x.npz", "--report", folder / "a.json", "-q")  # fmt: skip
    assert code == 0, err
    assert json.loads((folder / "a.json").read_text())["verify"]["outputs"][0]["shape"] == [5, 4]
    code, _, err = cli(capsys, folder / "in.onnx", folder / "b.onnx", "--input-shape",
                       "x=3,10", "--report", folder / "b.json", "-q")  # fmt: skip
    assert code == 0, err
    assert json.loads((folder / "b.json").read_text())["verify"]["outputs"][0]["shape"] == [3, 4]


def test_solver_option_is_passed(folder, capsys):
    code, _, err = cli(capsys, folder / "in.onnx", folder / "o.onnx", "--solver", "mu",
                       "--report", folder / "r.json", "-q")  # fmt: skip
    assert code == 0, err
    assert json.loads((folder / "r.json").read_text())["solver"] == "mu"


def test_max_sweeps_reports_not_converged(folder, capsys):
    code, out, err = cli(capsys, folder / "in.onnx", folder / "o.onnx", "--solver", "mu",
                         "--max-sweeps", "2", "--report", folder / "r.json")  # fmt: skip
    assert code == 0, err
    data = json.loads((folder / "r.json").read_text())
    assert data["converged"] is False and data["sweeps"] == 2 and len(data["history"]) == 3
    assert "NOT converged" in out


def test_parse_input_shapes():
    assert parse_input_shapes(["a=1,2", "b=3x4", "c=5"]) == {"a": (1, 2), "b": (3, 4), "c": (5,)}


def test_typer_runner(folder):
    result = CliRunner().invoke(app, [str(folder / "in.onnx"), "--check", "--quiet"])
    assert result.exit_code == 1 and result.output == ""
    result = CliRunner().invoke(app, [str(folder / "nope.onnx"), str(folder / "o.onnx")])
    assert result.exit_code == 2


def _module(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "onnxbalance", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=120,
    )  # fmt: skip


def test_subprocess_end_to_end(folder):
    ok = _module(folder / "in.onnx", folder / "out.onnx", "--quiet")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
    bad = _module(folder / "missing.onnx", folder / "x.onnx")
    assert bad.returncode == 2 and bad.stdout == ""
    assert_one_line_error(bad.stderr, "missing.onnx")
    usage = _module("--nonsense")
    assert usage.returncode == 2
    assert_one_line_error(usage.stderr)
    helped = _module("--help")
    assert helped.returncode == 0 and "--check" in helped.stdout


def test_import_does_not_load_onnxruntime():
    code = "import sys, onnxbalance; print('onnxruntime' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "False", out.stderr


def test_no_relu_model_is_copied_with_exit_0(tmp_path, capsys):
    from onnx_models import no_relu

    onnx.save(no_relu(), tmp_path / "tanh.onnx")
    before = digest(tmp_path / "tanh.onnx")
    code, out, err = cli(capsys, tmp_path / "tanh.onnx", tmp_path / "copy.onnx")
    assert code == 0 and err == ""
    assert "nothing to balance" in out
    assert digest(tmp_path / "tanh.onnx") == before
    assert listing(tmp_path) == ["copy.onnx", "tanh.onnx"]
    assert cli(capsys, tmp_path / "tanh.onnx", "--check")[0] == 0


def test_fixed_units_are_listed_with_reasons(tmp_path, capsys, monkeypatch):
    from onnx_models import blocker

    monkeypatch.setenv("COLUMNS", "240")  # rich wraps long cells at 80 columns otherwise

    onnx.save(blocker("Sigmoid"), tmp_path / "sig.onnx")
    code, out, err = cli(capsys, tmp_path / "sig.onnx", tmp_path / "o.onnx", "--verbose",
                         "--report", tmp_path / "r.json")  # fmt: skip
    assert code == 0, err
    fixed = json.loads((tmp_path / "r.json").read_text())["units_fixed"]
    assert any(entry["name"] == "fc2" and entry["count"] == 6 for entry in fixed), fixed
    assert all(set(entry) == {"name", "count", "reason"} for entry in fixed)
    reason = next(entry["reason"] for entry in fixed if entry["name"] == "fc2")
    assert reason in out  # --verbose lists the reasons in the summary
    code, quiet_out, _ = cli(capsys, tmp_path / "sig.onnx", tmp_path / "o2.onnx")
    assert reason not in quiet_out


def test_plot_option_writes_a_png(folder, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("onnxbalance.plot")  # written by another branch
    code, out, err = cli(capsys, folder / "in.onnx", folder / "o.onnx", "--plot",
                         folder / "conv.png", "-q")  # fmt: skip
    assert code == 0, err
    assert (folder / "conv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_one_line_and_writes_nothing(folder, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name)
    )
    code, out, err = cli(capsys, folder / "in.onnx", folder / "o.onnx", "--plot", folder / "p.png")
    assert code == 2
    assert_one_line_error(err, "matplotlib")
    assert listing(folder) == ["in.onnx"]


def test_readme_quick_start_command(tmp_path):
    """The README's first command, run as written (OUT redirected to a temporary folder)."""
    line = next(
        line for line in (REPO / "README.md").read_text().splitlines()
        if line.startswith("pip install . && onnxbalance ")
    )  # fmt: skip
    args = line.split("&& onnxbalance ", 1)[1].split()
    if not (REPO / args[0]).exists():
        pytest.skip(f"{args[0]} is generated by another branch")
    args[1] = str(tmp_path / args[1])
    done = _module(*args, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "PASSED" in done.stdout and (tmp_path / "mlp_balanced.onnx").exists()


def test_both_solvers_reach_the_same_minimum(folder, capsys):
    norms = {}
    for solver in ("newton", "mu"):
        report = folder / f"{solver}.json"
        code, _, err = cli(capsys, folder / "in.onnx", folder / f"{solver}.onnx", "--solver",
                           solver, "--tol", "1e-9", "--report", report, "-q")  # fmt: skip
        assert code == 0, err
        data = json.loads(report.read_text())
        assert data["solver"] == solver and data["converged"]
        norms[solver] = data["norm_after"]
    assert norms["newton"] == pytest.approx(norms["mu"], rel=1e-9)


def test_help_starts_with_what_it_does_and_an_example():
    helped = _module("--help")
    assert helped.returncode == 0 and helped.stderr == ""
    lines = helped.stdout.splitlines()
    assert lines[0].startswith("Balance a ReLU network stored as ONNX")
    assert lines[2].startswith("Example: onnxbalance ") and lines[2].endswith(".onnx --p 2 --q 2")
    assert lines[4] == "Usage: onnxbalance [OPTIONS] IN OUT"
    assert lines[5].strip() == "onnxbalance [OPTIONS] --check IN..."
    assert "{IN}" not in helped.stdout and "<bool>" not in helped.stdout
    options = helped.stdout.split("Options:")[1]
    for flag, text in (("--check", "Write nothing"), ("-q, --quiet", "Print nothing"),
                       ("--verify / --no-verify", "Compare both")):  # fmt: skip
        assert re.search(re.escape(flag) + r"\s+" + text, options), flag


def test_a_bare_command_prints_the_usage():
    bare = _module()
    assert bare.returncode == 2 and bare.stdout == ""
    assert bare.stderr.splitlines() == [
        "Usage: onnxbalance [OPTIONS] IN OUT",
        "       onnxbalance [OPTIONS] --check IN...",
        "       onnxbalance compare [OPTIONS] A B",
        "Try 'onnxbalance --help' for help.",
    ]


def test_check_several_files_like_black(folder, capsys):
    """One line per file on stdout, an error's one line on stderr and the next file checked;
    exit 2 if any file could not be checked, else 1 if any is not balanced, else 0."""
    src, balanced = folder / "in.onnx", folder / "balanced.onnx"
    assert cli(capsys, src, balanced, "-q")[0] == 0
    code, out, err = cli(capsys, "--check", balanced, balanced)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"{balanced}: balanced: the norm can drop by") for line in lines)
    code, out, err = cli(capsys, "--check", balanced, src)
    assert code == 1 and err == ""
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{balanced}: balanced")
    assert lines[1].startswith(f"{src}: NOT balanced: the norm can drop by")
    code, out, err = cli(capsys, "--check", folder / "nope.onnx", src, balanced)
    assert code == 2 and len(out.splitlines()) == 2
    assert_one_line_error(err, "nope.onnx: no such file")
    code, out, err = cli(capsys, "--check", "-q", src, balanced)
    assert (code, out, err) == (1, "", "")
    assert listing(folder) == ["balanced.onnx", "in.onnx"]
