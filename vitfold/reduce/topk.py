"""Top-K pruning: keep the tokens the class token attends to most, drop the rest.

Source: the Top-K baseline of Haurum et al., "Which Tokens to Use? Investigating Token Reduction in
Vision Transformers", ICCVW 2023 (Sec. 3): EViT's attentive-token selection (Liang et al., ICLR
2022) without inattentive token fusion, at the same locations and keep rates. It shares
:mod:`.evit`'s patch; only the default of ``fuse`` differs.
"""

from __future__ import annotations

from ._registry import register_method
from .evit import EViT


@register_method("topk")
class TopK(EViT):
    """Top-K pruning by class-token attention (Haurum et al., ICCVW 2023), no fusion.

    Args: as :class:`~vitfold.reduce.evit.EViT`; ``fuse`` defaults to False.
    """

    name = "topk"
    default_fuse = False
