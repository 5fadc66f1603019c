"""ToMe as a patch: dense at r=0 bit for bit, layer scale kept, undoable, picklable."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from timm.models.vision_transformer import Block

from conftest import FLAVOURS, tiny_vit
from vitfold.reduce import TokenLayout, create_method
from vitfold.reduce.tome import ToMe, ToMeBlocks
from vitfold.errors import SpecError


def patched(model, **params):
    method = create_method("tome", **params)
    return method.apply(model, method.schedule(TokenLayout.of(model)))


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_r0_reproduces_dense_bit_for_bit(flavour):
    model = tiny_vit(**FLAVOURS[flavour])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(patched(model, r=0)(x), model(x))


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_merging_runs_on_every_flavour_and_shrinks_tokens(flavour):
    model = tiny_vit(**FLAVOURS[flavour])
    reduced = patched(model, r=2)
    with torch.no_grad():
        feats = reduced.forward_features(torch.randn(2, 3, 32, 32))  # forward_features works on its own
    layout = TokenLayout.of(model)
    assert feats.shape[1] == layout.num_tokens - 2 * layout.depth


def test_layer_scale_is_applied():
    """Zeroing ls1/ls2 must change the output of a merged block: the reference ToMe ignores them."""
    model = tiny_vit(init_values=0.1)
    reduced = patched(model, r=2)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = reduced(x)
        for block in reduced.blocks:
            block.ls2.gamma.zero_()
        assert not torch.allclose(before, reduced(x))


def test_original_stays_dense_and_remove_round_trips():
    model = tiny_vit(init_values=0.1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = model(x)
        reduced = patched(model, r=3)
        assert not isinstance(model.blocks, ToMeBlocks) and type(model.blocks[0]) is Block
        assert not torch.allclose(reduced(x), dense)
        ToMe.remove(reduced)
        assert type(reduced.blocks[0]) is Block and not isinstance(reduced.blocks, ToMeBlocks)
        assert torch.equal(reduced(x), dense)


def test_pickle_and_deepcopy():
    reduced = patched(tiny_vit(), r=2)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = reduced(x)
        for clone in (pickle.loads(pickle.dumps(reduced)), copy.deepcopy(reduced)):
            assert torch.equal(clone(x), expected)


def test_sizes_and_sources_are_tracked():
    model = tiny_vit()
    reduced = patched(model, r=3, trace_source=True)
    with torch.no_grad():
        reduced(torch.randn(2, 3, 32, 32))
    state = reduced.blocks.last_state
    layout = TokenLayout.of(model)
    final = layout.num_tokens - 3 * layout.depth
    assert state.size.shape == (2, final, 1) and state.source.shape == (2, final, layout.num_tokens)
    assert torch.equal(state.size.sum(1)[:, 0], torch.full((2,), float(layout.num_tokens)))
    assert torch.equal(state.source.sum(-1, keepdim=True), state.size)
    assert torch.equal(state.source[:, 0, 0], torch.ones(2))  # class token holds only itself


def test_unknown_method_and_parameter():
    with pytest.raises(SpecError, match="unknown method 'tomee'.*tome"):
        create_method("tomee")
    with pytest.raises(SpecError, match="takes no parameter keep_rate"):
        create_method("tome", keep_rate=0.5)


def test_unsupported_block_is_refused():
    model = tiny_vit()
    model.blocks[1] = torch.nn.Identity()
    with pytest.raises(NotImplementedError, match="block 1"):
        patched(model, r=1)
