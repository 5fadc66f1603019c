"""Backend vs torch on the shipped photos: ONNX Runtime <= 1e-4, OpenVINO f32 <= 1e-3, top-1 100%.

DeiT-S r=0 and r=13 run in the default end-to-end build (test_build.py); r=8 and r=16 run here;
ViT-B runs with ``-m slow``.
"""

from __future__ import annotations

import numpy as np
import pytest

from vitfold import runtimes
from vitfold.export.models import create_model
from vitfold.export.onnx import export_and_validate
from vitfold.images import batches, list_images, load_images
from vitfold.metrics import compare
from vitfold.runtimes.backends import get_backend
from vitfold.reduce import TokenLayout, create_method
from vitfold.runtimes import BuildConfig
from vitfold.spec import ModelSpec


def check_parity(tmp_path, name: str, r: int, checkpoint=None):
    model, pre = create_model(ModelSpec(name, checkpoint=checkpoint))
    method = create_method("tome", r=r)
    reduced = method.apply(model, method.schedule(TokenLayout.of(model)))
    check = batches(load_images(list_images(), pre), 1)
    result, reference = export_and_validate(reduced, tmp_path / "m.onnx", check)  # raises beyond 1e-4
    runtimes.build(tmp_path / "m.onnx", tmp_path, BuildConfig("openvino"))
    from vitfold.runtimes.openvino import OpenVINOSession

    session = OpenVINOSession(tmp_path / "model.xml", BuildConfig("openvino"))
    outputs = np.concatenate([next(iter(session(b).values())) for b in check])
    ov = compare(reference, outputs).check(get_backend("openvino").tolerance("f32"), f"{name} r={r}: OpenVINO vs torch")
    return result.parity, ov


@pytest.mark.parametrize("r", [8, 16])
def test_deit_small(tmp_path, r):
    ort, ov = check_parity(tmp_path, "deit_small_patch16_224", r)
    assert ort.max_abs <= 1e-4 and ov.max_abs <= 1e-3 and ort.top1_agreement == ov.top1_agreement == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("r", [0, 8, 13, 16])
def test_vit_base(tmp_path, r):
    ort, ov = check_parity(tmp_path, "vit_base_patch16_224", r)
    assert ort.max_abs <= 1e-4 and ov.max_abs <= 1e-3 and ort.top1_agreement == ov.top1_agreement == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("r", [0, 13])
def test_deit_small_r0_r13(tmp_path, r):
    ort, ov = check_parity(tmp_path, "deit_small_patch16_224", r)
    assert ort.max_abs <= 1e-4 and ov.max_abs <= 1e-3
