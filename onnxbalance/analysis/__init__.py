"""Graph analysis: an ONNX model -> :class:`~onnxbalance.unitgraph.ModelUnits`.

``graph`` indexes the main graph, ``shapes`` infers static shapes without copying weights,
``ops`` matches linear layers (Gemm, MatMul, Conv, ConvTranspose, with a BatchNormalization
after them), ``passthrough`` holds one rule per op family saying where channel factors land
(or why they stop), ``units`` walks the graph once, ties merged channels and builds the
contract, and ``scopes`` does the same for every If/Loop/Scan body and merges the results.
"""

from .units import analyse

__all__ = ["analyse"]
