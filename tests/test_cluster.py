"""DPC-kNN and k-medoids clustering: dense at keep rate 1.0, the papers' algorithms, static export, restore."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import Block

from conftest import FLAVOURS, tiny_vit
from vitfold.errors import ScheduleError, SpecError
from vitfold.reduce import TokenLayout, create_method
from vitfold.reduce.cluster import (ClusterBlocks, DPCKNN, KMedoids, cluster_dpc_knn, cluster_kmedoids,
                                   merge_clusters, one_hot)

METHODS = ("dpc-knn", "kmedoids")


def patched(model, name="dpc-knn", **params):
    method = create_method(name, **params)
    return method.apply(model, method.schedule(TokenLayout.of(model)))


def plain_dpc_knn(x, num_clusters, k):
    """TCFormer's DPC-kNN (Zeng et al. 2022, Sec. 3.2) on one image ``x`` (N x C numpy), with loops.

    Returns (centres in descending score order, cluster of every token, merged tokens).
    """
    n, c = x.shape
    dist = [[math.sqrt(sum((x[i, f] - x[j, f]) ** 2 for f in range(c))) / math.sqrt(c) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(d * d for d in sorted(dist[i])[:k]) / k) for i in range(n)]
    largest = max(max(row) for row in dist)
    score = []
    for i in range(n):
        # "higher density", ties to the lower index (the reference breaks ties with random noise)
        higher = [dist[i][j] for j in range(n) if (density[j], -j) > (density[i], -i)]
        score.append((min(higher) if higher else largest) * density[i])
    centres = sorted(range(n), key=lambda i: -score[i])[:num_clusters]
    assign = []
    for i in range(n):
        if i in centres:
            assign.append(centres.index(i))
        else:
            assign.append(min(range(num_clusters), key=lambda c_: dist[i][centres[c_]]))
    merged = np.zeros((num_clusters, c))
    for c_ in range(num_clusters):
        members = [i for i in range(n) if assign[i] == c_]
        merged[c_] = sum(x[i] for i in members) / (len(members) + 1e-6)
    return centres, assign, merged


@pytest.mark.parametrize("num_tokens,num_clusters,k", [(12, 4, 3), (20, 7, 5), (9, 9, 1), (15, 1, 15)])
def test_clustering_matches_plain_implementation(num_tokens, num_clusters, k):
    torch.manual_seed(num_tokens * 10 + k)
    x = torch.randn(3, num_tokens, 5, dtype=torch.float64)
    x[:, : num_tokens // 3] += 2.0  # some structure: a denser group
    assign, centers = cluster_dpc_knn(x, num_clusters, k)
    merged = merge_clusters(x, one_hot(assign, num_clusters, x.dtype))
    for b in range(3):
        want_centres, want_assign, want_merged = plain_dpc_knn(x[b].numpy(), num_clusters, k)
        assert centers[b].tolist() == want_centres
        assert assign[b].tolist() == want_assign
        assert np.allclose(merged[b].numpy(), want_merged, atol=1e-12)


def test_density_ties_go_to_the_lower_index():
    """Identical tokens have identical densities: the first one is the peak, deterministically."""
    x = torch.zeros(1, 6, 3)
    x[0, 3:] = 5.0  # two groups of three identical tokens
    assign, centers = cluster_dpc_knn(x, 2, 3)
    assert sorted(centers[0].tolist()) == [0, 3]
    assert assign[0].tolist()[:3] == [assign[0, 0].item()] * 3 and len(set(assign[0].tolist())) == 2


def plain_kmedoids(x, weight, num_clusters, iters):
    """The study's attention-weighted ``k_medoids_fit`` on one image, with loops: the most-weighted
    tokens start as medoids; each round assigns tokens to the nearest medoid, then moves each medoid
    to the member with the smallest ``weight_i * sum_j d(i, j)`` (token 0 for an empty cluster).
    Returns (medoids, assignment)."""
    n = len(x)
    dist = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(x[i], x[j]))) for j in range(n)] for i in range(n)]
    medoids = sorted(range(n), key=lambda i: -weight[i])[:num_clusters]

    def nearest():
        return [min(range(num_clusters), key=lambda c: dist[i][medoids[c]]) for i in range(n)]

    for _ in range(iters):
        assign = nearest()
        medoids = [min((i for i in range(n) if assign[i] == c), key=lambda i: weight[i] * sum(dist[i]), default=0)
                   for c in range(num_clusters)]
    return medoids, nearest()


@pytest.mark.parametrize("num_tokens,num_clusters,iters", [(12, 4, 3), (20, 7, 1), (9, 9, 2), (15, 1, 0), (16, 5, 6)])
def test_kmedoids_matches_plain_implementation(num_tokens, num_clusters, iters):
    torch.manual_seed(num_tokens + iters)
    x = torch.randn(3, num_tokens, 5, dtype=torch.float64)
    weight = torch.rand(3, num_tokens, dtype=torch.float64) * 4
    assign, medoids = cluster_kmedoids(x, weight, num_clusters, iters)
    for b in range(3):
        want_medoids, want_assign = plain_kmedoids(x[b].tolist(), weight[b].tolist(), num_clusters, iters)
        assert medoids[b].tolist() == want_medoids and assign[b].tolist() == want_assign


def test_kmedoids_empty_cluster_takes_token_zero():
    """Two identical most-attended tokens start as medoids: every token joins the first (ties go to
    the lower medoid), the second cluster empties and, as the reference's masked argmin, takes token 0."""
    x = torch.tensor([[[5.0], [0.0], [0.0], [0.1]]])
    weight = torch.tensor([[0.5, 9.0, 8.0, 1.0]])
    assign, medoids = cluster_kmedoids(x, weight, 2, iters=1)
    assert medoids[0].tolist() == plain_kmedoids(x[0].tolist(), weight[0].tolist(), 2, 1)[0] == [3, 0]


