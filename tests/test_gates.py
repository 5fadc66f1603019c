"""evit-mass (top-p EViT): the rule against a plain transcription, dense at p = 1, bounded == dynamic
when counts fit, mixed counts in one batch, the raw dynamic export on ONNX Runtime and OpenVINO, the
bounded export under the static contract, fold-gates, calibration arithmetic and bad input."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch

from conftest import FLAVOURS, plain_attention, tiny_vit
from vitfold.capacity import calibrate_capacity, check_capacity, exceeding, fit_capacity, kept_counts, nearest_rank
from vitfold.errors import ExportError, PassError, ScheduleError, SpecError
from vitfold.export.onnx import check_contract, export_and_validate, export_onnx
from vitfold.images import list_images, load_images
from vitfold.reduce import TokenLayout, create_method
from vitfold.reduce.evit_mass import top_p
from vitfold.spec import Preprocess

LOCS = (1, 2)  # the tiny model has 4 blocks
MASS = 0.7


def peaky_vit(**overrides):
    """tiny_vit with sharper attention (q/k/v weights x4), so that kept counts differ between photos."""
    model = tiny_vit(**overrides)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    pre = Preprocess(img_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return load_images(list_images(), pre)  # [7, 3, 32, 32]


@pytest.fixture(scope="module")
def raw(tmp_path_factory, photos):
    """The peaky model's dynamic form and its raw batch-1 export (shared: a dynamic export takes seconds)."""
    dynamic = method().apply_dynamic(peaky_vit())
    path = tmp_path_factory.mktemp("raw") / "dynamic.onnx"
    export_onnx(dynamic, path, (1, 3, 32, 32), dynamic=True)
    return path, dynamic


def method(**params):
    return create_method("evit-mass", **{"keep_mass": MASS, "locations": LOCS, **params})


def bounded(model, m):
    return m.apply(model, m.schedule(TokenLayout.of(model)))


def run(model, images) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(images)))


def plain_top_p(scores: list[float], p: float) -> int:
    """Fewest tokens (largest scores first) whose share of the total reaches ``p``."""
    ordered, total, running = sorted(scores, reverse=True), sum(scores), 0.0
    for count, s in enumerate(ordered, start=1):
        running += s
        if running >= p * total:
            return count
    return len(scores)


def test_top_p_rule_matches_a_plain_count():
    torch.manual_seed(1)
    for _ in range(50):
        scores = torch.rand(1, 20) ** 4  # skewed, distinct
        for p in (0.3, 0.5, 0.8, 0.95):
            order, weight, keep = top_p(scores, p)
            k = int(keep.sum())
            assert k == plain_top_p(scores[0].tolist(), p)
            assert keep[0, :k].all() and not keep[0, k:].any()  # a prefix of the descending order
            assert torch.equal(weight, scores[0, order[0]][None])


def reference_mass(model, images, masses: dict[int, float]):
    """The rule written out plainly, one image at a time with Python lists (class token only):
    explicit attention matrix, top-p count from :func:`plain_top_p`, EViT fusion. Returns
    ``(logits [B, K], counts [B, G])``."""
    logits, counts = [], []
    for image in images:
        x = model.norm_pre(model._pos_embed(model.patch_embed(image[None])))
        kept_here = []
        for index, block in enumerate(model.blocks):
            n = x.shape[1]
            x, a = plain_attention(block, x)
            if index in masses:
                cls = a[0, :, 0, 1:].mean(dim=0)
                left = plain_top_p(cls.tolist(), masses[index])
                keep = sorted(range(n - 1), key=lambda i: -float(cls[i]))[:left]
                rest = [i for i in range(n - 1) if i not in keep]
                rows = [x[0, 0]] + [x[0, 1 + i] for i in keep]
                if rest:
                    rows.append(sum(cls[i] * x[0, 1 + i] for i in rest))
                x = torch.stack(rows)[None]
                kept_here.append(left)
            x = x + block.ls2(block.mlp(block.norm2(x)))
        logits.append(model.forward_head(model.norm(x))[0])
        counts.append(kept_here)
    return torch.stack(logits), counts


