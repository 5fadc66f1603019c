"""Dense prediction (``--task features``): the full patch grid again after a reduced backbone.

A reduced model ends with fewer tokens than it started with; a segmentation or depth head needs one
feature per patch. :class:`DenseFeatures` runs ``forward_features`` and asks the patched blocks to
``restore`` the original token order from what they recorded during the forward (ToMe: unmerge through
the traced sources; EViT / Top-K: kept tokens scattered back, pruned positions rebuilt from the final
tokens or filled from the fused token / their features when dropped, or the whole grid rebuilt
mid-network with ``restore_at`` (then ``restore`` is the identity); clustering methods: their
reconstruction layer).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

TASKS = ("classify", "features")


class DenseFeatures(nn.Module):
    """``images [B, 3, H, W] -> features [B, H/p * W/p, C]``: normalised patch tokens, full grid.

    Wraps a timm VisionTransformer, dense or patched by a method whose ``model.blocks`` has
    ``restore(x [B, N_L, C]) -> [B, N_0, C]``. Prefix tokens (class, registers) are dropped.
    ``num_classes`` is 0 so the exporter names the output ``features``.
    """

    num_classes = 0

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_prefix_tokens = model.num_prefix_tokens
        self.train(model.training)  # a fresh Module is in training mode; follow the wrapped model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(images)  # [B, N_L, C], final norm applied
        restore = getattr(self.model.blocks, "restore", None)
        if restore is not None:
            tokens = restore(tokens)
        return tokens[:, self.num_prefix_tokens:]


def for_features(method_cls) -> dict:
    """Extra parameters a method needs for ``--task features`` (``trace_source=True`` where it has it)."""
    return {"trace_source": True} if "trace_source" in inspect.signature(method_cls).parameters else {}
