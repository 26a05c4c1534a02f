"""Verify-stage benchmark: time and peak memory of ``compare_models`` alone on a big model.

The whole run's peak (``big_model.py``) is another stage's; this one measures verification
by itself. The model of ``big_model.py`` (``--gb``, ``--width``, ``--dtype``, ``--arch``) is
generated, balanced once with ``--no-verify``, and then ``compare_models(IN, OUT)`` runs in its
own process per source tree (this one, and ``--before DIR``, a worktree of an earlier commit),
measured with ``/usr/bin/time -v``: wall and CPU seconds, peak RSS over the weight bytes, and
the verdict with each output's figures, which must be the same for both trees (the same draws).
Target for float16 and bfloat16: peak RSS at most about 1.2x the weight bytes.

    PYTHONPATH=. python benchmarks/verify_stage.py [--gb 0.5] [--width 4096]
        [--dtype float16] [--arch mlp|decoder] [--before DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
from pathlib import Path

from big_model import add_model_options, generated_model, measure

ROOT = Path(__file__).resolve().parents[1]

_COMPARE = """
import sys, time
from onnxbalance.verify import compare_models
import onnxbalance
assert onnxbalance.__file__.startswith(sys.argv[4]), onnxbalance.__file__
start = time.perf_counter()
result = compare_models(sys.argv[1], sys.argv[2], scratch=sys.argv[3])
print(f"{time.perf_counter() - start:.2f}")
print(result.passed, [(o.name, o.max_abs_diff, o.noise_floor, o.atol) for o in result.outputs])
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser, gb=0.5, width=4096, dtype="float16")
    parser.add_argument("--before", type=Path, default=None, help="an earlier source tree")
    options = parser.parse_args()
    with generated_model(options, "onnxbalance-verify-stage-") as (folder, path, weight_bytes):
        out = folder / "out.onnx"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        subprocess.run(
            [sys.executable, "-m", "onnxbalance", str(path), str(out), "--no-verify", "--quiet"],
            check=True, env=env,
        )  # fmt: skip
        print(f"{options.dtype} {options.arch}, weights {weight_bytes / 2**30:.2f} GiB")
        trees = {"this tree": ROOT}
        if options.before is not None:
            trees["before"] = options.before.resolve()
        verdicts = {}
        for name, tree in trees.items():
            scratch = folder / f"scratch-{len(verdicts)}"
            scratch.mkdir()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            # -P: the tree on PYTHONPATH is imported, never one in the current folder
            command = [sys.executable, "-P", "-c", _COMPARE, str(path), str(out), str(scratch)]
            run = measure(command + [str(tree)], dict(os.environ, PYTHONPATH=str(tree)))
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = sum(getattr(after, f) - getattr(before, f) for f in ("ru_utime", "ru_stime"))
            if run["code"] != 0:
                print(f"{name}: exit {run['code']}: {run['stderr']}")
                continue
            seconds, verdicts[name] = run["stdout"].splitlines()
            print(
                f"{name:10s} verify {float(seconds):6.2f} s (process {run['wall']:6.2f} s, "
                f"CPU {cpu:6.2f} s)   peak RSS {run['peak'] / 2**30:5.2f} GiB "
                f"({run['peak'] / weight_bytes:4.2f}x weights)   {verdicts[name]}"
            )
        if len(set(verdicts.values())) > 1:
            print("the verdicts or figures differ between the trees")
    return 0


if __name__ == "__main__":
    sys.exit(main())
