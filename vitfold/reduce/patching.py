"""What every method's patch shares: checking a model against a schedule, swapping classes, undoing it.

Methods patch by swapping classes on a deep copy (``model.blocks`` becomes the method's
``nn.Sequential`` subclass, each block and attention module the method's subclass of timm's), so a
patched model pickles, deep-copies and can be restored to the dense classes.
"""

from __future__ import annotations

import copy
from typing import Optional

from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..errors import SpecError
from ._registry import TokenLayout, model_patch
from .schedule import Schedule, ScheduleError


def check_schedule(model: VisionTransformer, schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` unless ``schedule`` was made for ``model``'s depth and token count."""
    layout = TokenLayout.of(model)
    if (schedule.depth, schedule.tokens[0]) != (layout.depth, layout.num_tokens):
        raise ScheduleError(
            f"schedule is for {schedule.depth} blocks / {schedule.tokens[0]} tokens, "
            f"model has {layout.depth} / {layout.num_tokens}; make the schedule from this model"
        )


def patchable_copy(model: VisionTransformer, schedule: Schedule, method: str) -> VisionTransformer:
    """A deep copy of ``model`` ready for ``method`` to patch with ``schedule``.

    Raises:
        ScheduleError: the schedule is for a model of another depth or token count.
        NotImplementedError: a block or attention type other than timm's ``Block`` / ``Attention``.
    """
    check_schedule(model, schedule)
    check_blocks(model, method)
    return copy.deepcopy(model)


def check_blocks(model: VisionTransformer, method: str) -> None:
    """Raise NotImplementedError unless every block is timm's ``Block`` with timm's ``Attention``."""
    for index, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if type(block) is not Block or type(attn) is not Attention:
            raise NotImplementedError(
                f"{method} patches timm Block/Attention; block {index} is {type(block).__name__}/{type(attn).__name__}"
            )


def swap_classes(model: VisionTransformer, blocks_cls: type, block_cls: Optional[type] = None,
                 attn_cls: Optional[type] = None, **attrs) -> VisionTransformer:
    """Apply a class-swap patch in place (the inverse of :func:`unpatch`): ``model.blocks`` becomes
    ``blocks_cls`` with ``attrs`` set as plain attributes, every block ``block_cls`` and its
    attention ``attn_cls`` (None: left as they are); returns ``model``.

    Raises:
        SpecError: ``model`` is not a timm ``VisionTransformer`` (an ``Eva`` iterates its blocks
            itself, so a patched ``model.blocks`` would silently never run: :mod:`.eva` patches it).
    """
    if not isinstance(model, VisionTransformer):
        covered = getattr(model_patch(model), "METHODS", ())
        raise SpecError(f"{blocks_cls.__name__} patches timm VisionTransformer blocks; {type(model).__name__} models "
                        f"take {', '.join(covered) or 'no method'}")
    blocks = model.blocks
    blocks.__class__ = blocks_cls
    for name, value in attrs.items():
        setattr(blocks, name, value)
    for block in blocks:
        if block_cls is not None:
            block.__class__ = block_cls
        if attn_cls is not None:
            block.attn.__class__ = attn_cls
    return model


def unpatch(model: VisionTransformer, blocks_cls: type, block_cls: Optional[type], attrs: tuple[str, ...]) -> VisionTransformer:
    """Undo a class-swap patch in place: ``model.blocks`` back to ``nn.Sequential`` without ``attrs``,
    blocks of ``block_cls`` (None: the patch left blocks alone) back to timm's ``Block`` /
    ``Attention``; returns ``model``."""
    blocks = model.blocks
    if isinstance(blocks, blocks_cls):
        for attr in (*attrs, "last_state"):
            blocks.__dict__.pop(attr, None)
        blocks.__class__ = nn.Sequential
    for block in blocks:
        if block_cls is not None and isinstance(block, block_cls):
            block.__class__ = Block
            block.attn.__class__ = Attention
    return model