@pytest.mark.parametrize("flavour", ["plain", "layer_scale"])
def test_dynamic_model_matches_plain_reference(photos, flavour):
    model = peaky_vit(**FLAVOURS[flavour])
    dynamic = method().apply_dynamic(model)
    with torch.no_grad():
        expected, expected_counts = reference_mass(model, torch.from_numpy(photos), {1: MASS, 2: MASS})
    out = run(dynamic, photos)
    counts = dynamic.blocks.last_state.counts(len(photos)).tolist()
    assert counts == expected_counts
    assert len({tuple(c) for c in counts}) > 1, "the photos should keep different counts"
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flavour", ["plain", "layer_scale", "registers"])
def test_keep_mass_one_is_dense_bit_for_bit(flavour):
    model = tiny_vit(**FLAVOURS[flavour])
    x = torch.randn(3, 3, 32, 32)
    m = method(keep_mass=1.0)
    with torch.no_grad():
        dense = model(x)
        assert torch.equal(m.apply_dynamic(model)(x), dense)
        assert torch.equal(bounded(model, m)(x), dense)


def test_bounded_equals_dynamic_when_counts_fit(photos):
    model = peaky_vit()
    m = method()
    counts = kept_counts(m.apply_dynamic(model), photos)
    fitted, calibration = calibrate_capacity(m, model, photos)  # max seen: every photo fits
    assert list(calibration.capacity) == counts.max(axis=0).tolist()
    assert list(calibration.capacity) < [16 - 1, counts.max(axis=0)[0] + 1]  # a real bound: fewer slots than the gate ranks
    torch.testing.assert_close(run(bounded(model, fitted), photos), run(m.apply_dynamic(model), photos), atol=1e-5, rtol=0)


