"""merge-as-matmul: token-axis scatter-add merges as one-hot MatMuls, matched by structure; refusals."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import tiny_vit
from vitfold.errors import PassError
from vitfold.export.onnx import export_onnx
from vitfold.passes.merge_as_matmul import TOLERANCE
from vitfold.passes.pipeline import apply_pass, run_pipeline
from vitfold.reduce import TokenLayout, create_method

B, N, R, C = 2, 8, 3, 4


def ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def scatter_graph(path, *, reduction="add", axis=1, index="expand", data_shape=(B, N, C), index_shape=(B, R, C)):
    """data [B, N, C] + ScatterElements(indices, updates [B, R, C]); ``index`` says how the indices
    are made: ``expand`` / ``tile`` of an input ``[B, R, 1]``, ``argmax`` of scores ``[B, R, N]``,
    ``constant`` (equal along channels), ``direct`` (an input of full shape, not provably broadcast)."""
    inits = [numpy_helper.from_array(np.array(index_shape, np.int64), "index_shape"),
             numpy_helper.from_array(np.array([1, 1, index_shape[-1]], np.int64), "repeats"),
             numpy_helper.from_array(np.array([-1], np.int64), "last")]
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, list(data_shape)),
              helper.make_tensor_value_info("updates", TensorProto.FLOAT, list(index_shape))]
    nodes = []
    if index in ("expand", "tile"):
        inputs.append(helper.make_tensor_value_info("column", TensorProto.INT64, [*index_shape[:-1], 1]))
        op = "Expand" if index == "expand" else "Tile"
        nodes.append(helper.make_node(op, ["column", "index_shape" if op == "Expand" else "repeats"], ["indices"]))
    elif index == "argmax":
        inputs.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT, [B, R, N]))
        nodes += [helper.make_node("ArgMax", ["scores"], ["best"], axis=-1, keepdims=1),
                  helper.make_node("Expand", ["best", "index_shape"], ["indices"])]
    elif index == "constant":
        values = np.broadcast_to(np.array([[5], [1], [5]], np.int64), index_shape).copy()
        inits.append(numpy_helper.from_array(values, "indices"))
    else:
        inputs.append(helper.make_tensor_value_info("indices", TensorProto.INT64, list(index_shape)))
    attrs = {"axis": axis} if reduction is None else {"axis": axis, "reduction": reduction}
    nodes.append(helper.make_node("ScatterElements", ["data", "indices", "updates"], ["merged"], name="merge", **attrs))
    graph = helper.make_graph(nodes, "scatter", inputs,
                              [helper.make_tensor_value_info("merged", TensorProto.FLOAT, list(data_shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def feeds(path, seed=0, low=-N, high=N):
    """Random inputs for the graph at ``path`` (indices in [low, high): negatives and duplicates)."""
    rng = np.random.default_rng(seed)
    out = []
    for value in onnx.load(str(path)).graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type == TensorProto.INT64:
            out.append(rng.integers(low, high, size=shape).astype(np.int64))
        else:
            out.append(rng.standard_normal(shape).astype(np.float32))
    return out


def run(path, inputs):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, inputs)))[0]


def rewrite(tmp_path, src, **opts):
    out = tmp_path / "out.onnx"
    onnx.save(apply_pass(onnx.load(str(src)), "merge-as-matmul", **opts), str(out))
    return out


@pytest.mark.parametrize("index", ["expand", "tile", "constant", "argmax"])
def test_scatter_add_becomes_onehot_matmul(tmp_path, index):
    src = scatter_graph(tmp_path / "in.onnx", index=index)
    out = rewrite(tmp_path, src)
    assert "ScatterElements" not in ops(out)
    assert {"Equal", "Cast", "MatMul", "Add"} <= set(ops(out))
    for seed in range(3):
        inputs = feeds(src, seed)
        expected, got = run(src, inputs), run(out, inputs)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_indices_wrap_only_when_they_may_be_negative(tmp_path):
    """Graph inputs may hold negative indices (ScatterElements counts them from the end): a wrap is
    inserted; ArgMax indices are provably >= 0: none is."""
    from_input = rewrite(tmp_path, scatter_graph(tmp_path / "in.onnx", index="expand"))
    assert ops(from_input)["Where"] == 1 and ops(from_input)["Less"] == 1
    from_argmax = rewrite(tmp_path, scatter_graph(tmp_path / "in2.onnx", index="argmax"))
    assert "Where" not in ops(from_argmax)


REFUSALS = {
    "mul": (dict(reduction="mul"), "reduction 'mul' has no one-hot matrix form"),
    "max": (dict(reduction="max"), "reduction 'max' not enabled"),
    "plain": (dict(reduction=None), "reduction 'none'"),
    "channel axis": (dict(axis=2, index_shape=(B, N, 2), data_shape=(B, N, 4)), "axis 2 of a rank-3 tensor is not the token axis"),
    "not broadcast": (dict(index="direct"), "not provably constant over channels"),
    "partial channels": (dict(index_shape=(B, R, 2)), "cover only part of data"),
    "dynamic tokens": (dict(data_shape=(B, "n", C)), "token count 'n' is not static"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_pass_refuses_what_it_cannot_rewrite_exactly(tmp_path, caplog, case):
    kwargs, reason = REFUSALS[case]
    if case == "channel axis":  # a scatter along channels, its index spread over tokens
        kwargs = dict(kwargs, index="direct")
    src = scatter_graph(tmp_path / "in.onnx", **kwargs)
    with caplog.at_level(logging.WARNING, logger="vitfold.passes"):
        out = rewrite(tmp_path, src)
    assert ops(out) == ops(src), "the node must stay"
    (message,) = [r.getMessage() for r in caplog.records]
    assert reason in message and "left merge (ScatterElements" in message
    if case != "dynamic tokens":  # (no concrete shape to feed)
        inputs = feeds(src, low=0, high=2)
        np.testing.assert_array_equal(run(out, inputs), run(src, inputs))


def test_max_reduction_is_rewritten_exactly_when_asked(tmp_path):
    src = scatter_graph(tmp_path / "in.onnx", reduction="max")
    out = rewrite(tmp_path, src, reductions=("add", "max"))
    assert "ScatterElements" not in ops(out) and "ReduceMax" in ops(out)
    for seed in range(3):
        inputs = feeds(src, seed)
        np.testing.assert_array_equal(run(out, inputs), run(src, inputs))  # bit-exact
    with pytest.raises(PassError, match="no exact rewrite"):
        apply_pass(onnx.load(str(src)), "merge-as-matmul", reductions=("mul",))


@pytest.fixture(scope="module")
def tome_onnx(tmp_path_factory):
    """The tiny ViT with ToMe r=2 (4 merges), exported at batch 2, and real photos at 32x32."""
    from vitfold.images import list_images, load_images
    from vitfold.spec import Preprocess

    model = tiny_vit()
    method = create_method("tome", r=2)
    path = tmp_path_factory.mktemp("tome") / "tome.onnx"
    export_onnx(method.apply(model, method.schedule(TokenLayout.of(model))), path, (2, 3, 32, 32))
    photos = load_images(list_images(), Preprocess(img_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
    return path, [photos[:2], photos[2:4]]


def test_exported_tome_merges_become_matmuls(tmp_path, tome_onnx):
    src, photos = tome_onnx
    before = src.read_bytes()
    scatters = ops(src)["ScatterElements"]
    assert scatters == 4
    fold, merge = run_pipeline(src, tmp_path / "out.onnx", ["fold-schedule", "merge-as-matmul"], photos)
    after = ops(tmp_path / "out.onnx")
    assert "ScatterElements" not in after and after["MatMul"] == ops(src)["MatMul"] + scatters
    assert "Where" not in after or after["Where"] == ops(src)["Where"]  # ToMe indices proven >= 0
    assert merge.max_abs_change <= TOLERANCE and merge.notes == ()
    assert src.read_bytes() == before
    # and the result still equals the torch model on the photos
    model = tiny_vit()
    method = create_method("tome", r=2)
    reduced = method.apply(model, method.schedule(TokenLayout.of(model)))
    with torch.no_grad():
        reference = np.concatenate([reduced(torch.from_numpy(p)).numpy() for p in photos])
    got = np.concatenate([run(tmp_path / "out.onnx", [p]) for p in photos])
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-4)


def test_source_tracing_max_stays_by_default_and_is_exact_when_asked(tmp_path):
    from test_export import SourceTracer

    from vitfold.images import list_images, load_images
    from vitfold.spec import Preprocess

    src = tmp_path / "source.onnx"
    export_onnx(SourceTracer().eval(), src, (2, 3, 32, 32))
    photos = [load_images(list_images()[:2], Preprocess(img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3))]
    (default,) = run_pipeline(src, tmp_path / "a.onnx", ["merge-as-matmul"], photos)
    assert ops(tmp_path / "a.onnx")["ScatterElements"] == 1
    assert len(default.notes) == 1 and "reduction 'max' not enabled" in default.notes[0]
    (asked,) = run_pipeline(src, tmp_path / "b.onnx", [("merge-as-matmul", {"reductions": ("add", "max")})], photos)
    assert "ScatterElements" not in ops(tmp_path / "b.onnx") and asked.max_abs_change == 0.0


@pytest.mark.slow
def test_dinov2_real_weights_unchanged_within_tolerance(tmp_path, dinov2_path):
    """Real activations (DINOv2 ViT-S/14, ToMe r=13): the reordered sums stay within TOLERANCE."""
    from vitfold.export.models import create_model
    from vitfold.images import batches, list_images, load_images
    from vitfold.spec import ModelSpec

    model, pre = create_model(ModelSpec("vit_small_patch14_dinov2", checkpoint=str(dinov2_path), img_size=224))
    method = create_method("tome", r=13)
    export_onnx(method.apply(model, method.schedule(TokenLayout.of(model))), tmp_path / "m.onnx", (1, 3, 224, 224))
    photos = batches(load_images(list_images(), pre), 1)
    _, merge = run_pipeline(tmp_path / "m.onnx", tmp_path / "out.onnx", ["fold-schedule", "merge-as-matmul"], photos)
    assert "ScatterElements" not in ops(tmp_path / "out.onnx") and merge.max_abs_change <= TOLERANCE
