"""EViT and Top-K: the reference's schedule arithmetic, dense at keep rate 1.0, the same function as a
plain transcription of the reference, exact export, and dense reconstruction for ``--task features``."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pytest
import torch

from conftest import FLAVOURS, plain_attention, tiny_vit
from vitfold.errors import ScheduleError, SpecError
from vitfold.export.onnx import export_and_validate
from vitfold.reduce import TokenLayout, create_method
from vitfold.reduce.features import DenseFeatures, for_features

LOCS = (1, 2)  # the tiny model has 4 blocks
DEIT_S = TokenLayout(depth=12, num_tokens=197, num_prefix_tokens=1)


def patched(model, name="evit", **params):
    method = create_method(name, **params)
    return method.apply(model, method.schedule(TokenLayout.of(model)))


def test_schedule_matches_the_reference_arithmetic_on_deit_s():
    """197 tokens, keep 0.7 at blocks 3, 6, 9: ceil(0.7 * (N - 1)) kept + class + fused token, where
    N counts the token fused at the previous location (reference ``Attention.forward``)."""
    layout = TokenLayout(depth=12, num_tokens=197, num_prefix_tokens=1)
    tokens = create_method("evit", keep_rate=0.7).schedule(layout).tokens
    k3 = math.ceil(0.7 * 196)
    k6 = math.ceil(0.7 * (k3 + 1))
    k9 = math.ceil(0.7 * (k6 + 1))
    assert tokens == (197,) * 4 + (k3 + 2,) * 3 + (k6 + 2,) * 3 + (k9 + 2,) * 3
    assert (k3, k6, k9) == (138, 98, 70)
    # Top-K drops without fusing: no extra token
    tokens = create_method("topk", keep_rate=0.7).schedule(layout).tokens
    assert tokens[4] == 1 + 138 and tokens[7] == 1 + math.ceil(0.7 * 138)


@pytest.mark.parametrize("bad, match", [
    (dict(keep_rate=0.0), "must be in"),
    (dict(keep_rate=1.5), "must be in"),
    (dict(keep_rate=0.7, locations=(3, 12)), "outside the model"),
    (dict(keep_rate=[0.7, 0.5], locations=(3, 6, 9)), "one per location"),
])
def test_bad_schedules_name_the_problem(bad, match):
    layout = TokenLayout(depth=12, num_tokens=197, num_prefix_tokens=1)
    with pytest.raises(ScheduleError, match=match):
        create_method("evit", **bad).schedule(layout)


def test_no_class_token_is_refused():
    layout = TokenLayout.of(tiny_vit(**FLAVOURS["no_class_token"]))
    with pytest.raises(ScheduleError, match="no class token"):
        create_method("topk", keep_rate=0.5, locations=LOCS).schedule(layout)


def test_unknown_parameter_is_refused():
    with pytest.raises(SpecError, match="takes no parameter r"):
        create_method("evit", r=8)


@pytest.mark.parametrize("name", ["evit", "topk"])
@pytest.mark.parametrize("flavour", ["plain", "layer_scale", "qk_norm", "registers"])
def test_keep_rate_one_is_dense_bit_for_bit(name, flavour):
    model = tiny_vit(**FLAVOURS[flavour])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(patched(model, name, keep_rate=1.0, locations=LOCS)(x), model(x))


def _plain_step(block, x, rate: float):
    """A block's attention, written out, and at a reduction block the reference's kept and pruned
    lists: ``(x, class attention [N - 1], keep, rest)``, the last three None elsewhere."""
    n = x.shape[1]
    x, a = plain_attention(block, x)
    left = math.ceil(rate * (n - 1))
    if not (rate < 1 and left < n - 1):
        return x, None, None, None
    cls = a[0, :, 0, 1:].mean(dim=0)
    keep = sorted(range(n - 1), key=lambda i: -float(cls[i]))[:left]
    return x, cls, keep, [i for i in range(n - 1) if i not in keep]


def reference_evit(model, images, rates: dict[int, float], fuse: bool, fill: str = "source", k: int = 4, tau: float = 0.1,
                   restore_at: Optional[int] = None):
    """The reference algorithm written out plainly: explicit attention matrix, one image at a time,
    Python lists for the kept / complement sets (youweiliang/evit ``evit.py``, class token only).
    ``fill="reconstruct"``: the restored features of ``EViT(fill="reconstruct")`` written out with
    dictionaries: each current token holds ``{original: weight}``, a pruned token's holdings move to
    its ``k`` most cosine-similar kept tokens with softmax(similarity / ``tau``) weights, and what
    that weighted mix misses of it is added back to its originals before the final norm.
    ``restore_at``: at that block, after attention, every original gets those restored features (before
    the final norm), and the block's MLP and the later blocks run on all of them.

    Returns ``(logits [B, K], restored [B, N0, C] per-original features, via member lists)``.
    """
    if fill == "reconstruct":
        return _reference_reconstruct(model, images, rates, fuse, k, tau, restore_at)
    logits, restored = [], []
    for image in images:
        x = model.norm_pre(model._pos_embed(model.patch_embed(image[None])))
        n0 = x.shape[1]
        members = [[i] for i in range(n0)]
        frozen = {}
        for index, block in enumerate(model.blocks):
            if restore_at is not None and index >= restore_at:
                if index == restore_at:
                    x, _ = plain_attention(block, x)
                    grid = [None] * n0
                    for token, group in enumerate(members):
                        for m in group:
                            grid[m] = x[0, token]
                    for m, feature in frozen.items():
                        grid[m] = feature
                    x, members, frozen = torch.stack(grid)[None], [[m] for m in range(n0)], {}
                    x = x + block.ls2(block.mlp(block.norm2(x)))
                else:
                    x = block(x)
                continue
            x, cls, keep, rest = _plain_step(block, x, rates.get(index, 1.0))
            if keep is not None:
                rows = [x[0, 0]] + [x[0, 1 + i] for i in keep]
                new_members = [members[0]] + [members[1 + i] for i in keep]
                if fuse:
                    rows.append(sum(cls[i] * x[0, 1 + i] for i in rest))
                    new_members.append([m for i in rest for m in members[1 + i]])
                else:
                    for i in rest:
                        for m in members[1 + i]:
                            frozen[m] = x[0, 1 + i]
                x, members = torch.stack(rows)[None], new_members
            x = x + block.ls2(block.mlp(block.norm2(x)))
        x = model.norm(x)
        logits.append(model.forward_head(x)[0])
        per_original = [None] * (model.patch_embed.num_patches + 1)
        for token, group in enumerate(members):
            for m in group:
                per_original[m] = x[0, token]
        for m, feature in frozen.items():
            per_original[m] = model.norm(feature)
        restored.append(torch.stack(per_original))
    return torch.stack(logits), torch.stack(restored)


def _reference_reconstruct(model, images, rates, fuse, k, tau, restore_at=None):
    logits, restored = [], []
    for image in images:
        x = model.norm_pre(model._pos_embed(model.patch_embed(image[None])))
        n0 = x.shape[1]
        holds = [{i: 1.0} for i in range(n0)]
        residual = {}
        for index, block in enumerate(model.blocks):
            if restore_at is not None and index >= restore_at:
                if index == restore_at:
                    x, _ = plain_attention(block, x)
                    x, holds, residual = _mix(x, holds, residual, n0)[None], [{m: 1.0} for m in range(n0)], {}
                    x = x + block.ls2(block.mlp(block.norm2(x)))
                else:
                    x = block(x)
                continue
            x, cls, keep, rest = _plain_step(block, x, rates.get(index, 1.0))
            if keep is not None:
                new_holds = [dict(holds[0])] + [dict(holds[1 + j]) for j in keep]
                for i in rest:
                    sims = [float(torch.nn.functional.cosine_similarity(x[0, 1 + i], x[0, 1 + j], dim=0)) for j in keep]
                    near = sorted(range(len(keep)), key=lambda t: -sims[t])[:k]
                    w = torch.tensor([sims[t] for t in near], dtype=torch.float64).div(tau).softmax(0)
                    mix = sum(float(w[q]) * x[0, 1 + keep[t]] for q, t in enumerate(near))
                    for m, amount in holds[1 + i].items():
                        residual[m] = residual.get(m, 0) + amount * (x[0, 1 + i] - mix)
                        for q, t in enumerate(near):
                            target = new_holds[1 + t]
                            target[m] = target.get(m, 0.0) + amount * float(w[q])
                rows = [x[0, 0]] + [x[0, 1 + j] for j in keep]
                if fuse:
                    rows.append(sum(cls[i] * x[0, 1 + i] for i in rest))
                    new_holds.append({})
                x, holds = torch.stack(rows)[None], new_holds
            x = x + block.ls2(block.mlp(block.norm2(x)))
        logits.append(model.forward_head(model.norm(x))[0])
        restored.append(model.norm(_mix(x, holds, residual, n0)))
    return torch.stack(logits), torch.stack(restored)


def _mix(x, holds, residual, n0):
    """``[N0, C]``: each original's share of the tokens ``x`` ``[1, N, C]`` that hold it, plus its residual."""
    per_original = [residual.get(m, torch.zeros_like(x[0, 0])).clone() for m in range(n0)]
    for token, held in enumerate(holds):
        for m, amount in held.items():
            per_original[m] = per_original[m] + amount * x[0, token]
    return torch.stack(per_original)


