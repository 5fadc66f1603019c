"""vitfold: compile token-reduced Vision Transformers for edge devices.

Stages, in data-flow order: ``reduce`` (token merging / pruning on a timm ViT) -> ``export`` (ONNX)
-> ``passes`` (graph rewrites) -> ``runtimes`` (ONNX Runtime, OpenVINO, TensorRT) -> ``profiles``
(latency, FLOPs, fidelity). Importing ``vitfold`` imports no torch; only ``reduce`` and ``export`` do.
"""

__version__ = "0.1.1"
