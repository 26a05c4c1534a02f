"""Graph analysis: an ONNX model -> :class:`~onnxbalance.unitgraph.ModelUnits`.

``graph`` indexes the main graph, ``ops`` holds one matching rule per op family, ``units``
follows unit channels from layer to layer and builds the contract.
"""

from .units import analyse

__all__ = ["analyse"]
