"""Seconds per pipeline stage on the paper's three networks, against a plain onnx.load + onnx.save.

The networks (Saul 2023, Fig. 2) come from sample_models/generate.py: Gemm(transB=1)/Relu MLPs
200-2500-1250-10, 200-2000-1000-500-250-10 and 200-1000-750-750-500-500-250-10 with
W ~ N(0, 2 / fan_in). Each file is balanced with ``onnxbalance.balance_file`` (what the command
runs), ``--repeat`` times with verification (the default) and as many times without it
(``--no-verify``), interleaved with the baseline; every figure is the best of its runs. The
overhead figure is

    (load + analyse + rewrite + write) / (onnx.load + onnx.save of the same file)

measured in the same run; the target is <= 2. "write" is everything from the first byte of the
output to the renamed file: rescaling the large weights as they are written, staging, and the
commit, which waits for the staged file to reach the disk (fsync) before the rename. With
verification that fsync runs in the background while onnxruntime checks the staged file; without
it, the commit waits for the whole flush, which onnx.save never does. Both write a file that does
not exist yet, the usual case.

Usage: python benchmarks/pipeline_stages.py [--repeat 7] [--only paper_a]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxbalance import balance_file  # noqa: E402

STAGES = ("load", "analyse", "solve", "rewrite", "verify", "write")
OVERHEAD = ("load", "analyse", "rewrite", "write")


def plain_load_save(src: Path, dst: Path) -> float:
    dst.unlink(missing_ok=True)
    start = time.perf_counter()
    onnx.save(onnx.load(str(src)), str(dst))
    return time.perf_counter() - start


def best_stages(runs: list[dict[str, float]]) -> dict[str, float]:
    return {stage: min(run.get(stage, 0.0) for run in runs) for stage in STAGES}


def run(name: str, folder: Path, repeat: int) -> dict:
    from sample_models.generate import build  # the repo's sample generator (not installed)

    src, dst = folder / f"{name}.onnx", folder / "balanced.onnx"
    src.write_bytes(build(name).SerializeToString())
    baseline = float("inf")
    verified, unverified = [], []
    for _ in range(repeat):
        baseline = min(baseline, plain_load_save(src, folder / "plain.onnx"))
        for verify, runs in ((True, verified), (False, unverified)):
            dst.unlink(missing_ok=True)
            report = balance_file(src, dst, verify=verify)
            runs.append(report.seconds)
    with_verify, without = best_stages(verified), best_stages(unverified)
    return {
        "stages": with_verify,
        "baseline": baseline,
        "ratio": sum(with_verify[s] for s in OVERHEAD) / baseline,
        "write_no_verify": without["write"],
        "ratio_no_verify": sum(without[s] for s in OVERHEAD) / baseline,
        "sweeps": report.sweeps,
        "norm_ratio": report.norm_ratio,
        "mb": src.stat().st_size / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--only", nargs="*", default=["paper_a", "paper_b", "paper_c"])
    args = parser.parse_args(argv)
    header = ["network", "MB", *(f"{s} ms" for s in STAGES), "load+save ms", "ratio"]
    header += ["write ms (no verify)", "ratio (no verify)", "steps", "norm ratio"]
    print(" | ".join(header))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            r = run(name, Path(tmp), args.repeat)
            cells = [name, f"{r['mb']:.1f}", *(f"{1e3 * r['stages'][s]:.1f}" for s in STAGES)]
            cells += [f"{1e3 * r['baseline']:.1f}", f"{r['ratio']:.2f}"]
            cells += [f"{1e3 * r['write_no_verify']:.1f}", f"{r['ratio_no_verify']:.2f}"]
            cells += [str(r["sweeps"]), f"{r['norm_ratio']:.4f}"]
            print(" | ".join(cells), flush=True)
    print(f"ratio = ({' + '.join(OVERHEAD)}) / (onnx.load + onnx.save); target <= 2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
