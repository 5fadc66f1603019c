"""precision: fp16 / bf16 graphs with float32 islands, a float32 interface, and a stated tolerance."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import tiny_vit
from vitfold.errors import PassError
from vitfold.export.onnx import export_onnx
from vitfold.metrics import TOLERANCES, Tolerance, compare
from vitfold.passes.pipeline import apply_pass, run_pipeline
from vitfold.passes.precision import emulate_bfloat16, has_bfloat16
from vitfold.reduce import TokenLayout, create_method
from vitfold.runtimes.ort import run_onnx

FP16, BF16, FLOAT = TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT
LOW = {"fp16": FP16, "bf16": BF16}


def types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor after shape inference (values, inputs, outputs, initializers)."""
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    graph = proto.graph
    found = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    found.update({t.name: t.data_type for t in graph.initializer})
    return found


def node_types(proto: onnx.ModelProto, op: str) -> list[int]:
    """Element type of the first input of every ``op`` node."""
    found = types(proto)
    return [found[n.input[0]] for n in proto.graph.node if n.op_type == op]


def block_graph() -> onnx.ModelProto:
    """x [2, 6, 8] -> decomposed LayerNorm -> Linear (weights) -> Softmax, ReduceMean -> TopK:
    one of each island next to plain low-precision ops."""
    rng = np.random.default_rng(0)
    f = lambda name, value: numpy_helper.from_array(np.asarray(value, np.float32), name)
    i = lambda name, value: numpy_helper.from_array(np.asarray(value, np.int64), name)
    inits = [f("two", 2.0), f("eps", 1e-5), f("gamma", rng.standard_normal(8)), f("beta", rng.standard_normal(8)),
             f("weight", rng.standard_normal((8, 8)) / 3), f("bias", rng.standard_normal(8)), f("huge", 1e6),
             i("last", [-1]), i("k", [3])]
    nodes = [
        helper.make_node("ReduceMean", ["x", "last"], ["mean"]),
        helper.make_node("Sub", ["x", "mean"], ["centred"]),
        helper.make_node("Pow", ["centred", "two"], ["squared"]),
        helper.make_node("ReduceMean", ["squared", "last"], ["var"]),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["centred", "std"], ["normed"]),
        helper.make_node("Mul", ["normed", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["ln"]),
        helper.make_node("MatMul", ["ln", "weight"], ["proj"]),
        helper.make_node("Add", ["proj", "bias"], ["linear"]),
        helper.make_node("Softmax", ["linear"], ["probs"], axis=-1),
        helper.make_node("ReduceMean", ["probs", "last"], ["score"], keepdims=0),
        helper.make_node("Mul", ["score", "huge"], ["big_score"]),
        helper.make_node("TopK", ["big_score", "k"], ["top", "top_idx"], axis=-1),
        helper.make_node("Erf", ["linear"], ["activated"]),
    ]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", FLOAT, [2, 6, 8])],
        [helper.make_tensor_value_info("activated", FLOAT, [2, 6, 8]), helper.make_tensor_value_info("top", FLOAT, [2, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_islands_stay_float32_and_the_rest_goes_low(precision):
    result = apply_pass(block_graph(), "precision", precision=precision)
    low = LOW[precision]
    found = types(result)
    assert [v.type.tensor_type.elem_type for v in result.graph.input] == [FLOAT]
    assert [v.type.tensor_type.elem_type for v in result.graph.output] == [FLOAT, FLOAT]
    by_output = {n.output[0]: n for n in result.graph.node}
    # the decomposed layer norm, softmax, reduction and the decision (TopK and what feeds it) in float32
    for op in ("ReduceMean", "Sub", "Pow", "Sqrt", "Div", "Softmax", "TopK"):
        assert set(node_types(result, op)) == {FLOAT}, op
    assert found["ln"] == found["big_score"] == FLOAT  # LN's affine tail, the Mul feeding TopK
    assert found["gamma"] == FLOAT and found["huge"] == FLOAT  # their constants with them
    # the linear layer and the activation in low precision, weights converted
    assert found["proj"] == found["linear"] == low and found["weight_" + precision] == low
    assert "weight" not in found  # no float32 copy left behind
    assert by_output["activated"].op_type == "Cast"  # float32 interface at the edge
    assert set(Counter(n.op_type for n in result.graph.node)) - {"Cast"} == {n.op_type for n in block_graph().graph.node}


def test_unknown_precision_is_refused():
    with pytest.raises(PassError, match="precision 'int8' unknown; choose fp16 or bf16"):
        apply_pass(block_graph(), "precision", precision="int8")


def test_fp16_constants_beyond_range_are_clamped(caplog):
    graph = block_graph()
    graph.graph.node[-1].input[0] = "huge_linear"
    graph.graph.node.insert(-1, helper.make_node("Mul", ["linear", "huge"], ["huge_linear"]))
    result = apply_pass(graph, "precision", precision="fp16")
    (huge,) = [t for t in result.graph.initializer if t.name == "huge_fp16"]
    assert numpy_helper.to_array(huge) == np.float16(65504)
    assert "beyond +-65504" in caplog.text


def test_bfloat16_emulation_rounds_where_tensors_are_made():
    """ONNX Runtime CPU has no bf16 Add; the harness runs an emulation: float32 compute, bf16 rounding."""
    result = apply_pass(block_graph(), "precision", precision="bf16")
    assert has_bfloat16(result) and not has_bfloat16(block_graph())
    x = np.random.default_rng(1).standard_normal((2, 6, 8)).astype(np.float32)
    import onnxruntime as ort

    emulated = ort.InferenceSession(emulate_bfloat16(result).SerializeToString(), providers=["CPUExecutionProvider"])
    activated, _ = emulated.run(None, {"x": x})
    reference = ort.InferenceSession(block_graph().SerializeToString(), providers=["CPUExecutionProvider"])
    expected, _ = reference.run(None, {"x": x})
    # erf output rounded to bf16 (8 significant bits): representable, and within bf16 spacing
    bits = activated.view(np.uint32) & 0xFFFF
    assert np.all(bits == 0), "every emulated bf16 value has a zero low half"
    assert np.max(np.abs(activated - expected)) < 2 ** -7 * 2
    with pytest.raises(Exception, match="bfloat16|BFloat16|implementation"):
        ort.InferenceSession(result.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tome_onnx(tmp_path_factory):
    """Tiny ViT, ToMe r=2, at batch 2; its torch outputs on 6 real photos at 32x32."""
    from vitfold.images import list_images, load_images
    from vitfold.spec import Preprocess

    model = tiny_vit()
    method = create_method("tome", r=2)
    reduced = method.apply(model, method.schedule(TokenLayout.of(model)))
    path = tmp_path_factory.mktemp("tome") / "tome.onnx"
    export_onnx(reduced, path, (2, 3, 32, 32))
    photos = load_images(list_images(), Preprocess(img_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
    batches = [photos[i:i + 2] for i in (0, 2, 4)]
    with torch.no_grad():
        reference = np.concatenate([reduced(torch.from_numpy(b)).numpy() for b in batches])
    return path, batches, reference


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_tome_model_within_the_stated_tolerance(tmp_path, tome_onnx, precision):
    src, batches, reference = tome_onnx
    dst = tmp_path / f"tome.{precision}.onnx"
    _, report = run_pipeline(src, dst, ["fold-schedule", ("precision", {"precision": precision})], batches)
    result = onnx.load(str(dst))
    assert report.nodes_after > report.nodes_before  # the Casts
    # islands: every LayerNorm / Softmax / TopK / ArgMax / scatter-add and the ToMe score MatMul in float32
    for op in ("LayerNormalization", "Softmax", "TopK", "ArgMax", "ReduceMax", "ScatterElements"):
        kinds = set(node_types(result, op)) - {TensorProto.INT64}  # ToMe also sorts int64 indices with TopK
        assert kinds == {FLOAT}, op
    found = types(result)
    matmuls = [n for n in result.graph.node if n.op_type == "MatMul"]
    weighted = [n for n in matmuls if n.input[1] in found and n.input[1] in {t.name for t in result.graph.initializer}]
    assert weighted and {found[n.input[1]] for n in weighted} == {LOW[precision]}
    scores = [n for n in matmuls if n.input[1] not in {t.name for t in result.graph.initializer}
              and any(c.op_type == "Where" for c in result.graph.node if n.output[0] in c.input)]
    assert len(scores) == 4 and {found[n.output[0]] for n in scores} == {FLOAT}  # ToMe similarity, per block
    # numerics vs torch on real photos, with the tolerance the project states for this precision
    if precision == "fp16":
        outputs = np.concatenate([next(iter(o.values())) for o in run_onnx(dst, batches)])
    else:
        emulated = tmp_path / "emulated.onnx"
        onnx.save(emulate_bfloat16(result), str(emulated))
        outputs = np.concatenate([next(iter(o.values())) for o in run_onnx(emulated, batches)])
    compare(reference, outputs).check(TOLERANCES[f"precision-pass:{precision}"], f"{precision} vs torch")


def test_bf16_graph_runs_on_openvino(tmp_path, tome_onnx):
    ov = pytest.importorskip("openvino")
    src, batches, reference = tome_onnx
    dst = tmp_path / "tome.bf16.onnx"
    run_pipeline(src, dst, ["fold-schedule", ("precision", {"precision": "bf16"})], batches)
    compiled = ov.Core().compile_model(str(dst), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    outputs = np.concatenate([compiled(b)[0] for b in batches])
    compare(reference, outputs).check(TOLERANCES["precision-pass:bf16"], "bf16 graph on OpenVINO vs torch")


def test_harness_refuses_precision_beyond_its_tolerance(tmp_path, tome_onnx, monkeypatch):
    src, batches, _ = tome_onnx
    monkeypatch.setitem(TOLERANCES, "precision-pass:fp16", Tolerance(max_abs=None, min_cosine=1.0 + 1e-9))
    with pytest.raises(PassError, match=r"min cosine .* < 1\.0.*refused"):
        run_pipeline(src, tmp_path / "out.onnx", [("precision", {"precision": "fp16"})], batches)
    assert not (tmp_path / "out.onnx").exists()


def _full_size(spec, tmp_path, precision):
    """ToMe r=13 on a full-size model, batch 1, every shipped photo: the precision pass through the
    harness (which checks the stated tolerance), then the result vs torch on its own."""
    from vitfold.export.models import create_model
    from vitfold.export.onnx import torch_outputs
    from vitfold.images import batches, list_images, load_images

    model, pre = create_model(spec)
    method = create_method("tome", r=13)
    reduced = method.apply(model, method.schedule(TokenLayout.of(model)))
    photos = batches(load_images(list_images(), pre), 1)
    reference = torch_outputs(reduced, photos)
    export_onnx(reduced, tmp_path / "m.onnx", photos[0].shape)
    dst = tmp_path / f"m.{precision}.onnx"
    run_pipeline(tmp_path / "m.onnx", dst, ["fold-schedule", ("precision", {"precision": precision})], photos)
    if precision == "bf16":
        onnx.save(emulate_bfloat16(onnx.load(str(dst))), str(tmp_path / "emulated.onnx"))
        dst = tmp_path / "emulated.onnx"
    outputs = np.concatenate([next(iter(o.values())) for o in run_onnx(dst, photos)])
    return compare(reference, outputs).check(TOLERANCES[f"precision-pass:{precision}"], f"{spec.name} {precision} vs torch")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_deit_small_within_the_stated_tolerance(tmp_path, precision):
    from vitfold.spec import ModelSpec

    measured = _full_size(ModelSpec("deit_small_patch16_224"), tmp_path, precision)
    assert measured.top1_agreement == 1.0  # random weights: the stated bound, with margin measured at 1.0


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_dinov2_real_weights_within_the_stated_tolerance(tmp_path, dinov2_path, precision):
    from vitfold.spec import ModelSpec

    _full_size(ModelSpec("vit_small_patch14_dinov2", checkpoint=str(dinov2_path), img_size=224), tmp_path, precision)
