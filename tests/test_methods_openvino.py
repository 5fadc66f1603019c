"""Every registered method, exported static and run on ONNX Runtime and OpenVINO f32 against torch.

Issue contract for the method library: ONNX Runtime <= 1e-4 and OpenVINO f32 <= 1e-3 max abs on the
logits (or features) of the real photos, graph static (no If / NonZero, constant TopK K).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_vit
from vitfold import runtimes
from vitfold.export.onnx import export_and_validate
from vitfold.metrics import compare
from vitfold.runtimes.backends import get_backend
from vitfold.reduce import METHODS, TokenLayout, create_method
from vitfold.reduce.features import DenseFeatures, for_features
from vitfold.runtimes import BuildConfig

pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install -e '.[openvino]')")

#: Parameters that reduce the tiny 4-block, 16-patch model.
TINY_PARAMS = {
    "tome": {"r": 2},
    "evit": {"keep_rate": 0.5, "locations": (1, 2)},
    "topk": {"keep_rate": 0.5, "locations": (1, 2)},
    "evit-mass": {"keep_mass": 0.7, "locations": (1, 2), "capacity": (8, 5)},
    "dpc-knn": {"keep_rate": 0.5, "locations": (1, 2)},
    "kmedoids": {"keep_rate": 0.5, "locations": (1, 2)},
    "expedite": {"location": 1, "grid": 2, "k": 3},
}


def test_every_registered_method_is_covered():
    assert set(METHODS) == set(TINY_PARAMS), "add the new method to TINY_PARAMS"


@pytest.fixture(scope="module")
def photos():
    from vitfold.images import batches, list_images, load_images
    from vitfold.spec import Preprocess

    pre = Preprocess(img_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return batches(load_images(list_images(), pre), 2)


@pytest.mark.parametrize("task", ["classify", "features"])
@pytest.mark.parametrize("name", sorted(TINY_PARAMS))
def test_method_on_onnxruntime_and_openvino(tmp_path, photos, name, task):
    model = tiny_vit()
    params = dict(TINY_PARAMS[name])
    if task == "features":
        if name == "evit-mass":
            pytest.skip("evit-mass has no --task features (refused by the build with a clear message)")
        params.update(for_features(METHODS[name]))
    method = create_method(name, **params)
    schedule = method.schedule(TokenLayout.of(model))
    assert schedule.tokens[-1] < schedule.tokens[0] or name == "expedite"
    reduced = method.apply(model, schedule)
    if task == "features":
        reduced = DenseFeatures(reduced)
    result, reference = export_and_validate(reduced, tmp_path / "model.onnx", photos)  # ORT <= 1e-4 + contract
    assert not {"If", "Loop", "NonZero"} & set(result.op_counts)
    cfg = BuildConfig(backend="openvino", precision="f32")
    with runtimes.build_session(tmp_path / "model.onnx", tmp_path, cfg) as session:
        outputs = np.concatenate([next(iter(session(batch).values())) for batch in photos])
    compare(reference, outputs).check(get_backend("openvino").tolerance("f32"), f"{name} ({task}) on OpenVINO f32")
