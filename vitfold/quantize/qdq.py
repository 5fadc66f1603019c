"""A Q/DQ ONNX (QuantizeLinear / DequantizeLinear pairs) for ONNX Runtime and TensorRT.

Made with ONNX Runtime's own static quantizer (:func:`onnxruntime.quantization.quantize_static`,
QDQ format, min-max calibration, weights int8 per output channel, MatMul / Gemm / Conv only), with
the reduction subgraph excluded by name. Why this and not NNCF's ONNX backend: on this machine
(DeiT-S ToMe r=13, batch 1, 2 cores, one interleaved run) ONNX Runtime runs its own Q/DQ graph
1.54x faster than the f32 graph, and NNCF's (same ignored scope, either preset) at 0.47x, because
ONNX Runtime fuses only the Q/DQ patterns its quantizer writes.

Two flavours, per backend record:

* ``qdq-u8s8`` (ONNX Runtime CPU): uint8 asymmetric activations, int8 symmetric weights, the
  layout ONNX Runtime's x86 kernels are fastest with (its quantization guide, "U8S8").
* ``qdq-s8s8`` (TensorRT explicit quantization): int8 activations and weights, both symmetric with
  zero point 0, weights per output channel (MatMul axis 1 of ``[K, N]``, Conv axis 0), Q/DQ placed
  on the inputs of MatMul / Gemm / Conv where TensorRT fuses them, biases left float (TensorRT has
  no int32 Q/DQ; ONNX Runtime's default would quantize a Conv bias to int32). TensorRT's developer guide,
  "Explicit Quantization" (8.5 through 10.x): only symmetric int8 with zero point 0 is accepted and
  a weight's per-channel axis must be its output-channel axis. :mod:`vitfold.passes.lint` checks these.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .calibration import Calibration
from .scope import ReductionScope

QDQ = "model.qdq.onnx"
FLAVOURS = ("qdq-u8s8", "qdq-s8s8")


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over the calibration batches."""

    def __init__(self, input_name: str, calibration: Calibration):
        self._items = iter([{input_name: b} for b in calibration.batches])

    def get_next(self):
        return next(self._items, None)


def quantize(onnx_path: Path, out_dir: Path, cfg, calibration: Calibration, scope: ReductionScope, *,
             flavour: str) -> dict:
    """Write ``out_dir / model.qdq.onnx``: ``onnx_path`` with Q/DQ pairs, the reduction kept float.

    Returns:
        ``{"path", "files": {"quantized": "model.qdq.onnx"}, "record"}``.

    Raises:
        BackendUnavailable: onnxruntime is not installed.
        ValueError: unknown ``flavour``.
    """
    from ..runtimes import require

    if flavour not in FLAVOURS:
        raise ValueError(f"unknown Q/DQ flavour {flavour!r}; one of {FLAVOURS}")
    ort = require("onnxruntime", "pip install onnxruntime")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    import onnx

    input_name = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].name
    symmetric = flavour == "qdq-s8s8"
    out = Path(out_dir) / QDQ
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" advice: the passes already folded the graph
    try:
        quantize_static(
            str(onnx_path), str(out), _Reader(input_name, calibration),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm", "Conv"], nodes_to_exclude=list(scope.nodes),
            calibrate_method=CalibrationMethod.MinMax,
            # TensorRT has no int32 Q/DQ: biases stay float there (it fuses them into the int8 kernel)
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True, "QuantizeBias": not symmetric},
        )
    finally:
        root.setLevel(level)
    model = onnx.load(str(out), load_external_data=False)
    return {
        "path": out,
        "files": {"quantized": QDQ},
        "record": {"tool": "onnxruntime.quantization.quantize_static", "onnxruntime": ort.__version__,
                   "flavour": flavour, "calibrate_method": "MinMax",
                   "quantize_nodes": sum(n.op_type == "QuantizeLinear" for n in model.graph.node)},
    }
