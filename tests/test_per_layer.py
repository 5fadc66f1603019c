"""Per-block profiles: ONNX nodes placed in blocks and categories, backend counters attributed.

The known answer: a tiny ViT (4 blocks) with ToMe merging only in blocks 0 and 2 (``r=[2, 0, 2, 0]``,
no proportional attention) has reduction ops in blocks 0 and 2 only, blocks 1 and 3 look exactly like
the dense twin's, and the dense twin has no reduction ops at all.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import deploy, tiny_vit
from vitfold.profiles.per_layer import (
    LayerProfileOptions,
    LayerTime,
    Place,
    attribute,
    onnx_places,
    profile_variant,
    summarize,
)

R = [2, 0, 2, 0]
REDUCING = {"0", "2"}


def tiny_build(out: Path, backend: str, num_classes: int = 10) -> Path:
    """A real vitfold build (library path, dense twin included) of :func:`tiny_vit` with ToMe ``R``."""
    from vitfold import build as build_module
    from vitfold.build import BuildRequest
    from vitfold.profiles.report import LatencyOptions
    from vitfold.runtimes import BuildConfig
    from vitfold.spec import ModelSpec, Preprocess

    pre = Preprocess(img_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    request = BuildRequest(ModelSpec("tiny_vit"), "tome", {"r": R, "prop_attn": False}, BuildConfig(backend), out=out,
                           latency=LatencyOptions(warmup=1, min_runs=3, min_seconds=0.0))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build_module, "create_model", lambda spec: (tiny_vit(num_classes=num_classes), pre))
        directory, _ = build_module.build(request, log=lambda message: None)
    return directory


_BUILDS: dict[str, Path] = {}


def _built(backend: str, tmp_path_factory) -> Path:
    if backend not in _BUILDS:
        _BUILDS[backend] = tiny_build(tmp_path_factory.mktemp(backend) / "tiny", backend)
    return _BUILDS[backend]


@pytest.fixture(scope="module", params=["openvino", "onnxruntime"])
def build_dir(request, tmp_path_factory) -> Path:
    return _built(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def openvino_build(tmp_path_factory) -> Path:
    return _built("openvino", tmp_path_factory)


def _places(directory: Path) -> dict[str, Place]:
    return onnx_places(directory / "model.opt.onnx", directory / "model.onnx")


def _weight_matmuls(path: Path) -> list[str]:
    graph = onnx.load(str(path)).graph
    weights = {t.name for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input)]


def test_dense_graph_has_no_reduction_and_four_linears_per_block(build_dir):
    places = _places(build_dir / "dense")
    assert not [n for n, p in places.items() if p.category == "reduction"]
    assert {p.block for p in places.values()} == {"embed", "0", "1", "2", "3", "head"}
    linears = Counter((places[n].block, places[n].category) for n in _weight_matmuls(build_dir / "dense" / "model.opt.onnx"))
    for block in "0123":  # qkv + proj, fc1 + fc2
        assert linears[(block, "attention")] == 2 and linears[(block, "mlp")] == 2
    assert linears[("head", "other")] == 1


def test_tome_graph_reduction_only_where_tokens_are_merged(build_dir):
    reduced, dense = _places(build_dir), _places(build_dir / "dense")
    reduction_blocks = {p.block for p in reduced.values() if p.category == "reduction"}
    assert reduction_blocks == REDUCING
    for op in ("TopK", "GatherElements", "ScatterElements"):
        nodes = [p for p in reduced.values() if p.op == op]
        assert nodes and all(p.category == "reduction" and p.block in REDUCING for p in nodes), op
    # blocks that merge nothing are the dense block, op for op and category for category
    for block in ("1", "3"):
        mine = Counter((p.op, p.category) for p in reduced.values() if p.block == block)
        twin = Counter((p.op, p.category) for p in dense.values() if p.block == block)
        assert mine == twin
    # merging blocks keep the dense block's linears in attention / MLP
    linears = Counter((reduced[n].block, reduced[n].category) for n in _weight_matmuls(build_dir / "model.opt.onnx"))
    assert linears[("0", "attention")] == 2 and linears[("0", "mlp")] == 2


def test_places_survive_passes_through_the_source_graph(build_dir):
    optimized = onnx.load(str(build_dir / "model.opt.onnx")).graph
    with_source = _places(build_dir)
    source_only = onnx_places(build_dir / "model.onnx")
    shared = [n.name for n in optimized.node if n.name in source_only]
    assert len(shared) > 0.8 * len(optimized.node)
    assert all(with_source[name] == source_only[name] for name in shared)


def test_attribute_by_name_fusion_origins_and_topology():
    places = {
        "qkv": Place("0", "attention", "MatMul"),
        "bias": Place("0", "attention", "Add"),
        "fc1": Place("1", "mlp", "MatMul"),
        "gelu": Place("1", "mlp", "Mul"),
        "topk": Place("1", "reduction", "TopK"),
    }
    records = [
        ("qkv/WithoutBiases", "FullyConnected", 1.0),                     # OpenVINO suffix
        ("bias + fc1", "fused", 2.0),                                     # TensorRT fusion: the MatMul decides
        LayerTime("Subgraph_9", "Subgraph", 0.5, origins=("Multiply_3", "gelu")),  # origins beat the name
        LayerTime("Reorder_1", "Reorder", 0.25, inputs=("qkv/WithoutBiases",)),    # feeds topk_kernel -> its place
        ("topk_kernel_time", "TopK", 0.125),                              # ONNX Runtime suffix
        LayerTime("Orphan", "Reorder", 0.0625),                           # no name, no neighbours
    ]
    records[4] = LayerTime("topk_kernel_time", "TopK", 0.125, inputs=("Reorder_1",))
    rows = attribute(records, places)
    got = [(r.block, r.category, r.how) for r in rows]
    assert got == [
        ("0", "attention", "name"),
        ("1", "mlp", "name"),
        ("1", "mlp", "name"),
        ("1", "reduction", "topology"),
        ("1", "reduction", "name"),
        ("?", "unattributed", "none"),
    ]
    summary = summarize(rows, run_ms=4.0)
    assert summary["attributed_ms"] == pytest.approx(3.875)
    assert summary["coverage"] == pytest.approx(3.875 / 4.0)
    assert summary["reduction_ms"] == pytest.approx(0.375)
    assert summary["categories"]["unattributed"] == pytest.approx(0.0625)
    assert summary["blocks"]["1"]["mlp"] == pytest.approx(2.5)


def test_backend_counters_are_attributed(build_dir):
    sample = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    options = LayerProfileOptions(warmup=2, runs=5)
    rows, reduced = profile_variant(build_dir, sample, options)
    dense_rows, dense = profile_variant(build_dir / "dense", sample, options)
    for summary, layers in ((reduced, rows), (dense, dense_rows)):
        assert summary["categories"]["unattributed"] == 0.0, [r.name for r in layers if r.how == "none"]
        assert len(summary["run_samples_ms"]) == 5
        # every counted layer is placed; on a model this tiny (~0.2 ms) the per-call overhead outside
        # the layers is a large share of the run, so coverage is only bounded here (DeiT-S: >= 95%)
        assert summary["attributed_ms"] == pytest.approx(summary["counted_ms"]) and summary["attributed_ms"] > 0
        assert 0.0 < summary["coverage"] < 1.5
        assert all(summary["blocks"][b]["attention"] > 0 and summary["blocks"][b]["mlp"] > 0 for b in "0123")
    assert dense["reduction_ms"] == 0.0
    assert reduced["reduction_ms"] > 0.0
    assert {b for b, v in reduced["blocks"].items() if v["reduction"] > 0} == REDUCING


def test_cli_profile_per_layer_writes_table_and_chart(openvino_build):
    build_dir = openvino_build
    result = deploy("profile", str(build_dir), "--per-layer", "--layer-runs", "3", "--min-runs", "3", "--min-seconds", "0")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "reduction overhead" in result.stdout and "cover" in result.stdout
    report = json.loads((build_dir / "report.json").read_text())
    per_layer = report["per_layer"]
    assert per_layer["dense"]["reduction_ms"] == 0.0 and per_layer["reduced"]["reduction_ms"] > 0.0
    assert (build_dir / "per_layer.png").stat().st_size > 1000
    layers = json.loads((build_dir / "per_layer.json").read_text())["layers"]
    assert {row["category"] for row in layers["reduced"]} >= {"attention", "mlp", "reduction", "other"}
    markdown = (build_dir / "report.md").read_text()
    assert "Time per block" in markdown and "coverage" in markdown and "reduction overhead" in markdown


@pytest.mark.parametrize("method, params, where", [
    ("evit", {"keep_rate": 0.7, "locations": [1, 2]}, {"1", "2"}),
    ("topk", {"keep_rate": 0.7, "locations": [2]}, {"2"}),
])
def test_pruning_methods_reduce_only_at_their_locations(tmp_path, method, params, where):
    """Not only ToMe: the pruning methods' TopK / gathers land in the blocks where they prune."""
    from vitfold.export.onnx import export_onnx
    from vitfold.reduce import TokenLayout, create_method

    model = tiny_vit()
    reducer = create_method(method, **params)
    export_onnx(reducer.apply(model, reducer.schedule(TokenLayout.of(model))), tmp_path / "m.onnx", (1, 3, 32, 32))
    places = onnx_places(tmp_path / "m.onnx")
    assert {p.block for p in places.values() if p.category == "reduction"} == where
    assert all(p.category == "reduction" for p in places.values() if p.op == "TopK")
