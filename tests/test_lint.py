"""Backend lint: each rule triggers on a small synthetic graph and stays silent on its fixed form; the
tables are data; ONNX Runtime limits match what ONNX Runtime does; exported ToMe models; `inspect`."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto as T, helper, numpy_helper

from conftest import tiny_vit
from vitfold.errors import PassError, SpecError
from vitfold.passes.lint import (GRAPH_CHECKS, NODE_CHECKS, ORT_MEASURED, SEVERITIES, TARGETS,
                                 lint, onnxruntime_limits, target_for)

TRT = ("tensorrt-8.5", "tensorrt-10", "tensorrt-11")


def model(nodes, inputs, outputs, inits=(), opset=17, ir_version=10):
    """A ModelProto from helper nodes; ``inputs`` / ``outputs`` are (name, dtype, shape)."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs], list(inits))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = ir_version
    return proto


def const(name, value, dtype=np.int64):
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def rules(proto, target):
    """{rule id: [severity, ...]} of the findings."""
    found = {}
    for f in lint(proto, target):
        found.setdefault(f.rule, []).append(f.severity)
    return found


def topk(k=100, sorted_=1, k_from=None, dtype=T.FLOAT, n=5000):
    """x [2, n] -> TopK(x, K); ``k_from``: "input" (a graph input) or "constant" (a Constant node)."""
    nodes, inputs, inits = [], [("x", dtype, [2, n])], []
    if k_from == "input":
        inputs.append(("k", T.INT64, [1]))
    elif k_from == "constant":
        nodes.append(helper.make_node("Constant", [], ["k"], value=const("kv", [k])))
    else:
        inits.append(const("k", [k]))
    nodes.append(helper.make_node("TopK", ["x", "k"], ["v", "i"], name="select", sorted=sorted_))
    return model(nodes, inputs, [("v", dtype, None), ("i", T.INT64, None)], inits)


def test_topk_k_limit():
    for target in TRT:
        assert rules(topk(k=4000), target)["topk-k-limit"] == ["error"]
        assert "topk-k-limit" not in rules(topk(k=100), target)
    assert rules(topk(k=4000), "onnxruntime-cpu") == {} and rules(topk(k=4000), "openvino-cpu") == {}


def test_topk_sorted():
    assert rules(topk(sorted_=0), "tensorrt-10")["topk-sorted"] == ["error"]
    assert rules(topk(sorted_=0), "tensorrt-11")["topk-sorted"] == ["error"]
    assert rules(topk(sorted_=0), "tensorrt-8.5")["topk-sorted"] == ["warning"]  # not documented for 8.5
    assert all("topk-sorted" not in rules(topk(sorted_=1), t) for t in TRT)


def test_topk_k_must_be_constant_on_8_5_only():
    assert rules(topk(k_from="input"), "tensorrt-8.5")["topk-k-constant"] == ["error"]
    assert rules(topk(k_from="input"), "tensorrt-10")["topk-k-constant"] == ["warning"]  # dynamic K since 8.6
    assert rules(topk(k=100, k_from="constant"), "tensorrt-8.5") == {}  # a Constant node is a constant
    # ... and its value is read: K=4000 from a Constant node is over the limit
    assert rules(topk(k=4000, k_from="constant"), "tensorrt-10") == {"topk-k-limit": ["error"]}


def test_topk_integer_values_on_8_5():
    (finding,) = lint(topk(dtype=T.INT64), "tensorrt-8.5")
    assert (finding.rule, finding.node, finding.op_type) == ("topk-input-dtype", "select", "TopK")
    assert "INT64" in finding.message and "Cast" in finding.message
    assert rules(topk(dtype=T.INT64), "tensorrt-10") == {}


def scatter(reduction="add", dtype=T.FLOAT, op="ScatterElements"):
    """data [2, 8, 4] += updates [2, 3, 4] at indices along the token axis (ToMe's merge)."""
    if op == "ScatterElements":
        node = helper.make_node(op, ["data", "idx", "upd"], ["y"], name="merge", axis=1, reduction=reduction)
        inits = [const("idx", np.zeros((2, 3, 4)))]
        upd = ("upd", dtype, [2, 3, 4])
    else:
        node = helper.make_node(op, ["data", "idx", "upd"], ["y"], name="merge", reduction=reduction)
        inits = [const("idx", [[[0, 1]], [[1, 2]]])]
        upd = ("upd", dtype, [2, 1, 4])
    return model([node], [("data", dtype, [2, 8, 4]), upd], [("y", dtype, None)], inits)