def plain_received(block, x):
    """Attention probabilities of ``block`` on ``x``, summed over heads and queries (the reference's
    ``torch.sum(torch.sum(attn, dim=1), dim=1)``)."""
    attn = block.attn
    y = block.norm1(x)
    B, N, C = y.shape
    q, k, _ = attn.qkv(y).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    received = torch.zeros(B, N, dtype=x.dtype)
    for h in range(attn.num_heads):
        logits = q[:, h] @ k[:, h].transpose(-1, -2) / math.sqrt(C // attn.num_heads)
        received += torch.softmax(logits, dim=-1).sum(dim=1)
    return received


def plain_forward(model, images, locations, counts, k):
    """The study's DPCKNNVisionTransformer.forward with the plain clustering, on timm's own layers."""
    x = model._pos_embed(model.patch_embed(images))
    P = model.num_prefix_tokens
    for index, block in enumerate(model.blocks):
        if index in locations:
            count = counts[locations.index(index)]
            rows = []
            for b in range(x.shape[0]):
                _, _, merged = plain_dpc_knn(x[b, P:].numpy(), count, k)
                rows.append(torch.cat([x[b, :P], torch.from_numpy(merged)]))
            x = torch.stack(rows)
        x = block(x)
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("flavour", ["plain", "registers", "no_class_token"])
def test_model_matches_plain_implementation(flavour):
    model = tiny_vit(**FLAVOURS[flavour]).double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    reduced = patched(model, keep_rate=0.6, locations=(1, 3), k_neighbors=4)
    counts = [int(16 * 0.6), int(16 * 0.6**2)]  # the reference's int(num_patches * keep_rate ** (i + 1))
    with torch.no_grad():
        expected = plain_forward(model, images, [1, 3], counts, 4)
        assert torch.allclose(reduced(images), expected, atol=1e-10)


def plain_forward_kmedoids(model, images, locations, counts, iters):
    """The study's KMedoidsVisionTransformer.forward (attention of the block before, medoid tokens
    kept) with the plain k-medoids, on timm's own layers."""
    x = model._pos_embed(model.patch_embed(images))
    P = model.num_prefix_tokens
    received = None
    for index, block in enumerate(model.blocks):
        if index in locations:
            count = counts[locations.index(index)]
            rows = []
            for b in range(x.shape[0]):
                medoids, _ = plain_kmedoids(x[b, P:].tolist(), received[b, P:].tolist(), count, iters)
                rows.append(torch.cat([x[b, :P], x[b, P:][medoids]]))
            x = torch.stack(rows)
        if index + 1 in locations:
            received = plain_received(block, x)
        x = block(x)
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("flavour", ["layer_scale", "registers", "no_class_token"])
def test_kmedoids_model_matches_plain_implementation(flavour):
    model = tiny_vit(**FLAVOURS[flavour]).double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    reduced = patched(model, "kmedoids", keep_rate=0.6, locations=(1, 3), iters=2)
    counts = [int(16 * 0.6), int(16 * 0.6**2)]
    with torch.no_grad():
        expected = plain_forward_kmedoids(model, images, [1, 3], counts, 2)
        assert torch.allclose(reduced(images), expected, atol=1e-10)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_keep_rate_one_reproduces_dense_bit_for_bit(flavour, name):
    model = tiny_vit(**FLAVOURS[flavour])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(patched(model, name, keep_rate=1.0, locations=(1, 2, 3))(x), model(x))


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_schedule_and_restore_on_every_flavour(flavour, name):
    model = tiny_vit(**FLAVOURS[flavour])
    layout = TokenLayout.of(model)
    P = layout.num_prefix_tokens
    method = create_method(name, keep_rate=0.7, locations=(1, 2))
    schedule = method.schedule(layout)
    # clustering in front of blocks 1 and 2: tokens entering block 1 are already clustered
    assert schedule.tokens == (16 + P, int(16 * 0.7) + P, int(16 * 0.49) + P, int(16 * 0.49) + P, int(16 * 0.49) + P)
    reduced = method.apply(model, schedule)
    with torch.no_grad():
        final = reduced.forward_features(torch.randn(2, 3, 32, 32))
        restored = reduced.blocks.restore(final)
    assert final.shape == (2, schedule.tokens[-1], 64) and restored.shape == (2, layout.num_tokens, 64)
    assert torch.equal(restored[:, :P], final[:, :P])
    members = reduced.blocks.last_state.members  # [B, 16, clusters]
    assert torch.equal(members.sum(-1), torch.ones(2, 16))  # every patch in exactly one cluster
    for b in range(2):
        for patch in range(16):
            assert torch.equal(restored[b, P + patch], final[b, P + members[b, patch].argmax()])


@pytest.mark.parametrize("name", METHODS)
def test_dense_restore_is_identity_and_layer_scale_is_applied(name):
    model = tiny_vit(init_values=0.1)
    dense = patched(model, name, keep_rate=1.0, locations=(2,))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = dense.forward_features(x)
        assert dense.blocks.restore(feats) is feats
        reduced = patched(model, name, keep_rate=0.5, locations=(2,))
        before = reduced(x)
        for block in reduced.blocks:
            block.ls2.gamma.zero_()
        assert not torch.allclose(before, reduced(x))


@pytest.mark.parametrize("name,cls", [("dpc-knn", DPCKNN), ("kmedoids", KMedoids)])
def test_original_untouched_remove_pickle_deepcopy(name, cls):
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    reduced = patched(model, name, keep_rate=0.5, locations=(1, 2))
    assert not isinstance(model.blocks, ClusterBlocks) and type(model.blocks[0]) is Block
    with torch.no_grad():
        expected = reduced(x)
        for clone in (pickle.loads(pickle.dumps(reduced)), copy.deepcopy(reduced)):
            assert torch.equal(clone(x), expected)
        assert not torch.allclose(expected, model(x))
        cls.remove(reduced)
        assert not isinstance(reduced.blocks, ClusterBlocks) and {type(b) for b in reduced.blocks} == {Block}
        assert torch.equal(reduced(x), model(x))


@pytest.mark.parametrize("params,message", [
    ({"keep_rate": 0.0, "locations": (1,)}, r"keep rate 0.0 must be in \(0, 1\]"),
    ({"keep_rate": 1.5, "locations": (1,)}, r"keep rate 1.5 must be in \(0, 1\]"),
    ({"keep_rate": [0.5, 0.5], "locations": (1, 2, 3)}, "2 keep rates for 3 locations"),
    ({"locations": (0, 2)}, r"location 0 is outside 1..3"),
    ({"locations": (2, 4)}, r"location 4 is outside 1..3"),
    ({"locations": (2, 1)}, "strictly increasing"),
    ({"keep_rate": 0.01, "locations": (1,)}, "leaves no cluster"),
    ({"keep_rate": 0.5, "locations": (1, 2), "k_neighbors": 9}, r"k_neighbors=9 must be in 1..8"),
    ({"k_neighbors": 0, "locations": (1,)}, r"k_neighbors=0 must be in 1..16"),
])
def test_bad_parameters_name_the_fix(params, message):
    with pytest.raises(ScheduleError, match=message):
        create_method("dpc-knn", **params).schedule(TokenLayout.of(tiny_vit()))
    if "k_neighbors" not in params:
        with pytest.raises(ScheduleError, match=message):
            create_method("kmedoids", **params).schedule(TokenLayout.of(tiny_vit()))


def test_unknown_parameter_bad_iters_unsupported_block():
    with pytest.raises(SpecError, match="takes no parameter r; it takes: k_neighbors, keep_rate, locations"):
        create_method("dpc-knn", r=3)
    with pytest.raises(SpecError, match="takes no parameter k_neighbors; it takes: iters, keep_rate, locations"):
        create_method("kmedoids", k_neighbors=3)
    with pytest.raises(ScheduleError, match=r"iters=-1 must be >= 0"):
        create_method("kmedoids", iters=-1, locations=(2,)).schedule(TokenLayout.of(tiny_vit()))
    model = tiny_vit()
    model.blocks[1] = torch.nn.Identity()
    with pytest.raises(NotImplementedError, match="block 1 is Identity"):
        patched(model, "kmedoids", keep_rate=0.5, locations=(2,))


@pytest.fixture(scope="module")
def photos32():
    from vitfold.images import batches, list_images, load_images
    from vitfold.spec import Preprocess

    pre = Preprocess(img_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return batches(load_images(list_images(), pre), 2)


@pytest.mark.parametrize("name,flavour,what", [
    ("dpc-knn", "registers", "features"),
    ("kmedoids", "registers", "features"),
    pytest.param("dpc-knn", "no_class_token", "logits", marks=pytest.mark.slow),
    pytest.param("kmedoids", "layer_scale", "logits", marks=pytest.mark.slow),
])
def test_exports_static_and_exact(tmp_path, photos32, name, flavour, what):
    """Classification and restored features through ONNX Runtime; no If/NonZero/scatter, constant K."""
    from vitfold.export.onnx import export_and_validate
    from vitfold.reduce.features import DenseFeatures

    reduced = patched(tiny_vit(**FLAVOURS[flavour]), name, keep_rate=0.7, locations=(1, 2, 3))
    # per location: dpc-knn has 2 TopK (kNN, centres) and 1 ArgMin; k-medoids 1 TopK (initial
    # medoids) and 2 * iters ArgMin (assignments and medoid updates, unrolled), plus the final
    # assignment, which only restore uses (dead code in the classifier)
    module = DenseFeatures(reduced).eval() if what == "features" else reduced
    topk, argmin = (2, 1) if name == "dpc-knn" else (1, 2 * 3 + (what == "features"))
    result, _ = export_and_validate(module, tmp_path / f"{what}.onnx", photos32, what=what)
    assert result.parity.max_abs <= 1e-4, what
    assert not {"If", "Loop", "NonZero", "ScatterElements", "ScatterND"} & set(result.op_counts)
    assert (result.op_counts["TopK"], result.op_counts["ArgMin"]) == (3 * topk, 3 * argmin)


@pytest.fixture(scope="module")
def dinov2(dinov2_path):
    from vitfold.export.models import create_model
    from vitfold.images import list_images, load_images
    from vitfold.spec import ModelSpec

    model, pre = create_model(ModelSpec("vit_small_patch14_dinov2", checkpoint=str(dinov2_path), img_size=224))
    return model, torch.from_numpy(load_images(list_images(), pre))


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_real_weights_fidelity_and_export(dinov2, tmp_path, name):
    """DINOv2 ViT-S/14 on the shipped photos: class-token cosine falls with the keep rate and stays
    sane at 0.7 (~0.62 of dense MACs); the exported classifier matches torch."""
    from vitfold.export.onnx import export_and_validate
    from vitfold.images import batches
    from vitfold.metrics import compare

    model, images = dinov2
    with torch.no_grad():
        dense = model(images).numpy()
        cos = {rate: compare(dense, patched(model, name, keep_rate=rate)(images).numpy()).mean_cosine
               for rate in (0.9, 0.7, 0.5)}
    assert cos[0.9] > cos[0.7] > cos[0.5] and cos[0.9] > 0.97 and cos[0.7] > 0.85
    result, _ = export_and_validate(patched(model, name, keep_rate=0.7), tmp_path / "d.onnx", batches(images.numpy(), 1))
    assert result.parity.max_abs <= 1e-4
