"""Sample ONNX models for the README quick start, the tests and the Fig. 2 reproduction.

``sample_models/mlp.onnx`` is committed; the paper's three networks are generated on demand by
:mod:`sample_models.generate` (into sample_models/generated/, which git ignores).
"""
