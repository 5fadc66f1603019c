"""OpenVINO int8 and weight compression with NNCF (Intel's own post-training quantizer for OpenVINO).

``--precision int8``: :func:`nncf.quantize` on the OpenVINO model converted from ``model.opt.onnx``,
``ModelType.TRANSFORMER`` (SmoothQuant, then min-max ranges on the calibration batches and fast bias
correction; NNCF's default preset for transformers: symmetric weights, asymmetric activations), with
the reduction subgraph as the ignored scope. ``--weights int8|int4``: :func:`nncf.compress_weights`
(data-free; int8 asymmetric per channel, or int4 symmetric in groups of 128 with the first and last
layers kept int8, NNCF's defaults), activations stay at the build's precision.

Measured (DeiT-S ToMe r=13, 7 calibration photos, this 2-core machine): quantize in 6.5 s; with the
ignored scope the graph gets exactly the 74 FakeQuantize nodes of the dense model, without it 98 (the
similarity MatMuls' inputs are quantized too).

The ONNX node names survive OpenVINO's ONNX frontend as friendly names, so the scope found on the
ONNX graph names the same ops here; names NNCF cannot find (ops the frontend fused away) are skipped
(``validate=False``).
"""

from __future__ import annotations

from pathlib import Path

from .calibration import Calibration
from .scope import ReductionScope

XML = "model.quant.xml"


def quantize(onnx_path: Path, out_dir: Path, cfg, calibration: Calibration | None, scope: ReductionScope) -> dict:
    """Quantize or compress ``onnx_path`` for OpenVINO into ``out_dir / model.quant.xml`` (+ ``.bin``).

    Returns:
        ``{"path": the IR, "files": {"quantized": ..., "quantized_weights": ...}, "record": {...}}``.

    Raises:
        BackendUnavailable: openvino or nncf is not installed.
    """
    from ..runtimes import require

    ov = require("openvino", 'pip install "vitfold[openvino]"')
    nncf = require("nncf", 'pip install "vitfold[openvino]"  (or: pip install nncf)')
    extension = None
    if cfg.extra.get("fused_ops"):  # a --fused-ops graph: vitfold.ToMeMerge converts through the extension
        from ..native import openvino_ops

        extension = str(openvino_ops())
    model = ov.convert_model(str(onnx_path), extension=extension)
    ignored = nncf.IgnoredScope(names=list(scope.nodes), validate=False)
    if cfg.precision == "int8":
        dataset = nncf.Dataset(calibration.batches)
        model = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(calibration.batches), ignored_scope=ignored)
        how = {"tool": "nncf.quantize", "model_type": "TRANSFORMER", "preset": "MIXED (NNCF's default for transformers)"}
    else:
        mode = {"int8": nncf.CompressWeightsMode.INT8_ASYM, "int4": nncf.CompressWeightsMode.INT4_SYM}[cfg.weights]
        model = nncf.compress_weights(model, mode=mode, ignored_scope=ignored)
        how = {"tool": "nncf.compress_weights", "mode": mode.name}
    fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())
    ov.save_model(model, str(Path(out_dir) / XML), compress_to_fp16=False)
    return {
        "path": Path(out_dir) / XML,
        "files": {"quantized": XML, "quantized_weights": XML.replace(".xml", ".bin")},
        "record": {**how, "nncf": nncf.__version__, "fake_quantize_nodes": fake_quantize},
    }
