"""Backend conformance: every registered backend record matches its module, and every backend whose
library is installed here builds, loads and runs a small graph exactly, writing the files it declares."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from vitfold import cli, runtimes
from vitfold.errors import SpecError
from vitfold.metrics import Tolerance
from vitfold.passes import PASSES
from vitfold.passes.lint import TARGETS, target_for
from vitfold.runtimes import BACKENDS, BuildConfig, get_backend
from vitfold.runtimes.base import PRECISIONS

#: The Python package each backend's module imports for build / load.
PACKAGE = {"openvino": "openvino", "onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_record_matches_its_module(name):
    record = BACKENDS[name]
    module = record.load_module()  # importing a backend module never needs its library
    assert callable(module.build) and callable(module.load), name
    assert hasattr(module, "profile_layers") == record.per_layer
    assert hasattr(module, "profile_extras") == record.profile_extras
    assert hasattr(module, "check_available") == record.needs_device
    assert record.precisions and set(record.precisions) <= set(PRECISIONS)
    assert all(isinstance(t, Tolerance) for t in record.tolerances.values())
    for step in record.pipeline:
        assert (step if isinstance(step, str) else step[0]) in PASSES, step
    assert record.lint_target is None or record.lint_target in TARGETS
    assert target_for(name, None if record.lint_target else "10") in TARGETS
    assert "backend" in record.files and name in PACKAGE, "declare the file load() opens, and the package for this test"


def test_the_command_line_offers_what_the_records_declare():
    assert cli.BACKEND_NAMES == list(BACKENDS)
    assert set(cli.PRECISION_NAMES) == {p for b in BACKENDS.values() for p in b.precisions}
    with pytest.raises(SpecError, match="unknown backend 'coreml'; available: openvino, onnxruntime, tensorrt"):
        get_backend("coreml")
    with pytest.raises(SpecError, match="--precision fp16 is not built for openvino; choose f32 or bf16"):
        get_backend("openvino").tolerance("fp16")


def relu_model(path):
    """images [1, 3, 4, 4] -> Relu -> logits, at opset 18 / IR 10 like vitfold's exports."""
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 3, 4, 4])  # noqa: E731
    graph = helper.make_graph([helper.make_node("Relu", ["images"], ["logits"])], "relu", [value("images")], [value("logits")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_backend_builds_loads_and_runs(name, tmp_path):
    if importlib.util.find_spec(PACKAGE[name]) is None:
        pytest.skip(f"{PACKAGE[name]} is not installed here (backend {name}); its record is checked above")
    record = BACKENDS[name]
    if record.needs_device:
        try:
            record.load_module().check_available()
        except Exception as exc:  # noqa: BLE001 - no device here: say why
            pytest.skip(f"{name} needs a device: {exc}")
    precision = record.precisions[0]
    built = runtimes.build(relu_model(tmp_path / "model.onnx"), tmp_path, BuildConfig(name, precision))
    assert built["files"] == dict(record.files)
    assert all((tmp_path / f).is_file() for f in record.files.values())
    images = np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)
    with runtimes.build_session(tmp_path / "model.onnx", tmp_path / "again", BuildConfig(name, precision)) as session:
        out = session(images)
    assert list(out) == ["logits"]
    np.testing.assert_allclose(out["logits"], np.maximum(images, 0), atol=record.tolerance(precision).max_abs or 1e-2)
