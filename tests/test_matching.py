"""vitfold's ToMe matching against an independent, plainly written version of the paper's algorithm."""

from __future__ import annotations

import math

import pytest
import torch

from vitfold.reduce.matching import bipartite_soft_matching, max_merge, merge_source, merge_wavg


def plain_tome_merge(x, size, metric, r, protected):
    """Bolya et al. 2023, Sec. 3, written with loops over one image. Returns (tokens, sizes) as lists.

    Set A = even positions, set B = odd. Every A token proposes its most similar B token (cosine);
    the r best proposals are merged into their B token by size-weighted average. Prefix tokens
    (position < protected) never take part. Output: unmerged A tokens (in order of descending edge
    score, then sorted by position when there are prefix tokens), then all B tokens in order; the
    prefix tokens are put back in their original order at the front.
    """
    n = len(x)
    a_pos = list(range(0, n, 2))
    b_pos = list(range(1, n, 2))

    def cos(i, j):
        u, v = metric[i], metric[j]
        return float(sum(p * q for p, q in zip(u, v)) / (math.sqrt(sum(p * p for p in u)) * math.sqrt(sum(q * q for q in v))))

    best = []
    for ia, i in enumerate(a_pos):
        scores = [(-math.inf if (i < protected or j < protected) else cos(i, j)) for j in b_pos]
        jb = max(range(len(b_pos)), key=lambda k: scores[k])  # first maximum, like torch.max
        best.append((scores[jb], ia, jb))
    order = sorted(range(len(a_pos)), key=lambda ia: -best[ia][0])  # descending score
    merged = order[:r]
    unmerged = order[r:]
    if protected:
        unmerged = sorted(unmerged)
    b_tokens = [[v * size[j] for v in x[j]] for j in b_pos]
    b_sizes = [size[j] for j in b_pos]
    for ia in merged:
        _, _, jb = best[ia]
        i = a_pos[ia]
        b_tokens[jb] = [p + q * size[i] for p, q in zip(b_tokens[jb], x[i])]
        b_sizes[jb] += size[i]
    out = [(x[a_pos[ia]], size[a_pos[ia]], a_pos[ia]) for ia in unmerged]
    out += [([v / s for v in tok], s, j) for tok, s, j in zip(b_tokens, b_sizes, b_pos)]
    prefix = sorted((t for t in out if t[2] < protected), key=lambda t: t[2])
    rest = [t for t in out if t[2] >= protected]
    out = prefix + rest
    return [t[0] for t in out], [t[1] for t in out]


@pytest.mark.parametrize("protected", [0, 1, 2, 5])
@pytest.mark.parametrize("num_tokens,r", [(9, 3), (12, 4), (17, 1)])
def test_matches_plain_implementation_token_by_token(protected, num_tokens, r):
    torch.manual_seed(protected * 100 + num_tokens)
    batch, channels = 3, 6
    r = min(r, max_merge(num_tokens, protected))
    x = torch.randn(batch, num_tokens, channels, dtype=torch.float64)
    metric = torch.randn(batch, num_tokens, 5, dtype=torch.float64)
    size = torch.randint(1, 4, (batch, num_tokens, 1)).double()
    merge, _ = bipartite_soft_matching(metric, r, protected)
    merged, merged_size = merge_wavg(merge, x, size)
    assert merged.shape == (batch, num_tokens - r, channels)
    for b in range(batch):
        tokens, sizes = plain_tome_merge(x[b].tolist(), size[b, :, 0].tolist(), metric[b].tolist(), r, protected)
        assert torch.allclose(merged[b], torch.tensor(tokens, dtype=torch.float64), atol=1e-12)
        assert merged_size[b, :, 0].tolist() == sizes


def test_prefix_tokens_stay_first_and_unmerged():
    torch.manual_seed(0)
    x = torch.randn(2, 21, 4)
    x[:, :5] = 1000 + torch.arange(5.0)[None, :, None]  # recognisable prefix tokens
    metric = x.clone()
    metric[:, :5] = metric[:, 5:10]  # make prefix tokens look like patches: they must still not merge
    merge, _ = bipartite_soft_matching(metric, 8, num_protected=5)
    out, size = merge_wavg(merge, x)
    assert torch.equal(out[:, :5], x[:, :5])
    assert torch.equal(size[:, :5], torch.ones(2, 5, 1))


def test_r_zero_is_identity_and_over_cap_raises():
    x = torch.randn(1, 9, 3)
    merge, unmerge = bipartite_soft_matching(x, 0, 1)
    assert merge(x) is x and unmerge(x) is x
    with pytest.raises(ValueError, match="outside"):
        bipartite_soft_matching(x, max_merge(9, 1) + 1, 1)


@pytest.mark.parametrize("protected", [0, 1, 2])
def test_unmerge_and_source_agree(protected):
    """unmerge copies each merged token back to all its sources; merge_source says which those are."""
    torch.manual_seed(1)
    x = torch.randn(2, 14, 3, dtype=torch.float64)
    merge, unmerge = bipartite_soft_matching(x, 5, protected)
    merged, size = merge_wavg(merge, x)
    source = merge_source(merge, x)
    assert torch.equal(source.sum(-1, keepdim=True), size)  # each token's size = its number of sources
    restored = unmerge(merged)
    expected = torch.einsum("bmn,bmc->bnc", source, merged)  # every original position gets its token
    assert torch.allclose(restored, expected)


def test_mean_mode_is_refused():
    x = torch.randn(1, 9, 3)
    merge, _ = bipartite_soft_matching(x, 2, 1)
    with pytest.raises(ValueError, match="export"):
        merge(x, mode="mean")
