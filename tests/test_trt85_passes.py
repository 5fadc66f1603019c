"""The TensorRT 8.5 passes (decompose-layernorm, topk-float-values, downgrade-opset): each on small
graphs where it applies and where it must refuse, then the claim they exist for: DeiT-S with ToMe,
EViT, Top-K and a folded evit-mass gate lints clean for tensorrt-8.5 and still equals torch."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T, helper, numpy_helper

from conftest import tiny_vit
from vitfold.errors import PassError
from vitfold.passes import TENSORRT_8_5_PASSES
from vitfold.passes.lint import lint
from vitfold.passes.pipeline import apply_pass, run_pipeline


def model(nodes, inputs, outputs, inits=(), opset=18):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs], list(inits))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 10
    return proto


def run(proto, **feeds):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def ops(proto):
    return [n.op_type for n in proto.graph.node]


# --- decompose-layernorm -----------------------------------------------------------------------

def layernorm(opset=18, stats=False, dtype=T.FLOAT, axis=-1, bias=True):
    rng = np.random.default_rng(0)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    inits = [numpy_helper.from_array(rng.standard_normal(8).astype(np_dtype), "scale")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(8).astype(np_dtype), "bias"))
    outputs = ["y", "mean"] if stats else ["y"]
    node = helper.make_node("LayerNormalization", ["x", "scale", "bias"] if bias else ["x", "scale"], outputs, name="ln",
                            axis=axis, epsilon=1e-6)
    graph_outputs = [("y", dtype, [2, 5, 8])] + ([("mean", T.FLOAT, None)] if stats else [])
    return model([node], [("x", dtype, [2, 5, 8])], graph_outputs, inits, opset=opset)


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_decomposes_for_the_graph_opset(opset, bias):
    src = layernorm(opset, bias=bias)
    out = apply_pass(src, "decompose-layernorm")
    assert "LayerNormalization" not in ops(out) and ops(out).count("ReduceMean") == 2
    reduce = next(n for n in out.graph.node if n.op_type == "ReduceMean")
    assert (len(reduce.input) == 2) == (opset >= 18)  # axes as input from 18, as attribute before
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32) * 3 + 1
    np.testing.assert_allclose(run(out, x=x)[0], run(src, x=x)[0], rtol=0, atol=1e-5)
    assert not lint(out, "tensorrt-8.5") or "unsupported-op" not in {f.rule for f in lint(out, "tensorrt-8.5")}


def test_layernorm_in_fp16_normalises_in_fp32_then_scales_in_fp16():
    src = layernorm(dtype=T.FLOAT16)
    out = apply_pass(src, "decompose-layernorm")
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    assert [helper.get_attribute_value(c.attribute[0]) for c in casts] == [T.FLOAT, T.FLOAT16]
    x = np.random.default_rng(2).standard_normal((2, 5, 8)).astype(np.float16)
    np.testing.assert_allclose(run(out, x=x)[0].astype(np.float32), run(src, x=x)[0].astype(np.float32), atol=2e-2)


def test_layernorm_with_used_statistics_is_left(caplog):
    src = layernorm(stats=True)
    with caplog.at_level(logging.WARNING, logger="vitfold.passes"):
        out = apply_pass(src, "decompose-layernorm")
    assert "LayerNormalization" in ops(out)
    assert "Mean / InvStdDev outputs are used (mean)" in caplog.text


# --- topk-float-values -------------------------------------------------------------------------

def sort_of_indices():
    """scores [2, 50] -> TopK(all) indices -> Slice [:, 7:] -> TopK(smallest, sorted): ToMe's unm sort."""
    inits = [numpy_helper.from_array(np.array(v, dtype=np.int64), n) for n, v in
             (("k_all", [50]), ("k_rest", [43]), ("start", [7]), ("end", [50]), ("axis", [1]))]
    nodes = [
        helper.make_node("TopK", ["scores", "k_all"], ["top", "order"], name="argsort", largest=1),
        helper.make_node("Slice", ["order", "start", "end", "axis"], ["rest"], name="slice"),
        helper.make_node("TopK", ["rest", "k_rest"], ["rest_sorted", "where"], name="sort", largest=0),
    ]
    return model(nodes, [("scores", T.FLOAT, [2, 50])], [("rest_sorted", T.INT64, [2, 43]), ("where", T.INT64, [2, 43])],
                 inits)


def test_integer_sort_of_indices_runs_on_float_values_exactly():
    src = sort_of_indices()
    assert "topk-input-dtype" in {f.rule for f in lint(src, "tensorrt-8.5")}
    out = apply_pass(src, "topk-float-values")
    assert "topk-input-dtype" not in {f.rule for f in lint(out, "tensorrt-8.5")}
    assert ops(out).count("Cast") == 2
    scores = np.random.default_rng(0).standard_normal((2, 50)).astype(np.float32)
    scores[:, 10:20] = 0.5  # ties: both forms break them by position
    for got, want in zip(run(out, scores=scores), run(src, scores=scores)):
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_integer_topk_of_unknown_values_is_left(caplog):
    inits = [numpy_helper.from_array(np.array([3], dtype=np.int64), "k")]
    src = model([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="select")], [("x", T.INT64, [2, 9])],
                [("v", T.INT64, None), ("i", T.INT64, None)], inits)
    with caplog.at_level(logging.WARNING, logger="vitfold.passes"):
        out = apply_pass(src, "topk-float-values")
    assert "Cast" not in ops(out) and "not traceable to TopK / ArgMax indices" in caplog.text


