"""onnxbalance: function-preserving weight balancing of ReLU networks stored as ONNX.

>>> import onnxbalance
>>> model, report = onnxbalance.balance("model.onnx", p=2, q=2)  # doctest: +SKIP
>>> report.norm_after / report.norm_before  # doctest: +SKIP

Importing this package loads nothing heavy: numpy and onnx load with the first use of the api
(so the command can install its signal handlers first), onnxruntime only for verification.
"""

import importlib

from .errors import (
    InputError,
    OnnxBalanceError,
    OutputError,
    SideOutputError,
    TooFewBalancedError,
    UnsupportedModelError,
    VerificationError,
)

_LAZY = {
    "balance": "api",
    "balance_file": "api",
    "check": "api",
    "compare": "api",
    "Comparison": "report",
    "FixedEntry": "report",
    "Report": "report",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "Comparison",
    "FixedEntry",
    "InputError",
    "OnnxBalanceError",
    "OutputError",
    "Report",
    "SideOutputError",
    "TooFewBalancedError",
    "UnsupportedModelError",
    "VerificationError",
    "__version__",
    "balance",
    "balance_file",
    "check",
    "compare",
]
