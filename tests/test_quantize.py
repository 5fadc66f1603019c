"""The quantize stage: the ignored scope found on the graph, token-choice agreement, the fidelity gate,
Q/DQ lint for TensorRT, and bad input. Tiny ViTs here; figures on DINOv2 in benchmarks/quantization.py."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import deploy, tiny_vit

from vitfold.compile import compile_module
from vitfold.errors import FidelityError, SpecError
from vitfold.metrics import compare
from vitfold.passes.lint import lint
from vitfold.quantize import Calibration, reduction_scope
from vitfold.quantize.calibration import MIN_IMAGES, load_calibration
from vitfold.quantize.choices import agreement, exits, run_onnxruntime, run_openvino
from vitfold.reduce import TokenLayout, create_method
from vitfold.runtimes import BuildConfig, get_backend
from vitfold.runtimes.backends import INT8
from vitfold.runtimes.tensorrt_config import translate_config

#: Every registered method at a point that reduces tokens in a 4-block tiny ViT.
METHODS = {
    "tome": {"r": 3},
    "evit": {"keep_rate": 0.6, "locations": (1, 2)},
    "topk": {"keep_rate": 0.6, "locations": (1, 2)},
    "evit-mass": {"keep_mass": 0.8, "locations": (1, 2), "capacity": [12, 9]},
    "dpc-knn": {"keep_rate": 0.6, "locations": (1, 2)},
    "kmedoids": {"keep_rate": 0.6, "locations": (1, 2)},
    "expedite": {"location": 1, "grid": 2, "k": 3},
}
SHAPE = (1, 3, 32, 32)


def _photos(n: int = 4) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _export(tmp_path, name: str, params: dict, backend: str = "onnxruntime"):
    """The method on the tiny ViT, exported and through fold-schedule (no backend build)."""
    model = tiny_vit()
    method = create_method(name, **params)
    reduced = method.apply(model, method.schedule(TokenLayout.of(model)))
    compiled = compile_module(reduced, SHAPE, tmp_path / name, BuildConfig(backend), sample=_photos(1))
    return onnx.load(str(compiled.directory / compiled.files["optimized"])), compiled


def _weights(model: onnx.ModelProto) -> set:
    """Float initializers read by the layers that carry weights (Linear, Conv, LayerNorm)."""
    floats = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and np.prod(t.dims) > 1}
    return {i for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv", "LayerNormalization")
            for i in n.input if i in floats}


# --- the ignored scope --------------------------------------------------------------------------

def test_dense_graph_has_an_empty_scope(tmp_path):
    model, _ = _export(tmp_path, "tome", {"r": 0})
    scope = reduction_scope(model)
    assert len(scope) == 0 and scope.sites == ()


@pytest.mark.parametrize("name", [m for m in METHODS if m != "expedite"])
def test_scope_holds_every_decision_and_no_main_path_op(name, tmp_path):
    """The scope holds each method's decisions (TopK / ArgMax / ArgMin) and no node that reads a
    weight or writes a graph output: the Linear layers, LayerNorms and the head stay quantizable."""
    model, _ = _export(tmp_path, name, METHODS[name])
    scope = reduction_scope(model)
    nodes = {n.name: n for n in model.graph.node}
    decisions = [n.name for n in model.graph.node if n.op_type in ("TopK", "ArgMax", "ArgMin", "NonZero")]
    assert decisions, f"{name} exported no decision"
    assert set(decisions) <= set(scope.nodes) and set(scope.decisions) == set(decisions)
    weights, outputs = _weights(model), {o.name for o in model.graph.output}
    for node in scope.nodes:
        assert not set(nodes[node].input) & weights, f"{node} ({nodes[node].op_type}) reads a weight"
        assert not set(nodes[node].output) & outputs, f"{node} writes a graph output"
    linear = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and set(n.input) & weights]
    assert linear and not {n.name for n in linear} & set(scope.nodes)


def test_expedite_makes_no_hard_choice(tmp_path):
    """Expedite's clustering is soft (a softmax of the distances weights every token into every
    centre): no decision op, so nothing to keep exact, and its distances are quantized like q k^T."""
    model, _ = _export(tmp_path, "expedite", METHODS["expedite"])
    assert not [n for n in model.graph.node if n.op_type in ("TopK", "ArgMax", "ArgMin", "NonZero")]
    assert reduction_scope(model).sites == ()


def test_tome_scope_keeps_the_similarity_matmul_float(tmp_path):
    """ToMe: one activation x activation MatMul per merge site (the similarity), each feeding an
    ArgMax through scope nodes; 4 blocks with r=3 give 4 sites of 3 decisions (argmax, argsort, sort)."""
    model, _ = _export(tmp_path, "tome", METHODS["tome"])
    scope = reduction_scope(model)
    nodes = {n.name: n for n in model.graph.node}
    similarity = [n for n in scope.nodes if nodes[n].op_type == "MatMul"]
    assert len(similarity) == len(scope.sites) == 4
    assert all(len(site) == 3 for site in scope.sites)


def test_evit_scope_includes_the_class_attention_it_shares(tmp_path):
    """EViT's class attention comes from the block's softmax(q k^T), which the main path also uses:
    the walk back from the top-k takes in the q k^T MatMul and the softmax of the pruning blocks only."""
    model, _ = _export(tmp_path, "evit", METHODS["evit"])
    scope = reduction_scope(model)
    kinds = [n.op_type for n in model.graph.node if n.name in set(scope.nodes)]
    assert kinds.count("Softmax") == 2 and kinds.count("MatMul") == 2
    assert len(scope.sites) == 2


def test_nncf_quantizes_the_reduced_model_exactly_as_the_dense_one(tmp_path):
    """With the scope ignored, NNCF puts on the ToMe graph the FakeQuantize count of the dense graph:
    nothing of the reduction is quantized, and nothing else is left out. Without it, more."""
    pytest.importorskip("nncf")
    import nncf
    import openvino as ov

    calibration = Calibration([_photos(1)[:, :, :, :]], "test", 1, 5, 0)
    cfg = BuildConfig("openvino", "int8")
    counts = {}
    for label, params in (("dense", {"r": 0}), ("tome", {"r": 3})):
        model = tiny_vit()
        method = create_method("tome", **params)
        compiled = compile_module(method.apply(model, method.schedule(TokenLayout.of(model))), SHAPE,
                                  tmp_path / label, cfg, sample=_photos(1), calibration=calibration)
        ir = ov.Core().read_model(str(compiled.directory / compiled.files["backend"]))
        counts[label] = sum(op.get_type_name() == "FakeQuantize" for op in ir.get_ordered_ops())
        assert compiled.quantization["ignored_scope"]["sites"] == (0 if label == "dense" else 4)
    unscoped = nncf.quantize(ov.convert_model(str(tmp_path / "tome" / "model.opt.onnx")), nncf.Dataset(calibration.batches),
                             model_type=nncf.ModelType.TRANSFORMER, subset_size=1)
    assert counts["tome"] == counts["dense"] > 0
    assert sum(op.get_type_name() == "FakeQuantize" for op in unscoped.get_ordered_ops()) > counts["dense"]


# --- token-choice agreement ---------------------------------------------------------------------

def test_agreement_ignores_order_within_a_site_but_not_after_it():
    ref = [{"a": np.array([[1, 2, 3]]), "b": np.array([[4, 5]])}]
    reordered = [{"a": np.array([[3, 2, 1]]), "b": np.array([[4, 5]])}]
    other = [{"a": np.array([[1, 2, 7]]), "b": np.array([[4, 5]])}]
    same = agreement(ref, ref, [("a",), ("b",)])
    assert (same.identical, same.first_site, same.first_site_tokens) == (1.0, 1.0, 1.0)
    # the same tokens in another order: the first site agrees, the second is not comparable (positions moved)
    moved = agreement(ref, reordered, [("a",), ("b",)])
    assert (moved.identical, moved.first_site) == (0.5, 1.0)
    changed = agreement(ref, other, [("a",), ("b",)])
    assert changed.identical == 0.0 and changed.first_site == 0.0 and changed.first_site_tokens == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        agreement(ref, ref + ref, [("a",)])


def test_agreement_pairs_merged_tokens_with_their_destinations():
    """ToMe's choices at a site: which tokens merge (src) into which (dst). The same pairs in another
    order are the same choice; swapped destinations are not. An index broadcast over channels
    ([B, r, C]) counts once per row."""
    src, dst = np.array([1, 2]), np.array([[[5] * 4, [6] * 4]])
    ref = [{"src": src, "dst": dst}]
    same_pairs = [{"src": src[::-1].copy(), "dst": dst[:, ::-1].copy()}]
    swapped = [{"src": src, "dst": dst[:, ::-1].copy()}]
    assert agreement(ref, same_pairs, [("src", "dst")]).identical == 1.0
    result = agreement(ref, swapped, [("src", "dst")])
    assert result.identical == 0.0 and result.first_site_tokens == 0.0


def test_choices_agree_across_f32_runtimes_and_differ_for_other_weights(tmp_path):
    """The exits of the same f32 graph on ONNX Runtime and OpenVINO agree everywhere; a model with
    other weights makes other choices, and the count says so."""
    model, compiled = _export(tmp_path, "tome", METHODS["tome"])
    found = exits(model)
    assert len(found.sites) == 4 and all(found.sites)
    photos = [p[None] for p in _photos(4)]
    reference = run_onnxruntime(model, found, photos, threads=1)
    pytest.importorskip("openvino")
    import openvino as ov

    ov.save_model(ov.convert_model(str(compiled.directory / "model.opt.onnx")), str(tmp_path / "f32.xml"), compress_to_fp16=False)
    on_openvino = run_openvino(tmp_path / "f32.xml", found, photos, {"INFERENCE_PRECISION_HINT": "f32"})
    assert agreement(reference, on_openvino, found.sites).identical == 1.0
    perturbed = onnx.load(str(compiled.directory / "model.opt.onnx"))
    rng = np.random.default_rng(0)
    for t in perturbed.graph.initializer:
        if t.name in _weights(perturbed) and len(t.dims) == 2:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + rng.normal(0, 0.5, t.dims).astype(np.float32), t.name))
    assert agreement(reference, run_onnxruntime(perturbed, found, photos, threads=1), found.sites).identical < 1.0


# --- the fidelity gate ---------------------------------------------------------------------------

def test_a_broken_calibration_trips_the_gate_and_a_real_one_passes(tmp_path):
    """Ranges taken on images 1000x smaller than the photos clip every activation: the int8 model
    then fails the int8 gate against its f32 torch model; ranges from the photos pass it."""
    pytest.importorskip("nncf")
    import torch

    model = tiny_vit(num_classes=0, global_pool="avg")  # an embedding: cosine is the gate
    photos = _photos(8)
    with torch.no_grad():
        reference = model(torch.from_numpy(photos)).numpy()
    tolerance = get_backend("openvino").tolerance("int8")
    results = {}
    for label, images in (("good", photos), ("broken", photos * 1e-3)):
        calibration = Calibration([i[None] for i in images], label, len(images), 8, 0)
        compiled = compile_module(model, SHAPE, tmp_path / label, BuildConfig("openvino", "int8"),
                                  sample=photos[:1], calibration=calibration)
        with compiled.open(BuildConfig("openvino", "int8")) as session:
            out = np.concatenate([next(iter(session(p[None]).values())) for p in photos])
        results[label] = compare(reference, out, classes=False)
    results["good"].check(tolerance, "good calibration")
    with pytest.raises(FidelityError, match="broken calibration"):
        results["broken"].check(tolerance, "broken calibration")


def test_int8_tolerance_and_overrides_are_written_down():
    assert get_backend("openvino").tolerance("int8") == INT8 and INT8.max_abs is None
    assert get_backend("onnxruntime").tolerance("int8") == INT8
    from vitfold.build import BuildRequest
    from vitfold.spec import ModelSpec

    request = BuildRequest(ModelSpec("vit_tiny_patch16_224"), build=BuildConfig("openvino", "int8"),
                           tolerance={"min_cosine": 0.5})
    assert request.check_tolerance().min_cosine == 0.5 and request.check_tolerance().min_top1 == INT8.min_top1
    with pytest.raises(SpecError, match="min-cosine 3"):
        BuildRequest(ModelSpec("vit_tiny_patch16_224"), build=BuildConfig("openvino", "int8"), tolerance={"min_cosine": 3})


# --- Q/DQ for TensorRT ---------------------------------------------------------------------------

def _qdq_matmul(zero_point_dtype=TensorProto.INT8, zero=0, axis=1, weight_shape=(4, 3)) -> onnx.ModelProto:
    """x [1, 4] -> Q/DQ -> MatMul with a per-channel DQ weight."""
    k, n = weight_shape
    channels = weight_shape[axis]
    inits = [
        numpy_helper.from_array(np.ones(weight_shape, np.int8), "w_q"),
        numpy_helper.from_array(np.full(channels, 0.1, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(channels, np.int8), "w_zero"),
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        helper.make_tensor("x_zero", zero_point_dtype, [], [zero]),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["wd"], name="dq_w", axis=axis),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("target", ["tensorrt-8.5", "tensorrt-10", "tensorrt-11"])
def test_qdq_lint_for_tensorrt(target):
    rules = lambda model: {f.rule for f in lint(model, target) if f.severity == "error"}  # noqa: E731
    assert not rules(_qdq_matmul()) & {"qdq-zero-point", "qdq-weight-axis"}
    assert "qdq-zero-point" in rules(_qdq_matmul(zero_point_dtype=TensorProto.UINT8, zero=128))
    assert "qdq-zero-point" in rules(_qdq_matmul(zero=3))
    assert "qdq-weight-axis" in rules(_qdq_matmul(axis=0))
    # ONNX Runtime takes any of them
    assert not {f.rule for f in lint(_qdq_matmul(zero_point_dtype=TensorProto.UINT8, zero=128), "onnxruntime-cpu")} & {"qdq-zero-point"}


def test_symmetric_qdq_of_a_reduced_model_lints_clean_for_tensorrt_and_u8s8_does_not(tmp_path):
    """The qdq-s8s8 quantizer (TensorRT's) writes what TensorRT's rules accept on the ToMe graph; the
    ONNX Runtime flavour (uint8 activations) is refused for TensorRT by the zero-point rule."""
    from vitfold.quantize import qdq

    model, compiled = _export(tmp_path, "tome", METHODS["tome"])
    calibration = Calibration([p[None] for p in _photos(4)], "test", 4, 5, 0)
    scope = reduction_scope(model)
    for flavour in qdq.FLAVOURS:
        out = tmp_path / flavour
        out.mkdir()
        result = qdq.quantize(compiled.directory / "model.opt.onnx", out, BuildConfig("onnxruntime", "int8"), calibration,
                              scope, flavour=flavour)
        quantized = onnx.load(str(result["path"]))
        assert result["record"]["quantize_nodes"] > 0
        # nothing of the reduction is quantized: no Q/DQ reads a scope node's output
        produced = {o for n in quantized.graph.node if n.name in set(scope.nodes) for o in n.output}
        assert not [n.name for n in quantized.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in produced]
        errors = {f.rule for f in lint(quantized, "tensorrt-10") if f.severity == "error"}
        if flavour == "qdq-s8s8":
            assert not errors & {"qdq-zero-point", "qdq-weight-axis"}
        else:
            assert "qdq-zero-point" in errors


@pytest.mark.parametrize("version, flags", [("8.5.2", ("INT8",)), ("10.3.0", ("INT8",)), ("11.1.0", ())])
def test_tensorrt_int8_builder_settings(version, flags):
    settings = translate_config(BuildConfig("tensorrt", "int8"), version)
    assert settings.set_flags == flags and settings.clear_flags == ("TF32",)
    assert settings.strongly_typed == version.startswith("11")


# --- settings and bad input ----------------------------------------------------------------------

def test_build_config_quantization_settings():
    assert BuildConfig("openvino", "f32", weights="int4").label == "f32-w4"
    assert BuildConfig("openvino", "int8").quantized and not BuildConfig("openvino").quantized
    assert BuildConfig.from_json({"backend": "openvino", "precision": "f32", "threads": None, "hint": "LATENCY",
                                  "cache_dir": None, "extra": {}}).weights is None  # a manifest from 0.1.1
    with pytest.raises(SpecError, match="already stores the weights"):
        BuildConfig("openvino", "int8", weights="int8")
    with pytest.raises(SpecError, match="--weights int4 is not built for onnxruntime"):
        get_backend("onnxruntime").tolerance_for(BuildConfig("onnxruntime", "f32", weights="int4"))


def test_calibration_folder_rules(tmp_path):
    from PIL import Image

    from vitfold.spec import Preprocess

    pre = Preprocess(img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear", crop_pct=1.0)
    with pytest.raises(SpecError, match="no images"):
        load_calibration(tmp_path, pre, 1, warn=lambda m: None)
    for i in range(MIN_IMAGES - 1):
        Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    with pytest.raises(SpecError, match=f"at least {MIN_IMAGES}"):
        load_calibration(tmp_path, pre, 1, warn=lambda m: None)
    for i in range(MIN_IMAGES - 1, 9):
        Image.new("RGB", (40, 40), (0, i * 20, 0)).save(tmp_path / f"{i}.png")
    drawn = load_calibration(tmp_path, pre, 2, subset=6, warn=lambda m: None)
    again = load_calibration(tmp_path, pre, 2, subset=6, warn=lambda m: None)
    assert drawn.images == 6 and len(drawn.batches) == 3 and drawn.batches[0].shape == (2, 3, 32, 32)
    assert all(np.array_equal(a, b) for a, b in zip(drawn.batches, again.batches))  # seeded
    notes = []
    load_calibration(None, pre, 1, warn=notes.append)
    assert notes and "--calibrate DIR" in notes[0]


@pytest.mark.parametrize("args, message", [
    (["--precision", "int8", "--weights", "int8"], "already stores the weights"),
    (["--backend", "onnxruntime", "--weights", "int4"], "--weights int4 is not built for onnxruntime"),
    (["--precision", "int8", "--calibrate", "EMPTY"], "no images"),
    (["--precision", "int8", "--calibrate", "SMALL"], f"at least {MIN_IMAGES} are needed"),
    (["--precision", "int8", "--backend", "tensorrrt"], "Invalid value for '--backend'"),
])
def test_bad_quantization_input_is_one_line_and_writes_nothing(args, message, tmp_path):
    from PIL import Image

    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "SMALL").mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40)).save(tmp_path / "SMALL" / f"{i}.png")
    args = [str(tmp_path / a) if a in ("EMPTY", "SMALL") else a for a in args]
    result = deploy("build", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--r", "1", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr + result.stdout
    assert message in result.stderr
    assert not (tmp_path / "builds").exists() or not any((tmp_path / "builds").iterdir())


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_int8_build_end_to_end(backend, tmp_path):
    """deploy.py build --precision int8: the dense twin quantized the same way, a dense f32 twin, the
    quantization record (scope, calibration, token choices) and the whole gain in the report."""
    pytest.importorskip("nncf")
    out = tmp_path / "b"
    result = deploy("build", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--r", "1", "--backend", backend,
                    "--precision", "int8", "--min-cosine", "0.5", "--min-top1", "0", "--out", str(out),
                    "--min-runs", "3", "--min-seconds", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    dense = json.loads((out / "dense" / "manifest.json").read_text())
    q = manifest["quantization"]
    assert q["precision"] == "int8" and q["calibration"]["source"] == "check photos"
    assert q["ignored_scope"]["sites"] == 12 and dense["quantization"]["ignored_scope"]["nodes"] == 0
    assert {k: v for k, v in q.items() if k not in ("ignored_scope", "choices", "quantize_nodes", "fake_quantize_nodes")} == \
        {k: v for k, v in dense["quantization"].items() if k not in ("ignored_scope", "quantize_nodes", "fake_quantize_nodes")}
    assert 0.0 <= q["choices"]["identical"] <= 1.0 and q["choices"]["sites"] == 12
    assert manifest["checks"]["tolerance"]["min_cosine"] == 0.5
    assert manifest["dense_f32"] == "dense-f32"
    assert json.loads((out / "dense-f32" / "manifest.json").read_text())["build"]["precision"] == "f32"
    report = json.loads((out / "report.json").read_text())
    assert report["speedup_vs_dense_f32"] > 0 and "dense_f32" in report["latency"]
    assert "## Quantization" in (out / "report.md").read_text()


def test_every_record_names_a_quantizer_that_exists():
    from vitfold.quantize import QUANTIZERS, _quantizers
    from vitfold.runtimes import BACKENDS

    assert set(QUANTIZERS) == set(_quantizers())
    assert all(b.quantizer in QUANTIZERS for b in BACKENDS.values() if b.quantizer is not None)