def test_scatter_elements_reduction():
    (finding,) = lint(scatter("add"), "tensorrt-8.5")
    assert (finding.rule, finding.severity, finding.node) == ("scatter-reduction", "error", "merge")
    assert "merge-as-matmul" in finding.message
    for target in ("tensorrt-10", "tensorrt-11"):  # the ScatterElements plugin
        assert rules(scatter("add"), target) == {"scatter-reduction-plugin": ["warning"]}
        assert rules(scatter("add", T.BFLOAT16), target)["scatter-reduction-plugin-dtype"] == ["error"]
    assert all(rules(scatter("none"), t) == {} for t in TARGETS)
    assert rules(scatter("add"), "openvino-cpu") == {} and rules(scatter("add"), "onnxruntime-cpu") == {}


def test_scatter_nd_reduction():
    for target in TRT:
        assert rules(scatter("add", op="ScatterND"), target)["scatternd-reduction"] == ["error"]
        assert "scatternd-reduction" not in rules(scatter("none", op="ScatterND"), target)


def test_unique_and_data_dependent_shapes():
    unique = model([helper.make_node("Unique", ["x"], ["y"], name="uniq")], [("x", T.FLOAT, [8])], [("y", T.FLOAT, None)])
    gate = model([helper.make_node("NonZero", ["x"], ["y"], name="gate")], [("x", T.FLOAT, [8])], [("y", T.INT64, None)])
    for target in TRT:
        assert rules(unique, target)["unsupported-op"] == ["error"]
        assert rules(gate, target) == {"data-dependent-shape": ["warning"]}  # NonZero: supported since 8.5
    for target in ("openvino-cpu", "onnxruntime-cpu"):
        assert rules(unique, target) == {} and rules(gate, target) == {}


def test_layer_normalization_is_new_in_8_6():
    ln = model([helper.make_node("LayerNormalization", ["x", "s"], ["y"], name="ln", axis=-1)],
               [("x", T.FLOAT, [2, 4])], [("y", T.FLOAT, None)], [const("s", np.ones(4), np.float32)])
    assert rules(ln, "tensorrt-8.5") == {"unsupported-op": ["error"]}
    assert all(rules(ln, t) == {} for t in ("tensorrt-10", "tensorrt-11", "onnxruntime-cpu", "openvino-cpu"))


def reduce(op="ReduceMean", axes="constant", opset=18):
    inputs, inits = [("x", T.FLOAT, [2, 8, 4])], []
    if axes == "constant":
        inits.append(const("axes", [1]))
    elif axes == "input":
        inputs.append(("axes", T.INT64, [1]))
    names = ["x", "axes"] if axes else ["x"]
    return model([helper.make_node(op, names, ["y"], name="red", keepdims=0)], inputs, [("y", T.FLOAT, None)], inits, opset)


def test_reduce_axes():
    for target in TRT:
        assert rules(reduce(axes="input"), target)["reduce-axes-constant"] == ["error"]
        assert "reduce-axes-constant" not in rules(reduce(axes="constant"), target)
    # opset 18 axes-as-input: 8.5 reads only the attribute; ReduceSum has taken an input since opset 13
    assert rules(reduce(axes="constant"), "tensorrt-8.5") == {"reduce-axes-input": ["error"], "opset": ["warning"]}
    assert rules(reduce("ReduceSum", axes="constant"), "tensorrt-8.5") == {"opset": ["warning"]}
    assert rules(reduce(axes=None, opset=17), "tensorrt-8.5") == {}
    assert rules(reduce(axes="constant"), "tensorrt-10") == {}


def test_squeeze_and_slice_axes_on_8_5():
    squeeze = model([helper.make_node("Squeeze", ["x", "axes"], ["y"], name="sq")],
                    [("x", T.FLOAT, [2, 1, 4]), ("axes", T.INT64, [1])], [("y", T.FLOAT, None)])
    assert rules(squeeze, "tensorrt-8.5")["squeeze-axes-constant"] == ["error"]
    assert rules(squeeze, "tensorrt-10")["squeeze-axes-constant"] == ["warning"]
    sliced = model([helper.make_node("Slice", ["x", "st", "en", "axes"], ["y"], name="sl")],
                   [("x", T.FLOAT, [2, 8]), ("axes", T.INT64, [1])], [("y", T.FLOAT, None)],
                   [const("st", [0]), const("en", [4])])
    assert rules(sliced, "tensorrt-8.5")["slice-axes-constant"] == ["error"]
    assert "slice-axes-constant" not in rules(sliced, "tensorrt-10")  # tensor axes since 10.3


