"""Export contract: static shapes, no If/NonZero, constant TopK K, exact scatters, parity with ORT."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from conftest import FLAVOURS, tiny_vit
from vitfold.errors import ExportError
from vitfold.export.onnx import check_contract, export_and_validate, export_onnx
from vitfold.reduce import TokenLayout, create_method


@pytest.fixture(scope="module")
def photos32():
    from vitfold.images import batches, list_images, load_images
    from vitfold.spec import Preprocess

    pre = Preprocess(img_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return batches(load_images(list_images(), pre), 2)


@pytest.mark.parametrize("flavour", ["plain", "registers", "no_class_token"])
def test_tome_exports_static_and_exact(tmp_path, photos32, flavour):
    model = tiny_vit(**FLAVOURS[flavour])
    method = create_method("tome", r=2)
    schedule = method.schedule(TokenLayout.of(model))
    result, _ = export_and_validate(method.apply(model, schedule), tmp_path / "m.onnx", photos32,
                                    metadata={"schedule": schedule.to_json()})
    assert result.parity.max_abs <= 1e-4 and result.parity.top1_agreement == 1.0
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert not {"If", "Loop", "NonZero"} & set(result.op_counts)
    scatters = [n for n in proto.graph.node if n.op_type == "ScatterElements"]
    assert scatters, "ToMe must merge with ScatterElements"
    # size-weighted average as sum + divide: never a plain (reduction-free) scatter
    reductions = {next(a.s.decode() for a in n.attribute if a.name == "reduction") for n in scatters}
    assert reductions == {"add"}
    assert {p.key for p in proto.metadata_props} >= {"vitfold.schedule"}


class SourceTracer(torch.nn.Module):
    """Outputs ToMe's source matrix, so the amax merge is not dead code. A fixed per-token offset
    keeps identical pixels from tying (tie order is not part of the export contract)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.randn(1, 16, 192, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        from vitfold.reduce.matching import bipartite_soft_matching, merge_source

        b = x.shape[0]  # [B, 3, 32, 32] -> 16 patch tokens [B, 16, 192]
        tokens = x.reshape(b, 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, 192) + self.offset
        merge, _ = bipartite_soft_matching(tokens, 6, num_protected=1)
        return merge_source(merge, tokens)


def test_source_tracing_exports_as_scatter_max(tmp_path, photos32):
    result, _ = export_and_validate(SourceTracer(), tmp_path / "s.onnx", photos32)
    assert result.parity.max_abs == 0.0
    proto = onnx.load(str(tmp_path / "s.onnx"))
    reductions = {a.s.decode() for n in proto.graph.node if n.op_type == "ScatterElements" for a in n.attribute if a.name == "reduction"}
    assert reductions == {"max"}


def test_low_opset_is_refused(tmp_path):
    with pytest.raises(ExportError, match="opset 15 < 16"):
        export_onnx(tiny_vit(), tmp_path / "m.onnx", (1, 3, 32, 32), opset=15)


def _save(tmp_path, nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    return path


def test_contract_rejects_nonzero_and_dynamic_shapes(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [1, "n"])
    path = _save(tmp_path, [helper.make_node("NonZero", ["x"], ["y"], name="gate")], [x], [y])
    with pytest.raises(ExportError, match=r"gate \(NonZero\).*shape not static"):
        check_contract(path)


def test_contract_rejects_runtime_topk_k(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, "K"])
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [2, "K"])
    path = _save(tmp_path, [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="select")], [x, k], [v, i])
    with pytest.raises(ExportError, match=r"select \(TopK\): K is computed at run time"):
        check_contract(path)
