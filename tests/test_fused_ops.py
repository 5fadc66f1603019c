"""``build --fused-ops``: each reduction site as one op (an OpenVINO extension, an ONNX Runtime custom-op
library): ToMe's as ``vitfold.ToMeMerge``, EViT's and Top-K's as ``vitfold.EViTPrune``.

The rewrite itself (tagging at export, fusing the tagged region) and the lint need no compiler. The
extension's tests compile it (cmake and a C++ compiler, a few seconds) into a temporary cache and skip,
saying so, where the toolchain is missing. The ONNX Runtime library's tests also need ONNX Runtime's C
API header, which the pip wheel does not ship (``ONNXRUNTIME_ROOT``, a release archive): they skip,
saying so, without it.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from conftest import FLAVOURS, deploy, tiny_vit
from vitfold.errors import PassError
from vitfold.export.onnx import export_onnx
from vitfold.native import (DOMAIN, LIBRARY, PRUNE_OP, PRUNE_SITE_PREFIX, SITE_PREFIXES, TOME_OP, TOME_SITE_PREFIX, TOME_WAVG_OP,
                            NativeUnavailable)
from vitfold.passes.fuse_sites import fuse_sites
from vitfold.passes.lint import lint
from vitfold.quantize.scope import reduction_scope
from vitfold.reduce import TokenLayout, create_method

TOOLCHAIN = shutil.which("cmake") is not None and (shutil.which("g++") or shutil.which("c++")) is not None
needs_toolchain = pytest.mark.skipif(not TOOLCHAIN, reason="compiling the OpenVINO extension needs cmake and a C++ compiler")


def tiny_export(tmp_path, r=(2, 0, 3, 1), metadata=True, flavour=None, batch=2, **params):
    """A tiny ToMe model, exported the way a build exports it: ``(path, torch model, schedule)``."""
    model = tiny_vit(**(flavour or {}))
    method = create_method("tome", r=list(r), **params)
    schedule = method.schedule(TokenLayout.of(model))
    reduced = method.apply(model, schedule)
    path = tmp_path / "model.onnx"
    export_onnx(reduced, path, (batch, 3, 32, 32), metadata={"schedule": schedule.to_json()} if metadata else None)
    return path, reduced, schedule


def tiny_prune_export(tmp_path, method="evit", flavour=None, **params):
    """A tiny EViT / Top-K model (sites at blocks 1 and 2), exported the way a build exports it:
    ``(path, torch model, schedule)``."""
    model = tiny_vit(**(flavour or {}))
    method = create_method(method, **{"keep_rate": 0.7, "locations": [1, 2], **params})
    schedule = method.schedule(TokenLayout.of(model))
    reduced = method.apply(model, schedule)
    path = tmp_path / "model.onnx"
    export_onnx(reduced, path, (2, 3, 32, 32), metadata={"schedule": schedule.to_json()})
    return path, reduced, schedule


def graph_and_fused_outputs(tmp_path, path, reduced, extension, config=None, seeds=4, weighted=False):
    """Fuse the exported ``path`` (``weighted``: ToMe's size weighting inside the op), compile both forms on
    OpenVINO (f32, the extension loaded) and yield ``(graph form, fused, torch)`` outputs for ``seeds``
    random ``[2, 3, 32, 32]`` batches."""
    import openvino as ov

    fused, _ = fuse_sites(onnx.load(str(path)), weighted=weighted)
    onnx.save(fused, str(tmp_path / "fused.onnx"))
    core = ov.Core()
    core.add_extension(str(extension))
    config = {"INFERENCE_PRECISION_HINT": "f32", **(config or {})}
    graph = core.compile_model(core.read_model(str(path)), "CPU", config)
    one_op = core.compile_model(core.read_model(str(tmp_path / "fused.onnx")), "CPU", config)
    for seed in range(seeds):
        x = np.random.default_rng(seed).standard_normal((2, 3, 32, 32)).astype(np.float32)
        with torch.no_grad():
            reference = reduced(torch.from_numpy(x)).numpy()
        yield graph({0: x})[0], one_op({0: x})[0], reference


@pytest.fixture(scope="module")
def extension(tmp_path_factory):
    """The OpenVINO extension, compiled once into a temporary cache."""
    if not TOOLCHAIN:
        pytest.skip("compiling the OpenVINO extension needs cmake and a C++ compiler")
    from vitfold import native

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VITFOLD_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield native.openvino_ops()


def test_export_tags_each_site_and_the_rewrite_fuses_it(tmp_path):
    path, _, schedule = tiny_export(tmp_path)
    proto = onnx.load(str(path))
    tagged = {n.name[len(TOME_SITE_PREFIX):].split("/")[0] for n in proto.graph.node if n.name.startswith(TOME_SITE_PREFIX)}
    assert tagged == {"0", "2", "3"}  # the blocks with r > 0; block 1 merges nothing
    fused, sites = fuse_sites(proto)
    ops = [n for n in fused.graph.node if n.domain == DOMAIN]
    assert sites == {TOME_OP: 3} and [n.op_type for n in ops] == [TOME_OP] * 3
    attrs = [{a.name: a.i for a in n.attribute} for n in ops]
    assert [a["r"] for a in attrs] == [2, 3, 1] and {a["num_protected"] for a in attrs} == {1}
    assert not any(n.name.startswith(TOME_SITE_PREFIX) and n.domain != DOMAIN for n in fused.graph.node)
    assert len(fused.graph.node) < len(proto.graph.node) - 3 * 20  # ~30 graph nodes per site become one
    assert any(o.domain == DOMAIN and o.version == 1 for o in fused.opset_import)
    assert {p.key for p in proto.metadata_props} <= {p.key for p in fused.metadata_props}
    inferred = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in onnx.shape_inference.infer_shapes(fused).graph.value_info}
    for op, (n, m) in zip(ops, [(17, 15), (15, 12), (12, 11)]):  # tokens before and after each site
        x, keys = op.input
        assert inferred[x] == [2, n, 65] and inferred[op.output[0]] == [2, m, 65]  # tokens | size channel
        assert len(inferred[keys]) == 4 and inferred[keys][0] == 2 and inferred[keys][2] == n  # [B, H, N, d] keys


def test_the_rewrite_moves_the_size_weighting_into_the_op(tmp_path):
    """``weighted``: Mul, Concat, the site, two Slices and Div become one ToMeMergeWavg taking the tokens,
    keys and sizes and giving merged tokens and sizes; a site whose weighting reads otherwise keeps ToMeMerge."""
    path, _, _ = tiny_export(tmp_path)
    proto = onnx.load(str(path))
    plain, _ = fuse_sites(proto)
    fused, sites = fuse_sites(proto, weighted=True)
    ops = [n for n in fused.graph.node if n.domain == DOMAIN]
    assert sites == {TOME_WAVG_OP: 3} and [n.op_type for n in ops] == [TOME_WAVG_OP] * 3
    assert len(fused.graph.node) == len(plain.graph.node) - 3 * 5  # Mul, Concat, 2 Slice, Div per site
    inferred = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in onnx.shape_inference.infer_shapes(fused).graph.value_info}
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in fused.graph.initializer}
    for op, (n, m) in zip(ops, [(17, 15), (15, 12), (12, 11)]):
        x, keys, size = op.input
        assert inferred[x] == [2, n, 64] and inferred[keys][2] == n
        assert [inferred[t] for t in op.output] == [[2, m, 64], [2, m, 1]]
        if n == 17:  # the first site: every token is one patch, a constant of ones
            assert np.array_equal(initializers[size], np.ones((2, 17, 1), np.float32))
        else:  # later sites read the sizes the previous site gave
            assert size in {t for o in ops for t in o.output}
    readers = onnx.load(str(path))  # a second reader of block 2's weighted tokens: that site keeps ToMeMerge
    site_inputs = {i for n in readers.graph.node if n.name.startswith(TOME_SITE_PREFIX + "2/") for i in n.input}
    cat = next(n for n in readers.graph.node if n.op_type == "Concat" and n.output[0] in site_inputs)
    readers.graph.node.append(onnx.helper.make_node("Identity", [cat.input[0]], ["also_read"]))
    readers.graph.output.append(onnx.helper.make_tensor_value_info("also_read", onnx.TensorProto.FLOAT, None))
    _, sites = fuse_sites(readers, weighted=True)
    assert sites == {TOME_WAVG_OP: 2, TOME_OP: 1}


def test_the_rewrite_refuses_what_it_cannot_fuse(tmp_path):
    (tmp_path / "a").mkdir()
    path, _, _ = tiny_export(tmp_path / "a", metadata=False)
    with pytest.raises(PassError, match="no vitfold schedule"):
        fuse_sites(onnx.load(str(path)))
    (tmp_path / "b").mkdir()
    path, _, _ = tiny_export(tmp_path / "b", mode="prune")  # prune mode drops tokens: no merge site
    with pytest.raises(PassError, match="no reduction site to fuse"):
        fuse_sites(onnx.load(str(path)))
    (tmp_path / "c").mkdir()
    path, _, _ = tiny_export(tmp_path / "c")
    proto = onnx.load(str(path))
    site = [n for n in proto.graph.node if n.name.startswith(TOME_SITE_PREFIX + "2/")]
    site[len(site) // 2].name = "untagged"  # a region with a hole is not closed: refused, not half-fused
    with pytest.raises(PassError, match="block 2: the ToMe site .* is not a closed region"):
        fuse_sites(proto)


@pytest.mark.parametrize("method, fuse", [("evit", 1), ("topk", 0)])
def test_the_rewrite_fuses_each_pruning_site(tmp_path, method, fuse):
    path, _, schedule = tiny_prune_export(tmp_path, method)
    proto = onnx.load(str(path))
    tagged = {n.name[len(PRUNE_SITE_PREFIX):].split("/")[0] for n in proto.graph.node if n.name.startswith(PRUNE_SITE_PREFIX)}
    assert tagged == {"1", "2"}
    fused, sites = fuse_sites(proto)
    ops = [n for n in fused.graph.node if n.domain == DOMAIN]
    assert sites == {PRUNE_OP: 2} and [n.op_type for n in ops] == [PRUNE_OP] * 2
    assert not any(n.name.startswith(SITE_PREFIXES) and n.domain != DOMAIN for n in fused.graph.node)
    attrs = [{a.name: a.i for a in n.attribute} for n in ops]
    tokens = schedule.tokens  # 17 at the input; each site keeps ceil(0.7 * (N - 1)) (+1 fused token)
    keeps = [tokens[2] - 1 - fuse, tokens[3] - 1 - fuse]
    assert attrs == [{"keep": k, "num_protected": 1, "fuse": fuse} for k in keeps]
    inferred = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in onnx.shape_inference.infer_shapes(fused).graph.value_info}
    for op, n, m in zip(ops, tokens[1:3], tokens[2:4]):
        x, attn = op.input
        assert inferred[x][:2] == [2, n] and inferred[attn] == [2, n] and inferred[op.output[0]][:2] == [2, m]


@pytest.mark.parametrize("method", ["tome", "evit", "topk"])
def test_a_fused_graph_keeps_the_graph_forms_quantization_scope(tmp_path, method):
    """INT8 keeps the reduction float by the scope :func:`reduction_scope` derives. A fused site makes its
    choices inside one op, so the scope must come out the same as the graph form's less the fused nodes:
    else the fused build quantizes other layers (EViT's class-attention MatMul) than the graph form."""
    path = tiny_export(tmp_path)[0] if method == "tome" else tiny_prune_export(tmp_path, method)[0]
    graph_form = onnx.load(str(path))
    fused, _ = fuse_sites(graph_form)
    expected = {n for n in reduction_scope(graph_form).nodes if not n.startswith(SITE_PREFIXES)}
    assert set(reduction_scope(fused).nodes) == expected
    if method != "tome":
        ops = {n.name: n.op_type for n in fused.graph.node}
        assert "MatMul" in {ops[n] for n in expected}  # the class attention stays float


def test_tome_site_module_keeps_the_function_and_remove_drops_it():
    model = tiny_vit()
    method = create_method("tome", r=2)
    reduced = method.apply(model, method.schedule(TokenLayout.of(model)))
    assert all("tome_site" in b._modules for b in reduced.blocks) and not reduced.blocks[0].tome_site.state_dict()
    assert reduced.state_dict().keys() == model.state_dict().keys()
    type(method).remove(reduced)
    assert not any("tome_site" in b._modules for b in reduced.blocks)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reduced(x), model(x))


def test_lint_says_which_backend_takes_the_fused_op(tmp_path):
    path, _, _ = tiny_export(tmp_path)
    fused, _ = fuse_sites(onnx.load(str(path)))
    onnx.save(fused, str(tmp_path / "fused.onnx"))
    findings = {target: [f for f in lint(tmp_path / "fused.onnx", target) if f.rule == "fused-op"]
                for target in ("openvino-cpu", "onnxruntime-cpu", "tensorrt-10", "tensorrt-8.5")}
    assert {f.severity for f in findings["openvino-cpu"]} == {"warning"} and len(findings["openvino-cpu"]) == 3
    # TensorRT 10+ parses ToMeMerge with vitfold's plugin, ONNX Runtime runs it with vitfold's op library;
    # 8.5 (no IPluginV3) cannot
    assert {f.severity for f in findings["tensorrt-10"]} == {"warning"} and "vitfold.native tensorrt" in findings["tensorrt-10"][0].message
    assert {f.severity for f in findings["onnxruntime-cpu"]} == {"warning"}
    assert "vitfold.native onnxruntime" in findings["onnxruntime-cpu"][0].message
    assert {f.severity for f in findings["tensorrt-8.5"]} == {"error"} and "without --fused-ops" in findings["tensorrt-8.5"][0].message
    for target in ("onnxruntime-cpu", "tensorrt-10"):  # one finding per node, the one that names the fix
        assert not [f for f in lint(tmp_path / "fused.onnx", target) if f.rule == "custom-domain"]
        assert len(findings[target]) == 3
    path, _, _ = tiny_prune_export(tmp_path)  # EViTPrune: OpenVINO and TensorRT 10+ take it too
    fused, _ = fuse_sites(onnx.load(str(path)))
    onnx.save(fused, str(tmp_path / "pruned.onnx"))
    for target in ("tensorrt-10", "openvino-cpu", "onnxruntime-cpu"):
        assert {(f.rule, f.severity) for f in lint(tmp_path / "pruned.onnx", target) if "fused" in f.rule} == {("fused-op", "warning")}
    (tmp_path / "w").mkdir()
    path, _, _ = tiny_export(tmp_path / "w")
    weighted, _ = fuse_sites(onnx.load(str(path)), weighted=True)  # ToMeMergeWavg: the CPU backends' alone
    onnx.save(weighted, str(tmp_path / "weighted.onnx"))
    expected = {"openvino-cpu": ("fused-op", "warning"), "onnxruntime-cpu": ("fused-op", "warning"),
                "tensorrt-10": ("fused-op-no-plugin", "error")}
    for target, finding in expected.items():
        assert {(f.rule, f.severity) for f in lint(tmp_path / "weighted.onnx", target) if "fused" in f.rule} == {finding}
    unknown = onnx.load(str(tmp_path / "pruned.onnx"))  # a vitfold op no plugin implements
    next(n for n in unknown.graph.node if n.domain == DOMAIN).op_type = "SomeFutureOp"
    onnx.save(unknown, str(tmp_path / "unknown.onnx"))
    assert {(f.rule, f.severity) for f in lint(tmp_path / "unknown.onnx", "tensorrt-10") if "fused" in f.rule} >= {
        ("fused-op-no-plugin", "error")}
    assert {(f.rule, f.severity) for f in lint(tmp_path / "unknown.onnx", "onnxruntime-cpu") if "fused" in f.rule} >= {
        ("fused-op-no-kernel", "error")}


@pytest.mark.parametrize("weighted", [False, True], ids=["ToMeMerge", "ToMeMergeWavg"])
@pytest.mark.parametrize("flavour", ["plain", "registers", "no_class_token", "class_and_distillation"])
def test_fused_op_gives_the_graph_forms_outputs_on_openvino(tmp_path, extension, flavour, weighted):
    """0, 1, 2 and 5 prefix tokens: the op keeps each prefix token in place, as the graph form does; with
    the size weighting inside, its averages and sizes are the graph form's."""
    settings = FLAVOURS.get(flavour, {"reg_tokens": 1})  # class + one more prefix token, as DeiT's distillation token
    path, reduced, _ = tiny_export(tmp_path, flavour=settings)
    for graph, fused, reference in graph_and_fused_outputs(tmp_path, path, reduced, extension, {"INFERENCE_NUM_THREADS": 1},
                                                           weighted=weighted):
        assert np.abs(graph - fused).max() <= 1e-5  # the same token choices
        np.testing.assert_allclose(fused, reference, atol=1e-4)


@pytest.mark.parametrize("method", ["evit", "topk"])
@pytest.mark.parametrize("flavour", ["plain", "registers"])
def test_fused_pruning_op_gives_the_graph_forms_outputs_on_openvino(tmp_path, extension, method, flavour):
    """EViTPrune: the same kept tokens in the same order and the fused token's sum term for term (max abs 0),
    with one and five protected prefix tokens (class token and registers)."""
    path, reduced, _ = tiny_prune_export(tmp_path, method, flavour=FLAVOURS[flavour])
    for graph, fused, reference in graph_and_fused_outputs(tmp_path, path, reduced, extension):
        assert np.abs(graph - fused).max() == 0.0
        np.testing.assert_allclose(fused, reference, atol=1e-4)


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_every_vector_path_of_the_matching_gives_the_same_tokens(tmp_path, extension, isa):
    """The kernel picks AVX-512, AVX2 or the generic vectors at run time; VITFOLD_NATIVE_ISA caps it, so each
    path this CPU runs is checked against the widest (the same token choices: outputs within 1e-5)."""
    import subprocess
    import sys

    path, _, _ = tiny_export(tmp_path, r=(3, 3, 2, 2))
    fused, _ = fuse_sites(onnx.load(str(path)), weighted=True)
    onnx.save(fused, str(tmp_path / "fused.onnx"))
    np.save(tmp_path / "x.npy", np.random.default_rng(7).standard_normal((2, 3, 32, 32)).astype(np.float32))
    script = ("import sys, numpy as np, openvino as ov; core = ov.Core(); core.add_extension(sys.argv[1]); "
              "m = core.compile_model(core.read_model(sys.argv[2]), 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'}); "
              "np.save(sys.argv[4], m({0: np.load(sys.argv[3])})[0])")
    outputs = {}
    for cap in ("widest", isa):
        env = {**__import__("os").environ, "VITFOLD_NATIVE_ISA": cap}
        subprocess.run([sys.executable, "-c", script, str(extension), str(tmp_path / "fused.onnx"), str(tmp_path / "x.npy"),
                        str(tmp_path / f"{cap}.npy")], env=env, check=True)
        outputs[cap] = np.load(tmp_path / f"{cap}.npy")
    assert np.abs(outputs["widest"] - outputs[isa]).max() <= 1e-5


@pytest.mark.parametrize("method, params, sites, precision", [
    ("tome", {"r": 2}, 4, "f32"), ("tome", {"r": 2}, 4, "int8"),
    ("evit", {"locations": [1, 2]}, 2, "f32"), ("topk", {"locations": [1, 2]}, 2, "int8")])
def test_fused_build_end_to_end(tmp_path, extension, monkeypatch, method, params, sites, precision):
    """A --fused-ops build: checked against the graph form (int8: quantized alike) and torch, carries its
    extension, loads by itself; int8 reads its token choices off the graph form quantized alike."""
    from vitfold import build as build_module
    from vitfold.build import BuildRequest
    from vitfold.profiles.report import LatencyOptions
    from vitfold.runtimes import BuildConfig, load
    from vitfold.spec import ModelSpec, Preprocess

    monkeypatch.setenv("VITFOLD_CACHE", str(extension.parent.parent.parent))  # the compiled one
    pre = Preprocess(img_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    monkeypatch.setattr(build_module, "create_model", lambda spec: (tiny_vit(num_classes=10), pre))
    cfg = BuildConfig("openvino", precision, extra={"fused_ops": True})
    request = BuildRequest(ModelSpec("tiny_vit"), method, params, cfg, out=tmp_path / "b",
                           latency=LatencyOptions(warmup=1, min_runs=3, min_seconds=0.0),
                           tolerance={"min_cosine": 0.5, "min_top1": 0.0} if precision == "int8" else None)
    assert "-fused-" in request.name()
    import vitfold.compile as compile_module_

    graph_forms = []  # the graph form is compiled once per fused variant: the check's, kept for the token choices
    real_compile = compile_module_.compile_onnx
    def counting(*args, **kwargs):
        if kwargs.get("passes") == []:  # a graph form (the fused build's own compile runs the pipeline)
            graph_forms.append(args[1])
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(compile_module_, "compile_onnx", counting)
    directory, report = build_module.build(request, log=lambda message: None)
    assert len(graph_forms) == 1 and not (directory / build_module.GRAPH_FORM).exists()
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["files"]["extension"] == LIBRARY and (directory / LIBRARY).is_file()
    dense = json.loads((directory / "dense" / "manifest.json").read_text())
    assert "extension" not in dense["files"]  # the dense twin has no site: the graph form, no extension
    fused = [p for p in manifest["passes"] if p["name"] == "fuse-sites"]
    assert len(fused) == 1 and fused[0]["max_abs_change"] <= 1e-5 and fused[0]["nodes_after"] < fused[0]["nodes_before"]
    if method == "tome":  # the size weighting inside the op, at f32 and int8
        built = onnx.load(str(directory / manifest["files"]["fused"]))
        assert {n.op_type for n in built.graph.node if n.domain == DOMAIN} == {TOME_WAVG_OP}
    if precision == "f32":
        assert report["parity_vs_torch"]["reduced"]["max_abs"] <= 1e-4  # the fused build against torch
    else:
        choices = manifest["quantization"]["choices"]
        assert choices["sites"] == sites and "graph form quantized alike" in choices["runner"]
        assert 0.0 <= choices["identical"] <= 1.0
    if precision == "f32":  # the per-layer profile reads the fused graph: each op's time is the reduction's
        from vitfold.profiles.per_layer import LayerProfileOptions, profile_variant

        sample = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
        rows, _ = profile_variant(directory, sample, LayerProfileOptions(warmup=1, runs=2))
        ops = [r for r in rows if r.type == "Reference"]
        assert len(ops) == sites and {r.category for r in ops} == {"reduction"}
    session = load(directory)  # a device app: the manifest names the extension, load registers it
    x = np.random.default_rng(0).standard_normal(session.input_shape).astype(np.float32)
    assert session(x)["logits"].shape == (1, 10)
    session.close()


def test_missing_toolchain_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    from vitfold import native

    monkeypatch.setenv("VITFOLD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native.shutil, "which", lambda tool: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(NativeUnavailable, match="needs cmake and a C\\+\\+17 compiler .* build without --fused-ops"):
        native.openvino_ops()
    with pytest.raises(NativeUnavailable, match="not built .* python -m vitfold.native"):
        native.openvino_ops(build=False)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob(LIBRARY))


@pytest.mark.parametrize("args, message", [
    (["--backend", "onnxruntime", "--precision", "bf16"], "and on TensorRT 10+ at f32"),
    (["--precision", "bf16"], "--fused-ops runs on OpenVINO and ONNX Runtime at f32 or int8"),
    (["--weights", "int8"], "--fused-ops runs on OpenVINO and ONNX Runtime at f32 or int8"),
    (["--backend", "tensorrt", "--precision", "fp16"], "and on TensorRT 10+ at f32"),
    (["--method", "expedite"], "--fused-ops fuses the reduction sites of"),
    (["--mode", "prune"], "--fused-ops fuses the reduction sites of"),
    (["--task", "features"], "--fused-ops fuses the reduction sites of"),
])
def test_cli_refuses_fused_ops_where_it_cannot_run(tmp_path, args, message):
    result = deploy("build", "--fused-ops", "--out", str(tmp_path / "x"), *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "x").exists()


def test_a_reduced_model_without_sites_is_refused_not_built_unfused(tmp_path):
    """--fused-ops on a reduced model with no fusable site (here prune mode; an Eva model alike) stops
    with the reason instead of quietly building the graph form under a "fused" name; a dense model
    (the twin) builds the graph form."""
    from vitfold.compile import _fuse_sites
    from vitfold.runtimes import BuildConfig

    cfg = BuildConfig("openvino", extra={"fused_ops": True})
    (tmp_path / "prune").mkdir()
    path, _, _ = tiny_export(tmp_path / "prune", mode="prune")
    with pytest.raises(PassError, match="no reduction site to fuse"):
        _fuse_sites(path, tmp_path / "prune", cfg, log=lambda m: None)
    (tmp_path / "dense").mkdir()
    path, _, _ = tiny_export(tmp_path / "dense", r=(0, 0, 0, 0))
    assert _fuse_sites(path, tmp_path / "dense", cfg, log=lambda m: None) is None
    assert not (tmp_path / "dense" / "model.fused.onnx").exists()


def test_compile_module_hands_the_schedule_to_the_fused_build(tmp_path, extension, monkeypatch):
    """The planner's calibration (--schedule auto --fused-ops) compiles through compile_module: with the
    schedule as metadata its reduced models build fused; without it the rewrite cannot know the prefix."""
    from vitfold.compile import compile_module
    from vitfold.runtimes import BuildConfig

    monkeypatch.setenv("VITFOLD_CACHE", str(extension.parent.parent.parent))
    model = tiny_vit()
    method = create_method("tome", r=2)
    schedule = method.schedule(TokenLayout.of(model))
    cfg = BuildConfig("openvino", extra={"fused_ops": True})
    compiled = compile_module(method.apply(model, schedule), (1, 3, 32, 32), tmp_path / "with", cfg,
                              metadata={"schedule": schedule.to_json()})
    assert compiled.files["extension"] == LIBRARY and [p.name for p in compiled.passes][-1] == "fuse-sites"
    with pytest.raises(PassError, match="no vitfold schedule"):
        compile_module(method.apply(model, schedule), (1, 3, 32, 32), tmp_path / "without", cfg)


def test_per_layer_profile_places_each_fused_site_in_its_block_as_reduction(tmp_path):
    """The fused op has no module path of its own: read from the fused graph the backend built, the topology
    rules place it in its block as reduction (between the block's attention and its MLP)."""
    from vitfold.profiles.per_layer import onnx_places

    path, _, _ = tiny_export(tmp_path)
    fused, _ = fuse_sites(onnx.load(str(path)))
    onnx.save(fused, str(tmp_path / "fused.onnx"))
    places = onnx_places(tmp_path / "fused.onnx", path)
    ops = {n.name: places[n.name] for n in fused.graph.node if n.domain == DOMAIN}
    assert {(p.block, p.category) for p in ops.values()} == {("0", "reduction"), ("2", "reduction"), ("3", "reduction")}
    assert {p.category for name, p in places.items() if "mlp" in name} <= {"mlp"}


@pytest.mark.parametrize("method, params", [("tome", {"r": 13}), ("evit", {"keep_rate": 0.7}), ("topk", {"keep_rate": 0.7})])
def test_fused_int8_build_equals_the_graph_form_on_real_weights(tmp_path, extension, monkeypatch, dinov2_path, method, params):
    """DINOv2, ToMe r=13 and EViT / Top-K keep 0.7, INT8: the fused build must equal the graph form quantized
    alike (the build's own check, 1e-5, raises otherwise). An earlier fused ToMe op that did the size weighting
    itself passed on the tiny random model and failed here by 0.08: a last-bit difference before a FakeQuantize
    flips its rounding. ToMeMergeWavg rounds as OpenVINO's graph form does (its division a reciprocal multiply)."""
    from vitfold.compile import compile_onnx
    from vitfold.export.models import create_model
    from vitfold.images import list_images, load_images
    from vitfold.quantize import load_calibration
    from vitfold.runtimes import BuildConfig
    from vitfold.spec import ModelSpec

    monkeypatch.setenv("VITFOLD_CACHE", str(extension.parent.parent.parent))
    model, pre = create_model(ModelSpec("vit_small_patch14_dinov2", checkpoint=str(dinov2_path), img_size=224))
    method = create_method(method, **params)
    schedule = method.schedule(TokenLayout.of(model))
    path = tmp_path / "model.onnx"
    export_onnx(method.apply(model, schedule), path, (1, 3, 224, 224), metadata={"schedule": schedule.to_json()})
    sample = load_images(list_images(), pre)[:1]
    cfg = BuildConfig("openvino", "int8", extra={"fused_ops": True})
    calibration = load_calibration(None, pre, 1, warn=lambda message: None)
    compiled = compile_onnx(path, tmp_path, cfg, sample, calibration=calibration)
    check = [p for p in compiled.passes if p.name == "fuse-sites"]
    assert len(check) == 1 and check[0].max_abs_change == 0.0


def test_tensorrt_takes_the_fused_tome_site_through_vitfolds_plugin(tmp_path, monkeypatch):
    """The GPU-free side of --fused-ops on TensorRT: the build asks for the plugin library only when its graph
    holds vitfold ops (ToMeMerge, EViTPrune), and refuses a vitfold op no plugin implements."""
    from vitfold import native
    from vitfold.compile import _fuse_sites
    from vitfold.errors import SpecError
    from vitfold.runtimes import BuildConfig
    from vitfold.runtimes import tensorrt as trt_backend

    asked = []
    monkeypatch.setattr(native, "tensorrt_plugin", lambda **kw: asked.append(kw) or tmp_path / native.TENSORRT_LIBRARY)
    cfg = BuildConfig("tensorrt", extra={"fused_ops": True})
    (tmp_path / "tome").mkdir()
    path, _, _ = tiny_export(tmp_path / "tome")
    assert trt_backend._fused_plugin(path, cfg) is None and not asked  # the graph form: no plugin
    fused = _fuse_sites(path, tmp_path / "tome", cfg, log=lambda m: None)
    assert trt_backend._fused_plugin(fused.path, cfg) == tmp_path / native.TENSORRT_LIBRARY and len(asked) == 1
    ops = {n.op_type for n in onnx.load(str(fused.path)).graph.node if n.domain == native.DOMAIN}
    assert ops == {TOME_OP}  # the plugins implement ToMeMerge: the size weighting stays in the graph
    assert trt_backend._fused_plugin(fused.path, BuildConfig("tensorrt")) is None  # not a --fused-ops build
    with monkeypatch.context() as lean:  # a device without the onnx package: the graph's bytes say it
        lean.setitem(__import__("sys").modules, "onnx", None)
        assert trt_backend._fused_plugin(fused.path, cfg) is not None and trt_backend._fused_plugin(path, cfg) is None
    with_plugin = trt_backend._with_plugin(BuildConfig("tensorrt", extra={"plugins": ["a.so"]}), tmp_path / "b.so")
    assert with_plugin.extra["plugins"] == ["a.so", str(tmp_path / "b.so")]
    (tmp_path / "evit").mkdir()
    path, _, _ = tiny_prune_export(tmp_path / "evit")
    fused = _fuse_sites(path, tmp_path / "evit", cfg, log=lambda m: None)
    assert trt_backend._fused_plugin(fused.path, cfg) == tmp_path / native.TENSORRT_LIBRARY and len(asked) == 3
    unknown = onnx.load(str(fused.path))
    next(n for n in unknown.graph.node if n.domain == native.DOMAIN).op_type = "SomeFutureOp"
    onnx.save(unknown, str(tmp_path / "evit" / "unknown.onnx"))
    with pytest.raises(SpecError, match="no vitfold plugin for SomeFutureOp"):
        trt_backend._fused_plugin(tmp_path / "evit" / "unknown.onnx", cfg)
    weighted, _ = fuse_sites(onnx.load(str(tmp_path / "tome" / "model.onnx")), weighted=True)  # fused for a CPU backend
    onnx.save(weighted, str(tmp_path / "weighted.onnx"))
    with pytest.raises(SpecError, match="no vitfold plugin for ToMeMergeWavg"):
        trt_backend._fused_plugin(tmp_path / "weighted.onnx", cfg)
    with monkeypatch.context() as lean, pytest.raises(SpecError, match="no vitfold plugin for ToMeMergeWavg"):
        lean.setitem(__import__("sys").modules, "onnx", None)
        trt_backend._fused_plugin(tmp_path / "weighted.onnx", cfg)


def test_tensorrt_plugin_build_says_what_is_missing(tmp_path, monkeypatch):
    """``python -m vitfold.native tensorrt`` without TensorRT (or nvcc): one line, exit 2, nothing cached."""
    import subprocess
    import sys

    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the missing-TensorRT message cannot be shown")
    except ImportError:
        pass
    env = {**__import__("os").environ, "VITFOLD_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "vitfold.native", "tensorrt"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "build without --fused-ops" in done.stderr, done.stderr
    assert not (tmp_path / "cache").exists()
    done = subprocess.run([sys.executable, "-m", "vitfold.native", "cuda"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "usage: python -m vitfold.native [openvino|onnxruntime|tensorrt]" in done.stderr


def test_exported_fused_build_is_built_and_checked_on_the_device(tmp_path, extension, monkeypatch):
    """The Jetson flow with --fused-ops: the workstation exports the fused graph (--export-only), the device
    side (no torch) builds it with the native library compiled there, checks it against the graph form built
    beside it (max abs 0 on OpenVINO) and against the workstation's torch reference."""
    from vitfold import build as build_module
    from vitfold import device
    from vitfold.build import BuildRequest
    from vitfold.runtimes import BuildConfig, load
    from vitfold.spec import ModelSpec, Preprocess

    monkeypatch.setenv("VITFOLD_CACHE", str(extension.parent.parent.parent))
    pre = Preprocess(img_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    monkeypatch.setattr(build_module, "create_model", lambda spec: (tiny_vit(num_classes=10), pre))
    cfg = BuildConfig("openvino", extra={"fused_ops": True})
    request = BuildRequest(ModelSpec("tiny_vit"), "evit", {"locations": [1, 2]}, cfg, out=tmp_path / "b", export_only=True)
    directory, _ = build_module.build(request, log=lambda message: None)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["stage"] == "exported" and "fused" in manifest["files"] and "backend" not in manifest["files"]
    device.build(directory, profile=False, log=lambda message: None)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["stage"] == "built on the device" and manifest["files"]["extension"] == LIBRARY
    assert manifest["checks"]["fused_vs_graph_form"]["max_abs"] == 0.0
    assert manifest["checks"]["backend_vs_torch"]["max_abs"] <= 1e-4
    with load(directory) as session:
        x = np.random.default_rng(0).standard_normal(session.input_shape).astype(np.float32)
        assert session(x)["logits"].shape == (1, 10)


def test_a_plain_dense_twin_serves_a_fused_build(tmp_path):
    """--dense-from: a fused build's dense twin has no site, so a plain dense build of the same settings is
    the same artifact and is accepted; other settings are still refused."""
    from vitfold.artifact import MANIFEST, MANIFEST_SCHEMA
    from vitfold.build import DENSE_METHOD, BuildRequest, _shared_dense
    from vitfold.errors import ArtifactError
    from vitfold.runtimes import BuildConfig
    from vitfold.spec import ModelSpec

    common = {"spec": {"name": "tiny"}, "task": "classify"}
    dense = tmp_path / "dense"
    dense.mkdir()
    manifest = {"schema": MANIFEST_SCHEMA, "files": {}, "method": DENSE_METHOD, **common,
                "build": BuildConfig("openvino").to_json()}
    (dense / MANIFEST).write_text(json.dumps(manifest))
    fused = BuildRequest(ModelSpec("tiny"), "tome", {"r": 2}, BuildConfig("openvino", extra={"fused_ops": True}), dense_dir=dense)
    assert _shared_dense(fused, common, tmp_path / "out") == "../dense"  # relative to the build
    other = BuildRequest(ModelSpec("tiny"), "tome", {"r": 2}, BuildConfig("openvino", threads=1), dense_dir=dense)
    with pytest.raises(ArtifactError, match="cannot be the dense twin: its build"):
        _shared_dense(other, common, tmp_path / "out")


def test_the_fused_check_stops_a_build_whose_outputs_moved():
    """The one comparison the workstation's build and the device side share: exact agreement passes, a
    change above the tolerance (another token choice) stops the build with the build's name and the fix."""
    from vitfold.errors import FidelityError
    from vitfold.native import FUSED_TOLERANCE, check_fused_outputs

    expected = {"logits": np.zeros((2, 10), np.float32)}
    assert check_fused_outputs(expected, {"logits": np.zeros((2, 10), np.float32)}, "", "openvino") == 0.0
    near = {"logits": np.full((2, 10), FUSED_TOLERANCE / 2, np.float32)}
    assert 0 < check_fused_outputs(expected, near, "", "openvino") <= FUSED_TOLERANCE
    with pytest.raises(FidelityError, match="^b: the fused sites moved the outputs by 0.01 .* build without --fused-ops"):
        check_fused_outputs(expected, {"logits": np.full((2, 10), 0.01, np.float32)}, "b: ", "tensorrt")
    # relative to the outputs' scale: a summation order's last bits on large features pass, another choice does not
    large = {"features": np.full((2, 10), 50.0, np.float32)}
    assert check_fused_outputs(large, {"features": large["features"] + 2e-4}, "", "onnxruntime") <= 50 * FUSED_TOLERANCE
    with pytest.raises(FidelityError, match=r"above 0.0005 \(1e-05 of their scale\)"):
        check_fused_outputs(large, {"features": large["features"] + 0.01}, "", "onnxruntime")


# ONNX Runtime: the same host kernels as a custom-op library (vitfold/native/onnxruntime).

ORT_HEADER_MISSING = ("the ONNX Runtime op library compiles against ONNX Runtime's C API header, which the pip wheel does "
                      "not ship: set ONNXRUNTIME_ROOT to an ONNX Runtime release (its include/ folder) to run this test")


@pytest.fixture(scope="module")
def ort_library(tmp_path_factory):
    """vitfold's ONNX Runtime op library, compiled once into a temporary cache."""
    if not TOOLCHAIN:
        pytest.skip("compiling the ONNX Runtime op library needs cmake and a C++ compiler")
    from vitfold import native

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VITFOLD_CACHE", str(tmp_path_factory.mktemp("ort-cache")))
        try:
            library = native.onnxruntime_ops()
        except NativeUnavailable as exc:
            if "onnxruntime_c_api.h not found" not in str(exc):
                raise
            pytest.skip(ORT_HEADER_MISSING)
        yield library


def ort_run(path, x, library=None, threads=1):
    """The first output of the ONNX file ``path`` on ONNX Runtime's CPU provider (vitfold's session
    options; ``library``: vitfold's op library registered)."""
    import onnxruntime as ort

    from vitfold.runtimes import BuildConfig
    from vitfold.runtimes.ort import session_options

    options = session_options(BuildConfig("onnxruntime", threads=threads), extension=library)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("kind, flavour", [
    ("tome", "plain"), ("tome", "registers"), ("tome", "no_class_token"), ("tome", "class_and_distillation"),
    ("tome-wavg", "plain"), ("tome-wavg", "registers"), ("tome-wavg", "no_class_token"),
    ("evit", "plain"), ("evit", "registers"), ("topk", "plain")])
def test_fused_ops_give_the_graph_forms_outputs_on_onnxruntime(tmp_path, ort_library, kind, flavour):
    """The library's ToMeMerge, ToMeMergeWavg and EViTPrune against ONNX Runtime's own graph form: the same
    token choices (outputs within 1e-5; ToMe bit for bit, its size weighting included) and torch's outputs,
    with 0, 1, 2 and 5 prefix tokens. EViT's not bit for bit as on OpenVINO: ONNX Runtime's ReduceSum adds
    its fused token in another order (measured: 7e-8)."""
    settings = FLAVOURS.get(flavour, {"reg_tokens": 1})
    if kind.startswith("tome"):
        path, reduced, _ = tiny_export(tmp_path, flavour=settings)
    else:
        path, reduced, _ = tiny_prune_export(tmp_path, kind, flavour=settings)
    fused, sites = fuse_sites(onnx.load(str(path)), weighted=kind == "tome-wavg")
    assert kind != "tome-wavg" or set(sites) == {TOME_WAVG_OP}
    onnx.save(fused, str(tmp_path / "fused.onnx"))
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((2, 3, 32, 32)).astype(np.float32)
        graph, one_op = ort_run(path, x), ort_run(tmp_path / "fused.onnx", x, ort_library)
        assert np.abs(graph - one_op).max() <= (0.0 if kind.startswith("tome") else 1e-5)
        with torch.no_grad():
            np.testing.assert_allclose(one_op, reduced(torch.from_numpy(x)).numpy(), atol=1e-4)


def test_one_image_is_split_across_onnxruntimes_threads(tmp_path, ort_library):
    """At batch 1 ToMeMerge splits its image's normalisation, matching and row copies across ONNX Runtime's
    intra-op threads (KernelContext_ParallelFor): the same outputs as one thread and as the graph form."""
    path, _, _ = tiny_export(tmp_path, r=(3, 3, 2, 2), batch=1)
    for weighted in (False, True):
        fused, _ = fuse_sites(onnx.load(str(path)), weighted=weighted)
        onnx.save(fused, str(tmp_path / "fused.onnx"))
        x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
        one, two = (ort_run(tmp_path / "fused.onnx", x, ort_library, threads=t) for t in (1, 2))
        assert np.array_equal(one, two) and np.abs(ort_run(path, x) - two).max() <= 1e-5


def test_onnxruntime_op_refuses_an_impossible_r_with_its_reason(tmp_path, ort_library):
    path, _, _ = tiny_export(tmp_path)
    fused, _ = fuse_sites(onnx.load(str(path)))
    op = next(n for n in fused.graph.node if n.op_type == TOME_OP)
    next(a for a in op.attribute if a.name == "r").i = 9  # 17 tokens, 1 protected: at most 8
    del fused.graph.value_info[:]  # the declared shapes would disagree first
    onnx.save(fused, str(tmp_path / "fused.onnx"))
    x = np.zeros((2, 3, 32, 32), np.float32)
    with pytest.raises(Exception, match=r"r must be in 1 \.\. \(N - num_protected\) / 2"):
        ort_run(tmp_path / "fused.onnx", x, ort_library)


@pytest.mark.parametrize("precision", ["f32", "int8"])
def test_fused_build_end_to_end_on_onnxruntime(tmp_path, ort_library, monkeypatch, precision):
    """An ONNX Runtime --fused-ops build: checked against the graph form (int8: its Q/DQ graph, fused after
    quantization) and torch, carries the library, profiles each op as the reduction's and loads by itself
    (a device app); int8 reads its token choices off the graph form quantized alike."""
    from vitfold import build as build_module
    from vitfold.build import BuildRequest
    from vitfold.native import ONNXRUNTIME_LIBRARY
    from vitfold.profiles.per_layer import LayerProfileOptions, profile_variant
    from vitfold.profiles.report import LatencyOptions
    from vitfold.runtimes import BuildConfig, load
    from vitfold.spec import ModelSpec, Preprocess

    monkeypatch.setenv("VITFOLD_CACHE", str(ort_library.parent.parent.parent))  # the compiled one
    pre = Preprocess(img_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    monkeypatch.setattr(build_module, "create_model", lambda spec: (tiny_vit(num_classes=10), pre))
    cfg = BuildConfig("onnxruntime", precision, extra={"fused_ops": True})
    request = BuildRequest(ModelSpec("tiny_vit"), "tome", {"r": 2}, cfg, out=tmp_path / "b",
                           latency=LatencyOptions(warmup=1, min_runs=3, min_seconds=0.0),
                           tolerance={"min_cosine": 0.5, "min_top1": 0.0} if precision == "int8" else None)
    directory, report = build_module.build(request, log=lambda message: None)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["files"]["extension"] == ONNXRUNTIME_LIBRARY and (directory / ONNXRUNTIME_LIBRARY).is_file()
    assert "extension" not in json.loads((directory / "dense" / "manifest.json").read_text())["files"]
    fused = [p for p in manifest["passes"] if p["name"] == "fuse-sites"]
    assert len(fused) == 1 and fused[0]["max_abs_change"] <= 1e-5 and fused[0]["nodes_after"] < fused[0]["nodes_before"]
    built = onnx.load(str(directory / manifest["files"]["fused"]))
    op = TOME_WAVG_OP  # the Q/DQ graph leaves the size weighting float too: it moves into the op
    assert sum(n.op_type == op for n in built.graph.node) == 4 and not any(n.op_type == TOME_OP for n in built.graph.node)
    if precision == "f32":
        assert report["parity_vs_torch"]["reduced"]["max_abs"] <= 1e-4
    else:  # the fused graph is the Q/DQ graph with its float sites fused
        assert any(n.op_type == "QuantizeLinear" for n in built.graph.node)
        choices = manifest["quantization"]["choices"]
        assert choices["sites"] == 4 and "the Q/DQ graph; the fused build's choices" in choices["runner"]
    sample = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    rows, _ = profile_variant(directory, sample, LayerProfileOptions(warmup=1, runs=2))
    ops = [r for r in rows if r.type == op]
    assert len(ops) == 4 and {r.category for r in ops} == {"reduction"}
    with load(directory) as session:  # the manifest names the library; load registers it
        x = np.random.default_rng(0).standard_normal(session.input_shape).astype(np.float32)
        assert session(x)["logits"].shape == (1, 10)


def test_onnxruntime_library_without_the_header_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    """The pip wheel ships no C API header: pointing ONNXRUNTIME_ROOT at a folder without it stops the
    compile with the fix, and neither the cache nor the build folder keeps anything."""
    if not TOOLCHAIN:
        pytest.skip("compiling the ONNX Runtime op library needs cmake and a C++ compiler")
    from vitfold import native

    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("VITFOLD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ONNXRUNTIME_ROOT", str(tmp_path / "empty"))
    with pytest.raises(NativeUnavailable, match="onnxruntime_c_api.h not found .*ONNXRUNTIME_ROOT"):
        native.onnxruntime_ops()
    assert not any((tmp_path / "cache").rglob("*.so"))
    with pytest.raises(NativeUnavailable, match="not built .* python -m vitfold.native onnxruntime"):
        native.onnxruntime_ops(build=False)
    result = deploy("build", "--backend", "onnxruntime", "--fused-ops", "--out", str(tmp_path / "x"))  # the same environment
    assert result.returncode == 2 and "onnxruntime_c_api.h not found" in result.stderr, result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method, params, precision", [("tome", {"r": 13}, "f32"), ("evit", {"keep_rate": 0.7}, "f32"),
                                                       ("tome", {"r": 13}, "int8")])
def test_fused_onnxruntime_build_matches_the_graph_form_and_torch_on_real_weights(tmp_path, ort_library, monkeypatch,
                                                                                  dinov2_path, method, params, precision):
    """DINOv2 weights on the shipped photos (batch 2, so that the images run on separate threads): the ONNX
    Runtime fused build's own check against the graph form (within 1e-5 of the outputs' scale, the same token
    choices; int8: the Q/DQ graph fused after quantization, exactly) and, at f32, against torch."""
    from vitfold.compile import compile_onnx
    from vitfold.export.models import create_model
    from vitfold.images import list_images, load_images
    from vitfold.quantize import load_calibration
    from vitfold.runtimes import BuildConfig
    from vitfold.spec import ModelSpec

    monkeypatch.setenv("VITFOLD_CACHE", str(ort_library.parent.parent.parent))
    model, pre = create_model(ModelSpec("vit_small_patch14_dinov2", checkpoint=str(dinov2_path), img_size=224))
    method = create_method(method, **params)
    schedule = method.schedule(TokenLayout.of(model))
    reduced = method.apply(model, schedule)
    path = tmp_path / "model.onnx"
    export_onnx(reduced, path, (2, 3, 224, 224), metadata={"schedule": schedule.to_json()})
    sample = load_images(list_images(), pre)[:2]
    cfg = BuildConfig("onnxruntime", precision, extra={"fused_ops": True})
    calibration = load_calibration(None, pre, 2, warn=lambda message: None) if precision == "int8" else None
    compiled = compile_onnx(path, tmp_path, cfg, sample, calibration=calibration)
    check = [p for p in compiled.passes if p.name == "fuse-sites"]
    assert len(check) == 1 and check[0].max_abs_change <= (1e-5 if precision == "f32" else 0.0)
    if method == "tome":  # ToMe's size weighting inside the op, at int8 too (ONNX Runtime leaves it float)
        fused = onnx.load(str(tmp_path / compiled.files["fused"]))
        assert {n.op_type for n in fused.graph.node if n.domain == DOMAIN} == {TOME_WAVG_OP}
    if precision == "int8":
        return
    with compiled.open(cfg) as session, torch.no_grad():
        got = next(iter(session(sample).values()))
        np.testing.assert_allclose(got, reduced(torch.from_numpy(sample)).numpy(), atol=1e-3)
