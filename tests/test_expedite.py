"""Expedite (token clustering + reconstruction): dense at the full grid, the paper's algorithm, export."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch

from conftest import FLAVOURS, tiny_vit
from vitfold.errors import ScheduleError, SpecError
from vitfold.reduce import TokenLayout, create_method
from vitfold.reduce.expedite import Expedite, ExpediteBlocks, locality_mask, pooling_matrix


def patched(model, **params):
    method = create_method("expedite", **params)
    return method.apply(model, method.schedule(TokenLayout.of(model)))


def plain_cluster(x, H, W, h, w, iters, tau, window):
    """Liang et al. 2022, token clustering layer, on one image: ``x`` (H*W) x C numpy, row-major.

    Centres start as the adaptive average pool of the token map; each round every token spreads a
    softmax of -|x - s|^2 / tau over the centres within window // 2 cells of its initial cell, and
    every centre becomes the weighted mean of its tokens.
    """
    grid = x.reshape(H, W, -1)
    centres = []
    for i in range(h):
        for j in range(w):
            rows = range(math.floor(i * H / h), math.ceil((i + 1) * H / h))
            cols = range(math.floor(j * W / w), math.ceil((j + 1) * W / w))
            centres.append(np.mean([grid[r, c] for r in rows for c in cols], axis=0))
    centres = np.array(centres)
    cell = [((p // W) * h // H, (p % W) * w // W) for p in range(H * W)]  # initial cell of each token
    near = [[s for s in range(h * w) if abs(cell[p][0] - s // w) <= window // 2 and abs(cell[p][1] - s % w) <= window // 2]
            for p in range(H * W)]
    for _ in range(iters):
        weight = np.zeros((h * w, H * W))
        for p in range(H * W):
            logits = {s: -np.sum((x[p] - centres[s]) ** 2) / tau for s in near[p]}
            top = max(logits.values())
            total = sum(math.exp(v - top) for v in logits.values())
            for s, v in logits.items():
                weight[s, p] = math.exp(v - top) / total
        centres = np.array([weight[s] @ x / max(weight[s].sum(), 1e-16) for s in range(h * w)])
    return centres


def plain_reconstruct(z, before, after, k, tau):
    """The token reconstruction layer on one image: token p takes the L2-normalised weights
    exp(-|before_p - after_s|^2 / tau) of its k nearest centres, applied to the refined ``z``."""
    out = []
    for p in range(len(before)):
        weight = np.array([math.exp(-np.sum((before[p] - a) ** 2) / tau) for a in after])
        kth = sorted(weight, reverse=True)[k - 1]
        weight = np.where(weight >= kth, weight, 0.0)
        out.append(weight / np.linalg.norm(weight) @ z)
    return np.array(out)


@pytest.mark.parametrize("patch_grid,grid,window", [((4, 4), (2, 2), 1), ((7, 5), (3, 2), 3), ((6, 6), (4, 4), 5), ((5, 7), (5, 1), 1)])
def test_pooling_and_window_match_the_plain_formulas(patch_grid, grid, window):
    (H, W), (h, w) = patch_grid, grid
    torch.manual_seed(0)
    x = torch.randn(H * W, 3, dtype=torch.float64)
    centres = plain_cluster(x.numpy(), H, W, h, w, iters=0, tau=1.0, window=window)
    assert np.allclose(pooling_matrix(patch_grid, grid).double().numpy() @ x.numpy(), centres, atol=1e-6)
    allowed = locality_mask(patch_grid, grid, window)
    for p in range(H * W):
        r, c = (p // W) * h // H, (p % W) * w // W
        for s in range(h * w):
            assert allowed[s, p].item() == (abs(r - s // w) <= window // 2 and abs(c - s % w) <= window // 2)


def plain_forward(model, images, location, grid, iters, tau, window, k):
    """The reference HourglassVisionTransformer on timm's own layers: (logits, restored tokens)."""
    x = model._pos_embed(model.patch_embed(images))
    P = model.num_prefix_tokens
    H, W = model.patch_embed.grid_size
    saved = []
    for index, block in enumerate(model.blocks):
        x = block(x)
        if index == location:
            rows = []
            for b in range(x.shape[0]):
                before = x[b, P:].numpy()
                after = plain_cluster(before, H, W, *grid, iters, tau, window)
                saved.append((before, after))
                rows.append(torch.cat([x[b, :P], torch.from_numpy(after)]))
            x = torch.stack(rows)
    x = model.norm(x)
    restored = torch.stack([
        torch.cat([x[b, :P], torch.from_numpy(plain_reconstruct(x[b, P:].numpy(), *saved[b], k, tau))])
        for b in range(x.shape[0])
    ])
    return model.forward_head(x), restored


