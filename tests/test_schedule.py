"""Schedules: the reference's r arithmetic, the 50% cap recorded, infeasible requests refused."""

from __future__ import annotations

import pytest

from vitfold.reduce import Schedule, ScheduleError, TokenLayout, create_method, parse_r

DEIT_S = TokenLayout(depth=12, num_tokens=197, num_prefix_tokens=1)


def reference_parse_r(num_layers, r):
    """tome.utils.parse_r, restated."""
    inflect = 0
    if isinstance(r, list):
        return r + [0] * (num_layers - len(r))
    if isinstance(r, tuple):
        r, inflect = r
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / (num_layers - 1)
    return [int(lo + step * i) for i in range(num_layers)]


@pytest.mark.parametrize("r", [0, 8, 13, 16, (16, -1.0), (13, 0.5), (8, -0.3), [8, 8, 4]])
def test_parse_r_matches_reference(r):
    assert parse_r(12, r) == reference_parse_r(12, r)


def test_tome_r13_tokens_on_deit_small():
    schedule = create_method("tome", r=13).schedule(DEIT_S)
    assert schedule.tokens == tuple(197 - 13 * i for i in range(13))
    assert schedule.notes == ()


def test_r16_is_capped_at_the_last_block_and_says_so():
    schedule = create_method("tome", r=16).schedule(DEIT_S)
    assert schedule.removed[-1] == 10 and schedule.tokens[-1] == 11
    assert schedule.notes == ("block 11: r=16 capped to 10 (bipartite matching merges at most half)",)


def test_r_larger_than_the_block_is_refused_naming_the_block():
    with pytest.raises(ScheduleError, match="block 0: r=200"):
        create_method("tome", r=200).schedule(DEIT_S)
    with pytest.raises(ScheduleError, match="block 1: r=100"):
        create_method("tome", r=100).schedule(DEIT_S)


@pytest.mark.parametrize("bad, match", [([-1], "block 0: r must be >= 0"), ([1] * 13, "13 values"), ((4, 2.0), "inflect")])
def test_bad_r(bad, match):
    with pytest.raises(ScheduleError, match=match):
        parse_r(12, bad)


def test_schedule_validation_and_json_round_trip():
    with pytest.raises(ScheduleError, match="block 0: token count grows"):
        Schedule(tokens=(10, 12), num_prefix_tokens=1)
    with pytest.raises(ScheduleError, match="block 1: leaves 1 tokens"):
        Schedule(tokens=(10, 5, 1), num_prefix_tokens=1)
    schedule = create_method("tome", r=16).schedule(DEIT_S)
    assert Schedule.from_json(schedule.to_json()) == schedule


def test_macs_follow_the_reduction_site():
    """Clustering reduces after the MLP (site 'block'): the MLP of a reducing block runs on all its
    tokens, and the reduction pays for pairwise distances."""
    from vitfold.profiles.flops import ModelDims, block_macs, schedule_macs

    dims = ModelDims(embed_dim=384, attn_dim=384, head_dim=64, mlp_hidden=1536, num_patches=196,
                     patch_macs_per_token=3 * 16 * 16 * 384, num_classes=0)
    between = block_macs(dims, 197, 140, "attention")
    after = block_macs(dims, 197, 140, "block")
    assert after["mlp"] == 2 * 197 * 384 * 1536 and between["mlp"] == 2 * 140 * 384 * 1536
    assert after["matching"] == 197 * 197 * 384 and after["attention"] == between["attention"]
    tokens = [197, 197, 140, 140]
    assert schedule_macs(dims, tokens, "block")["total"] > schedule_macs(dims, tokens)["total"]
    assert schedule_macs(dims, [197] * 4, "block") == schedule_macs(dims, [197] * 4)  # nothing removed


def test_schedule_site_round_trips_and_is_checked():
    s = Schedule(tokens=(17, 12, 12), num_prefix_tokens=1, site="block")
    assert Schedule.from_json(s.to_json()) == s
    assert Schedule.from_json({"tokens": [17, 12], "num_prefix_tokens": 1}).site == "attention"  # older manifests
    with pytest.raises(ScheduleError, match="site"):
        Schedule(tokens=(17, 12), num_prefix_tokens=1, site="mlp")


def test_restored_at_allows_one_growth_back_to_the_full_grid():
    from vitfold.profiles.flops import ModelDims, schedule_macs

    s = Schedule(tokens=(17, 12, 17, 17), num_prefix_tokens=1, restored_at=1)
    assert s.removed == (5, -5, 0) and not s.is_dense
    assert Schedule.from_json(s.to_json()) == s
    assert Schedule.from_json({"tokens": [17, 12], "num_prefix_tokens": 1}).restored_at is None  # older manifests
    for tokens, at, match in (((17, 12, 17, 17), None, "block 1: token count grows"),
                              ((17, 12, 12, 15), 2, "every count after block 2's site must be the full 17"),
                              ((17, 12, 16, 16), 1, "every count after block 1's site must be the full 17"),
                              ((17, 12, 17, 12), 1, "every count after block 1's site"),
                              ((17, 17, 17, 17), 1, "nothing was removed before block 1"),
                              ((17, 12, 17, 17), 3, "restored_at=3 is outside the model's blocks 0..2")):
        with pytest.raises(ScheduleError, match=match):
            Schedule(tokens=tokens, num_prefix_tokens=1, restored_at=at)
    with pytest.raises(ScheduleError, match="needs reduction site 'attention'"):
        Schedule(tokens=(17, 12, 17), num_prefix_tokens=1, site="block", restored_at=1)
    # the restoring block: attention on the reduced count, MLP on every token, no matching
    dims = ModelDims(embed_dim=64, attn_dim=64, head_dim=16, mlp_hidden=256, num_patches=16,
                     patch_macs_per_token=3 * 8 * 8 * 64, num_classes=0)
    blocks = schedule_macs(dims, list(s.tokens))["blocks"]
    assert blocks[1]["mlp"] == 2 * 17 * 64 * 256 and blocks[1]["matching"] == 0
    assert blocks[1]["attention"] == schedule_macs(dims, [12, 12])["blocks"][0]["attention"]