def test_dynamic_dims_other_than_batch():
    relu = lambda shape: model([helper.make_node("Relu", ["x"], ["y"])], [("x", T.FLOAT, shape)], [("y", T.FLOAT, None)])
    (finding,) = lint(relu(["batch", 3, "h", 32]), "tensorrt-10")
    assert (finding.rule, finding.node) == ("dynamic-dims", "x") and "2:h" in finding.detail and "batch" not in finding.detail
    assert lint(relu(["batch", 3, 32, 32]), "tensorrt-10") == []


def test_double_and_bfloat16_dtypes():
    cast = lambda to: model([helper.make_node("Cast", ["x"], ["y"], to=to)], [("x", T.FLOAT, [4])], [("y", to, [4])])
    assert rules(cast(T.DOUBLE), "tensorrt-10") == {"double": ["warning"]}
    assert rules(cast(T.BFLOAT16), "tensorrt-8.5") == {"bfloat16": ["error"]}
    assert rules(cast(T.BFLOAT16), "tensorrt-10") == {}


def bf16(op):
    if op == "MatMul":
        return model([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
                     [("a", T.BFLOAT16, [4, 4]), ("b", T.BFLOAT16, [4, 4])], [("y", T.BFLOAT16, [4, 4])])
    return model([helper.make_node("Reshape", ["a", "s"], ["y"], name="rs")], [("a", T.BFLOAT16, [4, 4])],
                 [("y", T.BFLOAT16, [16])], [const("s", [16])])


def _ort_loads(proto) -> bool:
    import onnxruntime as ort

    try:
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return True
    except Exception:  # noqa: BLE001 - any refusal counts
        return False


def test_onnxruntime_rules_match_onnxruntime():
    """The ONNX Runtime rules flag exactly what the installed version refuses: IR version and opset at
    and one above the probed limits, and the measured bfloat16 rule."""
    limits = onnxruntime_limits()
    assert limits.source == "probed" and limits.max_ir_version >= 10 and limits.max_opset >= 18, limits
    relu = lambda **kw: model([helper.make_node("Relu", ["x"], ["y"])], [("x", T.FLOAT, [2])], [("y", T.FLOAT, [2])], **kw)
    for proto in (relu(ir_version=limits.max_ir_version), relu(ir_version=limits.max_ir_version + 1),
                  relu(opset=limits.max_opset), relu(opset=limits.max_opset + 1), bf16("MatMul"), bf16("Reshape")):
        flagged = bool([f for f in lint(proto, "onnxruntime-cpu") if f.severity == "error"])
        assert flagged != _ort_loads(proto), [f.rule for f in lint(proto, "onnxruntime-cpu")]
    assert rules(bf16("MatMul"), "onnxruntime-cpu") == {"bfloat16-cpu": ["error"]}
    finding = next(f for f in lint(relu(ir_version=limits.max_ir_version + 1), "onnxruntime-cpu") if f.rule == "ir-version")
    assert f"onnxruntime {limits.version}" in finding.message, finding.message  # names the version it measured


def test_measured_onnxruntime_table_matches_the_installed_release():
    """ORT_MEASURED (used where onnxruntime is absent) holds what the probe finds for this release."""
    import onnxruntime

    release = ".".join(onnxruntime.__version__.split(".")[:2])
    if release not in ORT_MEASURED:
        pytest.skip(f"onnxruntime {onnxruntime.__version__} is not in ORT_MEASURED; add its probed limits")
    limits = onnxruntime_limits()
    assert ORT_MEASURED[release] == (limits.max_ir_version, limits.max_opset)


def test_onnxruntime_limits_without_onnxruntime(monkeypatch):
    """Lint without onnxruntime installed falls back to the newest measured release, and says so."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    onnxruntime_limits.cache_clear()
    try:
        limits = onnxruntime_limits()
        newest = max(ORT_MEASURED, key=lambda v: tuple(map(int, v.split("."))))
        assert (limits.source, limits.version, limits.max_ir_version) == ("table", newest, ORT_MEASURED[newest][0])
        assert "not installed" in str(limits)
    finally:
        onnxruntime_limits.cache_clear()


def test_rules_are_data():
    """Every rule is built from the fixed check kinds, node rules from node checks, graph rules from
    exactly one graph check; ids are unique per target and every rule says where its claim comes from."""
    for target, table in TARGETS.items():
        assert table, target
        assert len({r.id for r in table}) == len(table), target
        for rule in table:
            assert rule.severity in SEVERITIES and rule.message and rule.source, (target, rule.id)
            if rule.ops:
                assert all(c.kind in NODE_CHECKS for c in rule.checks), (target, rule.id)
            else:
                assert len(rule.checks) == 1 and rule.checks[0].kind in GRAPH_CHECKS, (target, rule.id)


def test_targets_and_unknown_target():
    assert target_for("tensorrt", "8.5.2") == "tensorrt-8.5"
    assert target_for("tensorrt", "10.3") == target_for("tensorrt", None) == "tensorrt-10"
    assert target_for("tensorrt", "11") == "tensorrt-11"
    assert target_for("tensorrt", "8.6.2.3") == "tensorrt-8.6" and target_for("tensorrt", "9.2.0") == "tensorrt-9"
    assert target_for("openvino") == "openvino-cpu" and target_for("onnxruntime") == "onnxruntime-cpu"
    for args in (("tensorrt", "8.4"), ("tensorrt", "7"), ("coreml", None)):
        with pytest.raises(SpecError, match="tensorrt-8.5, tensorrt-8.6, tensorrt-9, tensorrt-10, tensorrt-11, openvino-cpu, onnxruntime-cpu"):
            target_for(*args)
    with pytest.raises(SpecError, match=r"unknown lint target 'tensorrt-7'; targets: tensorrt-8.5"):
        lint(topk(), "tensorrt-7")


def test_not_onnx(tmp_path):
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"\x00\x01 not a protobuf" * 10)
    with pytest.raises(SpecError, match="not an ONNX model"):
        lint(path, "tensorrt-10")
    with pytest.raises(SpecError, match="does not exist"):
        lint(tmp_path / "missing.onnx", "tensorrt-10")


# --- exported models ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tome_onnx(tmp_path_factory):
    """A tiny ViT with ToMe r=2, exported by vitfold (with its schedule metadata)."""
    from vitfold.export.onnx import export_onnx
    from vitfold.reduce import TokenLayout, create_method

    model_ = tiny_vit()
    method = create_method("tome", r=2)
    schedule = method.schedule(TokenLayout.of(model_))
    path = tmp_path_factory.mktemp("tome") / "tome.onnx"
    export_onnx(method.apply(model_, schedule), path, (1, 3, 32, 32), metadata={"schedule": schedule.to_json()})
    return path


def test_exported_tome(tome_onnx):
    from vitfold.passes import PASSES
    from vitfold.passes.pipeline import apply_pass

    found = rules(tome_onnx, "tensorrt-8.5")
    assert found["scatter-reduction"] == ["error"] * 4  # one merge per block
    assert found["unsupported-op"] == ["error"] * 9  # 2 LayerNormalization per block + the final norm
    assert rules(tome_onnx, "tensorrt-10") == {"scatter-reduction-plugin": ["warning"] * 4}
    assert lint(tome_onnx, "openvino-cpu") == [] and lint(tome_onnx, "onnxruntime-cpu") == []
    if "merge-as-matmul" in PASSES:
        merged = apply_pass(onnx.load(str(tome_onnx)), "merge-as-matmul")
        assert "scatter-reduction" not in rules(merged, "tensorrt-8.5")
        assert rules(merged, "tensorrt-10") == {}


def deploy_inspect(*args):
    from vitfold.cli import main

    return CliRunner().invoke(main, ["inspect", *map(str, args)])


def test_inspect_cli(tome_onnx):
    digest = hashlib.sha256(tome_onnx.read_bytes()).hexdigest()
    bad = deploy_inspect(tome_onnx, "--backend", "tensorrt", "--trt-version", "8.5")
    assert bad.exit_code == 1, bad.output
    assert "scatter-reduction" in bad.output and "node_scatter_reduce" in bad.output
    assert "tokens per block: [17, 15, 13, 11, 9]" in bad.output and "merge-as-matmul" in bad.output
    ok = deploy_inspect(tome_onnx, "--backend", "openvino", "--no-passes")
    assert ok.exit_code == 0 and "0 errors, 0 warnings" in ok.output, ok.output
    info = json.loads(deploy_inspect(tome_onnx, "--backend", "tensorrt", "--json").output)
    assert info["target"] == "tensorrt-10" and info["tokens"] == [17, 15, 13, 11, 9]
    assert {f["rule"] for f in info["lint"]} == {"scatter-reduction-plugin"}
    merge = {p["name"]: p for p in info["passes"]}.get("merge-as-matmul")
    if merge is not None:  # the pass removes the plugin warnings
        assert merge["status"] == "applies" and merge["warnings_after"] == 0 and merge["ops_delta"]["ScatterElements"] == -4
    overview = deploy_inspect(tome_onnx, "--no-passes")
    assert overview.exit_code == 0 and "tensorrt-8.5" in overview.output and "onnxruntime-cpu" in overview.output
    assert hashlib.sha256(tome_onnx.read_bytes()).hexdigest() == digest  # the file is only read


def test_inspect_bad_input(tmp_path, tome_onnx):
    unknown = deploy_inspect(tome_onnx, "--backend", "tensorrt", "--trt-version", "7")
    assert unknown.exit_code == 2 and "tensorrt-8.5, tensorrt-8.6" in unknown.output
    not_onnx = tmp_path / "x.onnx"
    not_onnx.write_text("hello")
    result = deploy_inspect(not_onnx)
    assert result.exit_code == 2 and "not an ONNX model" in result.output
    plain = tmp_path / "plain.onnx"  # no vitfold metadata: inspect still tells what it can
    onnx.save(topk(k=4000), str(plain))
    result = deploy_inspect(plain, "--backend", "tensorrt")
    assert result.exit_code == 1 and "no vitfold metadata" in result.output and "topk-k-limit" in result.output


def test_build_stops_on_lint_errors(tmp_path, monkeypatch):
    """A build whose model the backend cannot take stops before the backend build, naming node and rule."""
    from vitfold import build as build_module
    from vitfold import compile as compile_module
    from vitfold.build import BuildRequest
    from vitfold.profiles.report import LatencyOptions
    from vitfold.runtimes import BuildConfig
    from vitfold.spec import ModelSpec

    built = []
    monkeypatch.setattr(compile_module, "target_for", lambda backend, version=None: "tensorrt-8.5")
    monkeypatch.setattr(compile_module.runtimes, "build", lambda *a, **k: built.append(a))
    out = tmp_path / "builds" / "x"
    request = BuildRequest(ModelSpec("vit_tiny_patch16_224", img_size=32), "tome", {"r": 1},
                           BuildConfig("onnxruntime"), out=out, latency=LatencyOptions(min_runs=3, min_seconds=0))
    with pytest.raises(PassError, match=r"not buildable for tensorrt-8.5: .*LayerNormalization\) \[unsupported-op\]"):
        build_module.build(request, log=lambda m: None)
    assert not built and not out.exists()


@pytest.mark.slow
def test_deit_small_exports():
    """The default model: dense and ToMe r=13 lint clean for OpenVINO and ONNX Runtime; ToMe r=13 has
    one ScatterElements(add) error per block for TensorRT 8.5 and a plugin warning on 10."""
    import tempfile
    from pathlib import Path

    from vitfold.export.models import create_model
    from vitfold.export.onnx import export_onnx
    from vitfold.reduce import TokenLayout, create_method
    from vitfold.spec import ModelSpec

    model_, _ = create_model(ModelSpec("deit_small_patch16_224"))
    with tempfile.TemporaryDirectory() as tmp:
        for r in (0, 13):
            method = create_method("tome", r=r)
            path = Path(tmp) / f"r{r}.onnx"
            export_onnx(method.apply(model_, method.schedule(TokenLayout.of(model_))), path, (1, 3, 224, 224))
            assert lint(path, "openvino-cpu") == [] and lint(path, "onnxruntime-cpu") == []
            found = rules(path, "tensorrt-8.5")
            assert found.get("scatter-reduction", []) == ["error"] * (12 if r else 0)
            assert rules(path, "tensorrt-10") == ({"scatter-reduction-plugin": ["warning"] * 12} if r else {})