@pytest.mark.parametrize("fill", ["source", "reconstruct"])
@pytest.mark.parametrize("name, fuse", [("evit", True), ("topk", False), ("evit", False)])
@pytest.mark.parametrize("flavour", ["plain", "layer_scale"])
def test_matches_plain_reference(name, fuse, flavour, fill):
    model = tiny_vit(**FLAVOURS[flavour])
    images = torch.randn(3, 3, 32, 32)
    rates = {1: 0.5, 2: 0.7}
    params = dict(keep_rate=[0.5, 0.7], locations=LOCS, fuse=fuse, fill=fill)
    reduced = patched(model, name, **params, trace_source=True)
    with torch.no_grad():
        expected_logits, expected_tokens = reference_evit(model, images, rates, fuse, fill)
        torch.testing.assert_close(reduced(images), expected_logits, atol=1e-5, rtol=1e-5)
        features = DenseFeatures(reduced)(images)
        torch.testing.assert_close(features, expected_tokens[:, 1:], atol=1e-5, rtol=1e-5)
        # and the dense model's features are simply its patch tokens
        assert torch.equal(DenseFeatures(model)(images), model.forward_features(images)[:, 1:])


def test_registers_are_never_pruned():
    """Prefix tokens (class + 4 registers) pass a reduction step in place: with the block's
    attention projection and MLP zeroed, they come out unchanged and first."""
    model = tiny_vit(**FLAVOURS["registers"])
    reduced = patched(model, "topk", keep_rate=0.5, locations=(1,))
    block, prefix = reduced.blocks[1], model.num_prefix_tokens
    with torch.no_grad():
        for p in list(block.mlp.parameters()) + list(block.attn.proj.parameters()):
            p.zero_()
        x = torch.randn(2, prefix + 16, 64)
        out = block.forward_prune(x, 8, reduced.blocks, _state())
    assert out.shape == (2, prefix + 8, 64)
    assert torch.equal(out[:, :prefix], x[:, :prefix])
    # the kept patch tokens are 8 distinct input patch tokens
    for b in range(2):
        matches = [(x[b, prefix:] == row).all(dim=-1).nonzero().flatten().tolist() for row in out[b, prefix:]]
        assert all(len(m) == 1 for m in matches) and len({m[0] for m in matches}) == 8