def test_batch_with_different_counts_per_image(photos):
    """One static batch (bounded) and the per-image dynamic loop give each image what it gets alone."""
    model = peaky_vit()
    m = method()
    fitted, _ = calibrate_capacity(m, model, photos)
    dynamic, static = m.apply_dynamic(model), bounded(model, fitted)
    batch_dynamic, batch_static = run(dynamic, photos), run(static, photos)
    assert len({tuple(c) for c in static.blocks.last_state.counts(len(photos)).tolist()}) > 1
    for i in range(len(photos)):
        torch.testing.assert_close(batch_static[i:i + 1], run(static, photos[i:i + 1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(batch_dynamic[i:i + 1], run(dynamic, photos[i:i + 1]), atol=1e-6, rtol=0)


def test_image_over_capacity_is_counted(photos):
    model = peaky_vit()
    m = method()
    counts = kept_counts(m.apply_dynamic(model), photos)
    tight = m.with_capacity([int(np.median(counts[:, 0])), int(np.median(counts[:, 1]))])
    report = check_capacity(tight, model, photos, [f"p{i}" for i in range(len(photos))])
    over = exceeding(counts, tight.capacity)
    assert 0 < report["exceeded"] == int(over.sum()) < len(photos)
    assert report["exceeded_images"] == [f"p{i}" for i in np.flatnonzero(over)]
    assert report["max_abs_fitting"] <= 1e-5
    diff = (run(tight.apply_dynamic(model), photos) - run(bounded(model, tight), photos)).abs().amax(dim=1)
    assert (diff[torch.from_numpy(over)] > 1e-4).all()  # beyond capacity the bounded model differs, by design


def test_raw_dynamic_export_runs_on_onnxruntime_and_openvino(raw, photos):
    from vitfold.export.onnx import torch_outputs, validate_onnx

    ov = pytest.importorskip("openvino")
    path, dynamic = raw
    batches = [photos[i:i + 1] for i in range(len(photos))]
    reference = torch_outputs(dynamic, batches)
    assert len({tuple(c) for c in kept_counts(dynamic, photos).tolist()}) > 1  # the photos take different paths
    parity = validate_onnx(path, reference, batches, "evit-mass dynamic")
    assert parity.max_abs <= 1e-4 and parity.top1_agreement == 1.0
    assert check_contract(path, dynamic=True)["NonZero"] == 2
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    assert any(d.dim_param for v in graph.value_info for d in v.type.tensor_type.shape.dim)  # dynamic token dims
    with pytest.raises(ExportError, match="NonZero"):
        check_contract(path)  # the default contract refuses it
    compiled = ov.Core().compile_model(ov.convert_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    outputs = np.concatenate([compiled({0: b})[0] for b in batches])
    assert np.abs(outputs - reference).max() <= 1e-3
    assert (outputs.argmax(1) == reference.argmax(1)).all()


def test_bounded_export_meets_the_static_contract(tmp_path, photos):
    model = peaky_vit()
    fitted, _ = calibrate_capacity(method(), model, photos)
    reduced = bounded(model, fitted)
    result, _ = export_and_validate(reduced, tmp_path / "bounded.onnx", [photos[:4], photos[3:]])
    assert result.parity.max_abs <= 1e-4
    assert "NonZero" not in result.op_counts and result.op_counts["TopK"] == 2
    check_contract(tmp_path / "bounded.onnx")


def test_fold_gates_pass_gives_the_bounded_form(tmp_path, photos, raw):
    """The graph rewrite of the raw export equals the re-traced bounded model on every photo (those
    over capacity included: same overflow rule) and the dynamic model on the photos that fit."""
    from vitfold.passes.pipeline import run_pipeline
    from vitfold.runtimes.ort import run_onnx

    raw, dynamic = raw
    model, m = peaky_vit(), method()
    counts = kept_counts(dynamic, photos)
    fits = ~exceeding(counts, counts.max(axis=0) - 1)  # one less than the max: some photos exceed
    capacity = (counts.max(axis=0) - 1).tolist()
    folded = tmp_path / "folded.onnx"
    before = raw.read_bytes()
    fitting = [photos[i:i + 1] for i in np.flatnonzero(fits)]
    (report,) = run_pipeline(raw, folded, [("fold-gates", {"capacity": capacity})], fitting)
    assert raw.read_bytes() == before
    ops = check_contract(folded)  # static shapes, no NonZero, constant K
    assert "NonZero" not in ops and report.max_abs_change <= 1e-4
    out = np.concatenate([o["logits"] for o in run_onnx(folded, [photos[i:i + 1] for i in range(len(photos))])])
    np.testing.assert_allclose(out, run(bounded(model, m.with_capacity(capacity)), photos).numpy(), atol=1e-5, rtol=0)
    assert not fits.all() and fits.any()
    np.testing.assert_allclose(out[fits], run(dynamic, photos[fits]).numpy(), atol=1e-5, rtol=0)
    # the harness refuses the pass when a check image does not fit: outputs would change
    with pytest.raises(PassError, match="changed the outputs"):
        run_pipeline(raw, tmp_path / "refused.onnx", [("fold-gates", {"capacity": capacity})],
                     [photos[i:i + 1] for i in np.flatnonzero(~fits)])


def test_fold_gates_refuses_what_it_cannot_fold(tmp_path, raw):
    from vitfold.passes.pipeline import apply_pass

    static = tmp_path / "static.onnx"
    export_onnx(bounded(peaky_vit(), method()), static, (1, 3, 32, 32))
    with pytest.raises(PassError, match="no NonZero gate"):
        apply_pass(onnx.load(str(static)), "fold-gates", capacity=[8, 8])
    with pytest.raises(PassError, match="2 gates but 1 capacities"):
        apply_pass(onnx.load(str(raw[0])), "fold-gates", capacity=[8])
    with pytest.raises(PassError, match="capacity 17 outside 1..16"):
        apply_pass(onnx.load(str(raw[0])), "fold-gates", capacity=[17, 8])


@pytest.mark.slow
def test_fold_gates_refuses_average_pooling(tmp_path):
    from vitfold.passes.pipeline import apply_pass

    pooled = tmp_path / "avg.onnx"  # average pooling would count invalid slots: refused, not guessed
    export_onnx(method().apply_dynamic(peaky_vit(global_pool="avg")), pooled, (1, 3, 32, 32), dynamic=True)
    with pytest.raises(PassError, match="average pooling"):
        apply_pass(onnx.load(str(pooled)), "fold-gates", capacity=[12, 10])


def test_bounded_form_masks_average_pooling(photos):
    model = peaky_vit(global_pool="avg")
    fitted, _ = calibrate_capacity(method(), model, photos)
    torch.testing.assert_close(run(bounded(model, fitted), photos), run(fitted.apply_dynamic(model), photos),
                               atol=1e-5, rtol=0)


def test_nearest_rank_percentile():
    counts = np.arange(1, 11)[:, None] * np.array([[1, 2]])  # [10, 2]: 1..10 and 2..20
    assert nearest_rank(counts) == [10, 20]  # default: the largest seen
    assert nearest_rank(counts, 90) == [9, 18]
    assert nearest_rank(counts, 95) == [10, 20]  # ceil(9.5) = 10th smallest
    assert nearest_rank(counts, 50) == [5, 10]
    assert nearest_rank(counts, 0.1) == [1, 2]
    assert nearest_rank(np.array([[7, 3]])) == [7, 3]
    assert exceeding(counts, [9, 20]).tolist() == [False] * 9 + [True]


def test_capacity_is_clamped_to_what_a_gate_holds():
    layout = TokenLayout(depth=12, num_tokens=197, num_prefix_tokens=1)
    m = create_method("evit-mass", keep_mass=0.9)
    capacity, notes = fit_capacity(m, layout, [196, 180, 150])
    assert capacity == [195, 180, 150] and len(notes) == 1 and "block 3" in notes[0]
    capacity, notes = fit_capacity(m, layout, [100, 120, 60])  # the next gate ranks 100 + the fused token
    assert capacity == [100, 100, 60] and "block 6" in notes[0]
    tokens = m.with_capacity([100, 80, 60]).schedule(layout).tokens
    assert tokens == (197,) * 4 + (102,) * 3 + (82,) * 3 + (62,) * 3


@pytest.mark.parametrize("params, error, match", [
    (dict(keep_mass=0.0), SpecError, r"keep mass 0.0 must be a number in \(0, 1\]"),
    (dict(keep_mass=1.5), SpecError, "must be a number in"),
    (dict(keep_mass="high"), SpecError, "must be a number in"),
    (dict(keep_mass=0.9, capacity=0), SpecError, "capacity 0 must be an int >= 1"),
    (dict(keep_mass=0.9, capacity=[10, -1]), SpecError, "capacity -1"),
])
def test_bad_parameters_are_refused(params, error, match):
    with pytest.raises(error, match=match):
        create_method("evit-mass", **params)


def test_bad_schedules_name_the_block():
    layout = TokenLayout(depth=12, num_tokens=197, num_prefix_tokens=1)
    with pytest.raises(ScheduleError, match="block 3: capacity 196 does not fit.*1..195"):
        create_method("evit-mass", capacity=196).schedule(layout)
    with pytest.raises(ScheduleError, match="outside the model"):
        create_method("evit-mass", locations=(3, 12)).schedule(layout)
    with pytest.raises(ScheduleError, match="no class token"):
        create_method("evit-mass").schedule(TokenLayout.of(tiny_vit(**FLAVOURS["no_class_token"])))


def test_bad_calibration_input(tmp_path, photos):
    model = peaky_vit()
    with pytest.raises(SpecError, match="holds no images"):
        calibrate_capacity(method(), model, photos[:0], source=str(tmp_path))
    for bad in (0, 100.5, -3):
        with pytest.raises(SpecError, match=r"percentile .* must be in \(0, 100\]"):
            calibrate_capacity(method(), model, photos, percentile=bad)


def test_counts_per_image_are_real_kept_counts(photos):
    """The recorded count is the number of patch tokens after the gate (dynamic model, one image)."""
    model = peaky_vit()
    dynamic = method(locations=(1,)).apply_dynamic(model)
    for i in range(3):
        with torch.no_grad():
            tokens = dynamic.forward_features(torch.from_numpy(photos[i:i + 1]))
        k = int(dynamic.blocks.last_state.kept[0])
        assert tokens.shape[1] == 1 + k + (1 if k < 16 else 0)
        assert math.isclose(k, kept_counts(dynamic, photos[i:i + 1])[0, 0])


def test_cli_bad_gate_input(tmp_path):
    from conftest import deploy

    result = deploy("build", "--method", "evit", "--keep-mass", "1.5", "--out", str(tmp_path / "never"))
    assert result.returncode == 2 and "keep mass 1.5 must be a number in (0, 1]" in " ".join(result.stderr.split())
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("method_name, params, request_args, message", [
    ("evit-mass", {}, {"percentile": 0}, r"percentile 0 must be in \(0, 100\]"),
    ("evit-mass", {}, {"calibrate": "EMPTY"}, "--calibrate: no images"),
    ("evit-mass", {"capacity": 20}, {"calibrate": "EMPTY"}, "give one or the other"),
    ("evit-mass", {}, {"task": "features"}, "no dense reconstruction"),
    ("tome", {"r": 2}, {"calibrate": "EMPTY"}, "--calibrate sets a data-dependent gate"),
])
def test_build_refuses_bad_gate_requests(tmp_path, method_name, params, request_args, message):
    from vitfold.build import BuildRequest, build
    from vitfold.runtimes import BuildConfig
    from vitfold.spec import ModelSpec

    empty = tmp_path / "empty"
    empty.mkdir()
    request_args = {k: (empty if v == "EMPTY" else v) for k, v in request_args.items()}
    with pytest.raises(SpecError, match=message):
        request = BuildRequest(spec=ModelSpec("vit_tiny_patch16_224", img_size=96), method=method_name, params=params,
                               build=BuildConfig(backend="onnxruntime"), out=tmp_path / "never", **request_args)
        build(request, log=lambda msg: None)
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_cli_gate_build_records_capacity_and_exceeded(tmp_path):
    """A whole build: capacity calibrated on 3 photos, written into the manifest and the report, with
    the check photos over it counted; parity of the bounded model with torch holds on all photos."""
    import json
    import shutil

    from conftest import deploy
    from vitfold.images import default_photo_dir

    calibration = tmp_path / "cal"
    calibration.mkdir()
    for name in ("astronaut.jpg", "coffee.jpg", "rocket.jpg"):
        shutil.copy(default_photo_dir() / name, calibration / name)
    out = tmp_path / "build"
    result = deploy("build", "--model", "vit_tiny_patch16_224", "--img-size", "96", "--method", "evit", "--keep-mass", "0.7",
                    "--backend", "onnxruntime", "--calibrate", str(calibration), "--out", str(out), "--min-runs", "3",
                    "--min-seconds", "0")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    gate = manifest["gate"]
    assert manifest["method"]["name"] == "evit-mass" and manifest["method"]["params"]["capacity"] == gate["capacity"]
    assert gate["calibration"]["images"] == 3 and gate["calibration"]["percentile"] == 100.0
    assert report["gate"] == gate and gate["check"]["images"] == 7
    assert gate["check"]["exceeded"] == len(gate["check"]["exceeded_images"])
    assert gate["check"]["max_abs_fitting"] <= 1e-5
    assert manifest["checks"]["backend_vs_torch"]["max_abs"] <= 1e-4  # bounded torch vs ONNX Runtime, every photo
    assert f"check photos over the capacity: {gate['check']['exceeded']} of 7" in (out / "report.md").read_text()
    again = deploy("profile", str(out), "--min-runs", "3", "--min-seconds", "0")  # a re-profile keeps the gate
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "report.json").read_text())["gate"] == gate and "## Gate" in (out / "report.md").read_text()
