"""Pass registry and harness on small synthetic graphs (the onnx-graphsurgeon example layout)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from vitfold.errors import PassError
from vitfold.passes import PASSES, register_pass
from vitfold.passes.pipeline import apply_pass, run_pipeline


def make_shape_arithmetic(path, ir_version=10):
    """x [2, 8, 4] -> Reshape(x, concat(shape(x)[0], -1)) and TopK(sum(x), K = shape(x)[1] / 2):
    the shape arithmetic a static schedule makes constant."""
    c = lambda name, value: numpy_helper.from_array(np.array(value, dtype=np.int64), name)
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["n"], axis=0),
        helper.make_node("Div", ["n", "two"], ["half"]),
        helper.make_node("Unsqueeze", ["half", "zero_axes"], ["k"]),
        helper.make_node("ReduceSum", ["x", "two_axes"], ["score"], keepdims=0),
        helper.make_node("TopK", ["score", "k"], ["vals", "idx"], axis=-1),
        helper.make_node("Gather", ["s", "zero_list"], ["b"], axis=0),
        helper.make_node("Concat", ["b", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = [c("one", 1), c("two", 2), c("zero_axes", [0]), c("two_axes", [2]), c("zero_list", [0]), c("minus_one", [-1])]
    graph = helper.make_graph(
        nodes, "shape_arith",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 4])],
        [helper.make_tensor_value_info("vals", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = ir_version
    onnx.save(model, str(path))
    return path


@pytest.fixture
def inputs():
    return [np.random.default_rng(0).standard_normal((2, 8, 4)).astype(np.float32)]


@pytest.mark.parametrize("ir_version", [10, onnx.IR_VERSION])
def test_fold_schedule_folds_shape_arithmetic(tmp_path, inputs, ir_version):
    """Also with the newest IR stamp, which ONNX Runtime refuses: folding must not be skipped."""
    src = make_shape_arithmetic(tmp_path / "in.onnx", ir_version)
    before = src.read_bytes()
    (report,) = run_pipeline(src, tmp_path / "out.onnx", ["fold-schedule"], inputs)
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "out.onnx")).graph.node)
    assert ops == Counter({"ReduceSum": 1, "TopK": 1, "Reshape": 1})
    assert (report.nodes_before, report.nodes_after) == (9, 3) and report.max_abs_change == 0.0
    graph = gs.import_onnx(onnx.load(str(tmp_path / "out.onnx")))
    topk = next(n for n in graph.nodes if n.op == "TopK")
    assert isinstance(topk.inputs[1], gs.Constant) and topk.inputs[1].values.tolist() == [4]
    assert src.read_bytes() == before  # the input file is never modified


def test_fold_schedule_leaves_a_folded_graph_alone(tmp_path, inputs):
    src = make_shape_arithmetic(tmp_path / "in.onnx")
    run_pipeline(src, tmp_path / "once.onnx", ["fold-schedule"], inputs)
    (report,) = run_pipeline(tmp_path / "once.onnx", tmp_path / "twice.onnx", ["fold-schedule"], inputs)
    assert report.nodes_before == report.nodes_after == 3


def test_harness_refuses_a_pass_that_changes_outputs(tmp_path, inputs):
    @register_pass("test-scale-output", tolerance=1e-6)
    def scale(graph: gs.Graph) -> gs.Graph:
        """Multiply the first output by 1.01 (a wrong rewrite)."""
        out = graph.outputs[0]
        scaled = gs.Variable("scaled", dtype=out.dtype, shape=out.shape)
        producer = out.inputs[0]
        producer.outputs[producer.outputs.index(out)] = scaled
        graph.nodes.append(gs.Node("Mul", inputs=[scaled, gs.Constant("scale_factor", np.array(1.01, np.float32))], outputs=[out]))
        return graph.cleanup().toposort()

    try:
        src = make_shape_arithmetic(tmp_path / "in.onnx")
        with pytest.raises(PassError, match="test-scale-output changed the outputs by .* > its tolerance"):
            run_pipeline(src, tmp_path / "out.onnx", ["test-scale-output"], inputs)
        assert not (tmp_path / "out.onnx").exists()
    finally:
        PASSES.pop("test-scale-output")


def test_registry_refuses_duplicates_and_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="already registered"):
        register_pass("fold-schedule")(lambda g: g)
    with pytest.raises(PassError, match="unknown pass 'no-such-pass'"):
        apply_pass(onnx.load(str(make_shape_arithmetic(tmp_path / "in.onnx"))), "no-such-pass")