def _state():
    from vitfold.reduce.evit import PruneState

    return PruneState()


@pytest.mark.parametrize("name, params", [
    ("evit", dict(keep_rate=0.5, locations=LOCS)),
    ("topk", dict(keep_rate=0.5, locations=LOCS)),
    ("tome", dict(r=2, mode="prune")),
])
def test_exports_static_and_exact(tmp_path, name, params):
    from vitfold.images import batches, list_images, load_images
    from vitfold.spec import Preprocess

    pre = Preprocess(img_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    photos = batches(load_images(list_images(), pre), 2)
    model = tiny_vit()
    method = create_method(name, **params)
    schedule = method.schedule(TokenLayout.of(model))
    result, _ = export_and_validate(method.apply(model, schedule), tmp_path / "m.onnx", photos)
    assert result.parity.max_abs <= 1e-4 and result.parity.top1_agreement == 1.0
    assert not {"If", "Loop", "NonZero"} & set(result.op_counts)
    if name != "tome":
        assert result.op_counts.get("TopK", 0) == 2  # one per reduction location, constant K (contract)


def test_features_export_restores_the_full_grid(tmp_path):
    from vitfold.images import batches, list_images, load_images
    from vitfold.spec import Preprocess

    pre = Preprocess(img_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    photos = batches(load_images(list_images(), pre), 2)
    model = tiny_vit()
    for name, params in (("evit", dict(keep_rate=0.5, locations=LOCS)), ("tome", dict(r=2))):
        cls = type(create_method(name, **params))
        method = create_method(name, **params, **for_features(cls))
        reduced = DenseFeatures(method.apply(model, method.schedule(TokenLayout.of(model))))
        result, reference = export_and_validate(reduced, tmp_path / f"{name}.onnx", photos)
        assert reference.shape[1:] == (16, 64)  # [B, H/p * W/p, C]: the full 4x4 grid
        assert result.parity.max_abs <= 1e-4 and result.parity.token_cosine_min > 0.9999


def test_tome_prune_drops_matched_tokens_without_averaging():
    """Prune mode: every output token equals an input token of the reduction step (nothing averaged)."""
    from vitfold.reduce.matching import bipartite_soft_matching

    torch.manual_seed(0)
    x = torch.randn(2, 11, 8)
    merge, _ = bipartite_soft_matching(x, 4, num_protected=1)
    kept = merge(x, mode="drop")
    assert kept.shape == (2, 7, 8)
    for b in range(2):
        for row in kept[b]:
            assert (x[b] == row).all(dim=-1).any()
    averaged = merge(x, mode="sum")
    assert not torch.equal(averaged, kept)


def test_tome_restore_is_an_exact_unmerge():
    model = tiny_vit()
    reduced = patched(model, "tome", r=3, trace_source=True)
    with torch.no_grad():
        tokens = reduced.forward_features(torch.randn(2, 3, 32, 32))
        source = reduced.blocks.last_state.source  # [B, N_L, N0]
        assert torch.equal(source.sum(dim=1), torch.ones(2, 17))  # each original in exactly one token
        restored = reduced.blocks.restore(tokens)
        owner = source.argmax(dim=1)  # [B, N0]
        assert torch.equal(restored, torch.stack([tokens[b, owner[b]] for b in range(2)]))
        assert np.unique(restored[0].numpy(), axis=0).shape[0] == tokens.shape[1]


@pytest.mark.parametrize("name", ["evit", "topk"])
@pytest.mark.parametrize("fill", ["reconstruct", "source"])
def test_features_at_keep_rate_one_are_dense_bit_for_bit(name, fill):
    """--task features: nothing pruned, nothing rebuilt; the patch grid is the dense model's exactly."""
    model = tiny_vit(**FLAVOURS["layer_scale"])
    x = torch.randn(2, 3, 32, 32)
    for restore_at in (None, 2):
        reduced = patched(model, name, keep_rate=1.0, locations=LOCS, trace_source=True, fill=fill, restore_at=restore_at)
        with torch.no_grad():
            assert torch.equal(DenseFeatures(reduced)(x), DenseFeatures(model)(x))


def test_unknown_fill_is_refused():
    with pytest.raises(SpecError, match="fill 'nearest' unknown; choose one of reconstruct, source"):
        create_method("evit", fill="nearest")


@pytest.mark.parametrize("fill", ["reconstruct", "source"])
@pytest.mark.parametrize("name, fuse", [("evit", True), ("topk", False)])
def test_restore_at_matches_plain_reference(name, fuse, fill):
    """restore_at=2: block 1 prunes, block 2's site rebuilds the full grid (its own keep rate is not
    run), block 2's MLP and block 3 run on every token, exactly as the written-out reference."""
    model = tiny_vit(**FLAVOURS["layer_scale"])
    images = torch.randn(3, 3, 32, 32)
    reduced = patched(model, name, keep_rate=[0.5, 0.7], locations=LOCS, fuse=fuse, fill=fill, trace_source=True,
                      restore_at=2)
    with torch.no_grad():
        expected_logits, expected_tokens = reference_evit(model, images, {1: 0.5}, fuse, fill, restore_at=2)
        features = DenseFeatures(reduced)(images)
        torch.testing.assert_close(features, expected_tokens[:, 1:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reduced(images), expected_logits, atol=1e-5, rtol=1e-5)
        # and it is not the grid rebuilt after the last block
        late = DenseFeatures(patched(model, name, keep_rate=0.5, locations=(1,), fuse=fuse, fill=fill, trace_source=True))(images)
        assert (features - late).abs().max() > 1e-3


def test_restore_at_schedule_counts_notes_and_json():
    from vitfold.reduce.schedule import Schedule

    method = create_method("evit", keep_rate=0.7, trace_source=True, restore_at=9)
    schedule = method.schedule(DEIT_S)
    assert schedule.tokens == (197,) * 4 + (140,) * 3 + (100,) * 3 + (197,) * 3  # keep 138 / 98 + class + fused
    assert schedule.restored_at == 9 and schedule.removed[9] == 100 - 197
    assert any("rebuilt at block 9's reduction site" in note for note in schedule.notes)
    assert any("locations [9] are at or after restore_at=9 and do not prune" in note for note in schedule.notes)
    assert Schedule.from_json(schedule.to_json()) == schedule
    # keep 1.0 everywhere: nothing to rebuild, the dense schedule (bit for bit, below)
    kept = create_method("evit", keep_rate=1.0, trace_source=True, restore_at=9).schedule(DEIT_S)
    assert kept.restored_at is None and kept.is_dense


@pytest.mark.parametrize("params, match", [
    (dict(restore_at=9), "only --task features uses; build with --task features or drop restore_at"),
    (dict(restore_at=12, trace_source=True), "restore_at=12 is outside the model's blocks 0..11"),
    # pruning only at or after it: the build would silently be the dense model
    (dict(restore_at=2, trace_source=True), "restore_at=2: nothing is pruned before block 2 .* first location that prunes is 3"),
])
def test_restore_at_bad_input_names_the_problem(params, match):
    with pytest.raises(ScheduleError, match=match):
        create_method("evit", **params).schedule(DEIT_S)


@pytest.mark.parametrize("value", ["9", 9.5, True])
def test_restore_at_must_be_a_block_index(value):
    with pytest.raises(SpecError, match="restore_at must be a block index"):
        create_method("evit", trace_source=True, restore_at=value)


def test_restore_at_is_refused_by_the_planner():
    with pytest.raises(SpecError, match="--schedule auto does not place restore_at"):
        create_method("topk", trace_source=True, restore_at=9).plan(DEIT_S, 0.5)


def test_restore_at_features_export_static_and_exact(tmp_path):
    from vitfold.images import batches, list_images, load_images
    from vitfold.spec import Preprocess

    pre = Preprocess(img_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    photos = batches(load_images(list_images(), pre), 2)
    model = tiny_vit()
    method = create_method("topk", keep_rate=0.5, locations=LOCS, trace_source=True, restore_at=2)
    reduced = DenseFeatures(method.apply(model, method.schedule(TokenLayout.of(model))))
    result, reference = export_and_validate(reduced, tmp_path / "topk.onnx", photos)
    assert reference.shape[1:] == (16, 64)
    assert result.parity.max_abs <= 1e-4 and result.parity.token_cosine_min > 0.9999