@pytest.mark.parametrize("flavour,params", [
    ("plain", dict(location=1, grid=2, iters=3, temperature=2.0, window=1, k=2)),
    ("registers", dict(location=0, grid=(3, 2), iters=2, temperature=5.0, window=3, k=4)),
    ("no_class_token", dict(location=2, grid=3, iters=4, temperature=1.0, window=5, k=9)),
])
def test_model_matches_plain_implementation(flavour, params):
    model = tiny_vit(**FLAVOURS[flavour]).double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    reduced = patched(model, **params)
    grid = params["grid"] if isinstance(params["grid"], tuple) else (params["grid"],) * 2
    with torch.no_grad():
        logits, restored = plain_forward(model, images, params["location"], grid, params["iters"],
                                         params["temperature"], params["window"], params["k"])
        assert torch.allclose(reduced(images), logits, atol=1e-10)
        ours = reduced.blocks.restore(reduced.forward_features(images))
    assert ours.shape == (2, TokenLayout.of(model).num_tokens, 64)
    assert torch.allclose(ours, restored, atol=1e-10)


def test_reconstruction_does_not_underflow_where_the_reference_would():
    """Far-apart features: exp(-d / tau) is 0 in float32 for every centre; ours keeps the nearest."""
    from vitfold.reduce.expedite import reconstruct

    before = torch.tensor([[[0.0, 0.0], [100.0, 0.0]]])  # two tokens
    after = torch.tensor([[[0.0, 30.0], [100.0, 40.0]]])  # squared distances 900 and 1600 (+ 10100, 11700)
    z = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert torch.exp(-torch.tensor(900.0) / 0.1) == 0  # the reference's weights would all be 0
    assert torch.allclose(reconstruct(z, before, after, k=1, temperature=0.1), z)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_full_grid_reproduces_dense_bit_for_bit(flavour):
    model = tiny_vit(**FLAVOURS[flavour])
    x = torch.randn(3, 3, 32, 32)
    reduced = patched(model, location=1, grid=4)
    assert reduced.blocks.location is None
    with torch.no_grad():
        assert torch.equal(reduced(x), model(x))
        feats = reduced.forward_features(x)
        assert reduced.blocks.restore(feats) is feats


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_schedule_and_restore_on_every_flavour(flavour):
    model = tiny_vit(**FLAVOURS[flavour])
    layout = TokenLayout.of(model)
    P = layout.num_prefix_tokens
    method = create_method("expedite", location=1, grid=2, k=3)
    schedule = method.schedule(layout)
    assert schedule.tokens == (16 + P, 16 + P, 4 + P, 4 + P, 4 + P)  # clustered after block 1's MLP
    reduced = method.apply(model, schedule)
    with torch.no_grad():
        final = reduced.forward_features(torch.randn(2, 3, 32, 32))
        restored = reduced.blocks.restore(final)
    assert final.shape == (2, 4 + P, 64) and restored.shape == (2, 16 + P, 64)
    assert torch.equal(restored[:, :P], final[:, :P])
    assert not torch.allclose(restored[:, P], restored[:, P + 15])  # not one token everywhere


def test_defaults_follow_the_model():
    layout = TokenLayout(depth=12, num_tokens=257, num_prefix_tokens=1)  # DINOv2 ViT-S/14 at 224
    schedule = create_method("expedite").schedule(layout)
    assert schedule.tokens == (257,) * 6 + (101,) * 7  # after block 5, 16x16 -> 10x10 (5/8 per side)
    deit = create_method("expedite").schedule(TokenLayout(depth=12, num_tokens=197, num_prefix_tokens=1))
    assert deit.tokens[-1] == 1 + 9 * 9  # 14x14 -> 9x9


def test_layer_scale_applied_original_untouched_remove_pickle_deepcopy():
    model = tiny_vit(init_values=0.1)
    x = torch.randn(2, 3, 32, 32)
    reduced = patched(model, location=1, grid=2, k=2)
    assert not isinstance(model.blocks, ExpediteBlocks)
    with torch.no_grad():
        expected = reduced(x)
        assert not torch.allclose(expected, model(x))
        for clone in (pickle.loads(pickle.dumps(reduced)), copy.deepcopy(reduced)):
            assert torch.equal(clone(x), expected)
        assert set(reduced.state_dict()) == set(model.state_dict())  # constant buffers are not weights
        Expedite.remove(reduced)
        assert not isinstance(reduced.blocks, ExpediteBlocks) and not list(reduced.blocks.buffers())
        assert torch.equal(reduced(x), model(x))
        reduced = patched(model, location=1, grid=2, k=2)
        reduced.blocks[3].ls2.gamma.zero_()
        assert not torch.allclose(reduced(x), expected)