# --- downgrade-opset ---------------------------------------------------------------------------

def test_reduce_axes_move_into_the_attribute_at_opset_17():
    inits = [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")]
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"], name="mean", keepdims=0),
             helper.make_node("ReduceMax", ["x", "axes"], ["y"], name="max", keepdims=0)]
    src = model(nodes, [("x", T.FLOAT, [2, 6, 4])], [("m", T.FLOAT, [2, 4]), ("y", T.FLOAT, [2, 4])], inits)
    assert {f.rule for f in lint(src, "tensorrt-8.5")} == {"reduce-axes-input", "opset"}
    out = apply_pass(src, "downgrade-opset", opset=17)
    assert out.opset_import[0].version == 17 and lint(out, "tensorrt-8.5") == []
    for node in out.graph.node:
        assert len(node.input) == 1 and {a.name for a in node.attribute} == {"axes", "keepdims"}
    x = np.random.default_rng(0).standard_normal((2, 6, 4)).astype(np.float32)
    for got, want in zip(run(out, x=x), run(src, x=x)):
        assert np.array_equal(got, want)


def test_downgrade_refuses_what_opset_17_cannot_say():
    inits = [numpy_helper.from_array(np.zeros((2, 3), dtype=np.int64), "idx")]
    scatter = helper.make_node("ScatterElements", ["x", "idx", "u"], ["y"], name="amax", axis=1, reduction="max")
    src = model([scatter], [("x", T.FLOAT, [2, 5]), ("u", T.FLOAT, [2, 3])], [("y", T.FLOAT, [2, 5])], inits)
    with pytest.raises(PassError, match="opset 17"):
        apply_pass(src, "downgrade-opset", opset=17)
    with pytest.raises(PassError, match="only lowers"):
        apply_pass(src, "downgrade-opset", opset=19)


# --- exported models ---------------------------------------------------------------------------

def _export(method_name, params, model_, shape, tmp_path):
    from vitfold.export.onnx import export_onnx
    from vitfold.reduce import TokenLayout, create_method

    method = create_method(method_name, **params)
    reduced = method.apply(model_, method.schedule(TokenLayout.of(model_)))
    path = tmp_path / f"{method_name}.onnx"
    export_onnx(reduced, path, shape)
    return reduced, path


TRT85_PIPELINE = ("fold-schedule", "merge-as-matmul", *TENSORRT_8_5_PASSES)


@pytest.mark.parametrize("method_name, params", [
    ("tome", {"r": 2}),
    ("evit", {"keep_rate": 0.7, "locations": (1, 2)}),
    ("evit-mass", {"keep_mass": 0.9, "locations": (1, 2), "capacity": (10, 8)}),
])
def test_tiny_vit_is_tensorrt_8_5_clean_after_the_pipeline(tmp_path, method_name, params):
    import torch

    from vitfold.images import list_images, load_images
    from vitfold.spec import Preprocess

    photos = [load_images(list_images()[:1], Preprocess(img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3))]
    reduced, src = _export(method_name, params, tiny_vit(), (1, 3, 32, 32), tmp_path)
    assert lint(src, "tensorrt-8.5")  # LayerNormalization at least
    reports = run_pipeline(src, tmp_path / "out.onnx", TRT85_PIPELINE, photos)
    assert [r.name for r in reports] == ["fold-schedule", "merge-as-matmul", "topk-float-values", "decompose-layernorm",
                                         "downgrade-opset"]
    assert lint(tmp_path / "out.onnx", "tensorrt-8.5") == []
    with torch.no_grad():
        want = reduced(torch.from_numpy(photos[0])).numpy()
    got = run(onnx.load(str(tmp_path / "out.onnx")), images=photos[0])[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_deit_small_is_tensorrt_8_5_clean_after_the_pipeline(tmp_path):
    """The issue's claim on the default model: ToMe r=13, EViT 0.7 and a folded evit-mass gate."""
    from vitfold.export.models import create_model
    from vitfold.images import list_images, load_images
    from vitfold.spec import ModelSpec

    model_, pre = create_model(ModelSpec("deit_small_patch16_224"))
    photos = [load_images(list_images()[:1], pre)]
    for name, params in (("tome", {"r": 13}), ("evit", {}), ("evit-mass", {"keep_mass": 0.9, "capacity": (140, 100, 70)})):
        _, src = _export(name, params, model_, (1, 3, 224, 224), tmp_path)
        run_pipeline(src, tmp_path / f"{name}.trt85.onnx", TRT85_PIPELINE, photos)
        assert lint(tmp_path / f"{name}.trt85.onnx", "tensorrt-8.5") == [], name


def test_inspect_says_the_opset_downgrade_applies():
    """Its op histogram is unchanged; the opset and the Reduce axes are what it changes."""
    from vitfold.inspection import try_passes

    inits = [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")]
    src = model([helper.make_node("ReduceMean", ["x", "axes"], ["m"], name="mean", keepdims=0)],
                [("x", T.FLOAT, [2, 6, 4])], [("m", T.FLOAT, [2, 4])], inits)
    found = {entry["name"]: entry for entry in try_passes(src, "tensorrt-8.5")}
    assert found["downgrade-opset"]["status"] == "applies" and found["downgrade-opset"]["message"] == "opset 18 -> 17"
    assert found["downgrade-opset"]["errors_after"] == 0 and found["decompose-layernorm"]["status"] == "no change"
