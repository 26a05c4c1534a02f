"""onnxbalance: function-preserving weight balancing of ReLU networks stored as ONNX.

>>> import onnxbalance
>>> model, report = onnxbalance.balance("model.onnx", p=2, q=2)  # doctest: +SKIP
>>> report.norm_after / report.norm_before  # doctest: +SKIP

Importing this package loads onnx and numpy, never onnxruntime (only verification needs it).
"""

from .api import balance, balance_file, check
from .errors import (
    InputError,
    OnnxBalanceError,
    OutputError,
    SideOutputError,
    UnsupportedModelError,
    VerificationError,
)
from .report import Comparison, FixedEntry, Report

__version__ = "0.1.0"

__all__ = [
    "Comparison",
    "FixedEntry",
    "InputError",
    "OnnxBalanceError",
    "OutputError",
    "Report",
    "SideOutputError",
    "UnsupportedModelError",
    "VerificationError",
    "__version__",
    "balance",
    "balance_file",
    "check",
]