@pytest.mark.parametrize("params,message", [
    ({"location": 4}, r"location 4 is outside the model's blocks 0..3"),
    ({"location": -1}, r"location -1 is outside"),
    ({"grid": 5}, r"grid 5x5 must be between 1x1 and the patch grid 4x4"),
    ({"grid": (2, 0)}, r"grid 2x0 must be between"),
    ({"grid": (1, 2, 3)}, r"must be one int or two"),
    ({"grid": 2, "iters": -1}, r"iters=-1 must be >= 0"),
    ({"grid": 2, "temperature": 0.0}, r"temperature=0.0 must be a positive number"),
    ({"grid": 2, "window": 4}, r"window=4 must be an odd number"),
    ({"grid": 2, "k": 5}, r"k=5 must be in 1..4 \(the 2x2 clusters\)"),
    ({"grid": 2, "k": 0}, r"k=0 must be in 1..4"),
])
def test_bad_parameters_name_the_fix(params, message):
    with pytest.raises(ScheduleError, match=message):
        create_method("expedite", **params).schedule(TokenLayout.of(tiny_vit()))


def test_unknown_parameter_and_foreign_schedule():
    with pytest.raises(SpecError, match="takes no parameter keep_rate; it takes: grid, iters, k, location, temperature, window"):
        create_method("expedite", keep_rate=0.5)
    model = tiny_vit()
    other = create_method("expedite", location=2, grid=2, k=2).schedule(TokenLayout.of(model))
    with pytest.raises(ScheduleError, match="not expedite's plan"):
        create_method("expedite", location=1, grid=2, k=2).apply(model, other)


@pytest.fixture(scope="module")
def photos32():
    from vitfold.images import batches, list_images, load_images
    from vitfold.spec import Preprocess

    pre = Preprocess(img_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return batches(load_images(list_images(), pre), 2)


@pytest.mark.parametrize("flavour,what", [("registers", "features"), pytest.param("plain", "logits", marks=pytest.mark.slow)])
def test_exports_static_and_exact(tmp_path, photos32, flavour, what):
    """Restored features and logits through ONNX Runtime: static, no If/NonZero/scatter, constant K.

    A random tiny model has squared token distances of 10-100, so temperature 10 (the reference DPT
    setting); at 0.1 two nearly equidistant centres make a token's weights hinge on the last bits of
    the distances (float32 torch vs float64 differ by 1e-4 there, ONNX Runtime by 3e-4), and top-k
    with near-equal k-th weights is a discontinuity: all 6 clusters are used here.
    """
    from vitfold.export.onnx import export_and_validate
    from vitfold.reduce.features import DenseFeatures

    reduced = patched(tiny_vit(**FLAVOURS[flavour]), location=1, grid=(3, 2), k=6, temperature=10.0)
    module = DenseFeatures(reduced).eval() if what == "features" else reduced
    result, _ = export_and_validate(module, tmp_path / f"{what}.onnx", photos32, what=what)
    assert result.parity.max_abs <= 1e-4, what
    assert not {"If", "Loop", "NonZero", "ScatterElements", "ScatterND"} & set(result.op_counts)
    assert result.op_counts["Softmax"] == 4 + 5  # 4 attention blocks + 5 k-means rounds
    assert result.op_counts.get("TopK", 0) == (1 if what == "features" else 0)  # reconstruction only


@pytest.fixture(scope="module")
def dinov2(dinov2_path):
    from vitfold.export.models import create_model
    from vitfold.images import list_images, load_images
    from vitfold.spec import ModelSpec

    model, pre = create_model(ModelSpec("vit_small_patch14_dinov2", checkpoint=str(dinov2_path), img_size=224))
    return model, torch.from_numpy(load_images(list_images(), pre))


@pytest.mark.slow
def test_real_weights_fidelity_and_export(dinov2, tmp_path):
    """DINOv2 ViT-S/14 on the shipped photos: restored per-token cosine vs dense grows with the grid;
    ONNX Runtime adds no more error to the restored features than float32 itself has (vs float64),
    which at the default temperature is above 1e-4 max abs (see the class docstring)."""
    from vitfold.export.onnx import export_onnx, torch_outputs
    from vitfold.images import batches
    from vitfold.metrics import compare
    from vitfold.reduce.features import DenseFeatures
    from vitfold.runtimes.ort import run_onnx

    model, images = dinov2
    with torch.no_grad():
        dense = DenseFeatures(model)(images).numpy()
        cos = {g: compare(dense, DenseFeatures(patched(model, grid=g))(images).numpy()).token_cosine_mean for g in (8, 10)}
    assert cos[10] > cos[8] > 0.88
    wrapper = DenseFeatures(patched(model)).eval()
    checks = batches(images.numpy(), 1)
    export_onnx(wrapper, tmp_path / "f.onnx", checks[0].shape)
    reference = torch_outputs(wrapper, checks)
    onnx_out = np.concatenate([next(iter(out.values())) for out in run_onnx(tmp_path / "f.onnx", checks)])
    with torch.no_grad():
        float64 = copy.deepcopy(wrapper).double()(images.double()).numpy()
    parity = compare(reference, onnx_out)
    assert parity.max_abs <= 3 * np.abs(reference - float64).max() and parity.token_cosine_min > 0.99999
