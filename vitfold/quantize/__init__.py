"""The quantize stage: int8 and weight-only compression, with the token reduction kept exact.

Runs between the passes and the backend build (:mod:`vitfold.compile`): ``model.opt.onnx`` ->
the backend's quantizer (its record's ``quantizer``) -> a quantized model the backend builds from.

* The reduction's own subgraph (:mod:`.scope`) is found on the graph and handed to the quantizer as
  its ignored scope: similarity, scores, top-k / argmax / sort, index paths and the size channel stay
  float. The dense twin has an empty scope and is quantized with the same calibration and settings.
* Calibration images (:mod:`.calibration`) go through the build's preprocessing.
* :mod:`.choices` measures how many token choices a quantized build shares with its f32 build.

Quantizers (``Backend.quantizer``): ``nncf-openvino`` (:mod:`.nncf_openvino`), ``qdq-u8s8`` and
``qdq-s8s8`` (:mod:`.qdq`). Adding one is a module with ``quantize(onnx_path, out_dir, cfg,
calibration, scope) -> {"path", "files", "record"}`` and an entry in :data:`QUANTIZERS`.

No torch.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Optional

import onnx

from ..errors import SpecError
from .calibration import Calibration, load_calibration  # noqa: F401 (the package's API)
from .scope import ReductionScope, reduction_scope


def _quantizers() -> dict:
    from . import nncf_openvino, qdq

    return {
        "nncf-openvino": nncf_openvino.quantize,
        "qdq-u8s8": partial(qdq.quantize, flavour="qdq-u8s8"),
        "qdq-s8s8": partial(qdq.quantize, flavour="qdq-s8s8"),
    }


#: The quantizer names a Backend record may declare (the keys of :func:`_quantizers`).
QUANTIZERS = ("nncf-openvino", "qdq-u8s8", "qdq-s8s8")


def quantize(onnx_path: Path, out_dir: Path, cfg, calibration: Optional[Calibration]) -> dict:
    """Quantize ``onnx_path`` (the optimised graph) for ``cfg``'s backend into ``out_dir``.

    Returns:
        ``{"path": the quantized model the backend builds from, "files": role -> name,
        "record": what the manifest keeps (tool, settings, calibration, ignored scope)}``.

    Raises:
        SpecError: the backend has no quantizer, or int8 without calibration data.
        BackendUnavailable: the quantizer's library is not installed.
    """
    from ..runtimes import get_backend

    record = get_backend(cfg.backend)
    record.tolerance_for(cfg)  # a precision or weight mode the backend does not build: SpecError
    if record.quantizer is None:
        raise SpecError(f"{cfg.backend} has no quantizer; --precision int8 builds on "
                        "openvino, onnxruntime or tensorrt")
    if cfg.precision == "int8" and calibration is None:
        raise SpecError("--precision int8 needs calibration images (--calibrate DIR)")
    scope = reduction_scope(onnx.load(str(onnx_path), load_external_data=False))
    result = _quantizers()[record.quantizer](Path(onnx_path), Path(out_dir), cfg, calibration if cfg.precision == "int8" else None, scope)
    result["record"] = {
        "quantizer": record.quantizer, "precision": cfg.precision, "weights": cfg.weights, **result["record"],
        "calibration": calibration.to_json() if calibration is not None and cfg.precision == "int8" else None,
        "ignored_scope": scope.to_json(),
    }
    return result


__all__ = ["Calibration", "QUANTIZERS", "ReductionScope", "load_calibration", "quantize", "reduction_scope"]
