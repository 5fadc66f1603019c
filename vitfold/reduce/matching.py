"""Bipartite soft matching and the merges built on it: pure functions, no modules.

Source: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023, Sec. 3 (bipartite soft
matching, size-weighted average, proportional attention). The function computed here equals the
authors' ``tome/merge.py`` on the same inputs, with three changes that leave its numbers unchanged:

* protected (prefix) tokens are excluded with a constant mask instead of in-place ``-inf`` writes,
  which generalises the reference's class/distillation handling to register tokens and exports
  as one ``Where`` node;
* only export-exact reductions are used: ``sum`` (ScatterElements add, opset >= 16) followed by a
  divide, and ``amax`` (ScatterElements max, opset >= 18) for source tracing; never ``mean``, which
  exports as a plain scatter and silently gives wrong numbers;
* tokens are picked by row gathers on the flattened ``[B * N, C]`` tokens, the reference's
  ``cat([unm, dst])`` in one gather, instead of ``gather`` along the token axis with indices
  broadcast over channels (an ``Expand`` + ``GatherElements`` per pick: 0.55 ms of a 17 ms DeiT-S
  r=13 OpenVINO run, against 0.15 ms for the row gathers; PERF_COUNT means over 30 runs).

Layout everywhere: ``x`` is ``[B, N, C]``, tokens on axis 1.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

Merge = Callable[..., torch.Tensor]


def _identity(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    return x


def max_merge(num_tokens: int, num_protected: int) -> int:
    """Largest r bipartite matching can take on ``num_tokens`` tokens: half the unprotected ones."""
    return max(0, (num_tokens - num_protected) // 2)


def _prefix_order(num_tokens: int, num_unmerged: int, num_protected: int) -> Optional[torch.Tensor]:
    """Permutation that puts prefix tokens back in their original order after ``cat([unm, dst])``.

    Prefix token ``p`` sits in set A (even positions) at ``p // 2`` when ``p`` is even and in set B at
    ``p // 2`` when odd. For one prefix token (class) the concatenation is already in order, which is
    the reference's ``cat([unm, dst])``; for class + distillation it gives the reference's
    ``cat([unm[:1], dst[:1], unm[1:], dst[1:]])``.
    """
    if num_protected <= 1:
        return None
    in_a, in_b = (num_protected + 1) // 2, num_protected // 2
    order = []
    for p in range(num_protected):
        order.append(p // 2 if p % 2 == 0 else num_unmerged + p // 2)
    order += list(range(in_a, num_unmerged)) + list(range(num_unmerged + in_b, num_tokens))
    return torch.tensor(order, dtype=torch.long)


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, num_protected: int = 0
) -> tuple[Merge, Merge]:
    """Match the ``r`` most similar (A, B) token pairs; return ``(merge, unmerge)`` closures.

    Tokens alternate between set A (even positions) and set B (odd). Each A token draws an edge to
    its most cosine-similar B token; the ``r`` strongest edges are merged (A into B). Prefix tokens
    (class, distillation, registers) are never merged. The output is the reference's
    ``cat([unmerged A, B])``: unmerged A tokens by position when there are prefix tokens, else by
    falling edge score.

    How, for export: tokens are picked with row gathers on the flattened ``[B * N, C]`` tokens
    (ONNX ``Gather``) rather than ``gather`` along the token axis, which needs its ``[B, r, 1]``
    index broadcast to ``[B, r, C]`` (an ``Expand`` plus a ``GatherElements`` per pick). One gather
    takes the unmerged A tokens and all B tokens in output order; one takes the ``r`` merged A
    tokens; a ``ScatterElements`` adds those into their B partners.

    Args:
        metric: ``[B, N, Cm]`` similarity features (ToMe: attention keys averaged over heads).
        r: tokens to remove, ``0 <= r <= max_merge(N, num_protected)``; ``r == 0`` returns identities.
        num_protected: leading prefix tokens to protect (``model.num_prefix_tokens``).

    Returns:
        ``merge(x [B, N, C], mode) -> [B, N - r, C]`` with ``mode`` in ``{"sum", "amax", "drop"}``
        (``drop``: matched A tokens are removed, their B partners unchanged: ToMe's "keep one"), and
        ``unmerge(x [B, N - r, C]) -> [B, N, C]`` that copies each merged token back to its sources.

    Raises:
        ValueError: r outside ``[0, max_merge]`` (schedules are validated before this is reached).
    """
    batch, num_tokens, _ = metric.shape
    if r == 0:
        return _identity, _identity
    if not 0 < r <= max_merge(num_tokens, num_protected):
        raise ValueError(f"r={r} outside [0, {max_merge(num_tokens, num_protected)}] for N={num_tokens}")
    num_a, num_b = (num_tokens + 1) // 2, num_tokens // 2
    num_unmerged = num_a - r
    num_out = num_tokens - r
    device = metric.device

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)  # [B, Na, Nb]
        if num_protected:
            rows = torch.arange(num_a, device=device) * 2 < num_protected  # prefix tokens in A
            cols = torch.arange(num_b, device=device) * 2 + 1 < num_protected  # prefix tokens in B
            scores = scores.masked_fill(rows[:, None] | cols[None, :], -torch.inf)
        node_max, node_idx = scores.max(dim=-1)  # best B partner of every A token, [B, Na]
        edge_idx = node_max.argsort(dim=-1, descending=True)  # [B, Na]
        unm_idx = edge_idx[..., r:]  # [B, Nu] A indices
        src_idx = edge_idx[..., :r]  # [B, r]
        dst_idx = node_idx.gather(dim=-1, index=src_idx)  # [B, r] B indices
        if num_protected:
            unm_idx = unm_idx.sort(dim=-1)[0]  # prefix tokens back to the front, as the reference
        # Token positions in x (A token i at 2i, B token j at 2j + 1), offset per image in [B * N].
        offset = (torch.arange(batch, device=device) * num_tokens)[:, None] if batch > 1 else 0
        keep_rows = torch.cat([2 * unm_idx, (2 * torch.arange(num_b, device=device) + 1).expand(batch, num_b)], -1)
        dst_slot = dst_idx + num_unmerged  # [B, r] output slot of each partner
        order = _prefix_order(num_out, num_unmerged, num_protected)
        if order is not None:  # class + distillation: the reference's interleaved prefix
            order = order.to(device)
            keep_rows = keep_rows[..., order]
            dst_slot = torch.argsort(order)[dst_slot]
        keep_rows = (keep_rows + offset).reshape(-1)  # [B * (N - r)]
        src_rows = (2 * src_idx + offset).reshape(-1)  # [B * r]

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        if mode not in ("sum", "amax", "drop"):
            raise ValueError(f"mode {mode!r} does not export exactly; use 'sum' (then divide), 'amax' or 'drop'")
        n, _, c = x.shape
        flat = x.reshape(n * num_tokens, c)
        out = flat.index_select(0, keep_rows).reshape(n, num_out, c)
        if mode == "drop":
            return out
        src = flat.index_select(0, src_rows).reshape(n, r, c)
        return out.scatter_reduce(-2, dst_slot[..., None].expand(n, r, c), src, reduce=mode)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        n, _, c = x.shape
        with torch.no_grad():  # the output slot every input token lands in, [B, N]
            slot_a = torch.empty(batch, num_a, dtype=torch.long, device=device)
            slot_a.scatter_(-1, unm_idx, torch.arange(num_unmerged, device=device).expand(batch, num_unmerged))
            slot_a.scatter_(-1, src_idx, dst_idx + num_unmerged)
            slot = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
            slot[..., ::2] = slot_a
            slot[..., 1::2] = torch.arange(num_b, device=device) + num_unmerged
            if order is not None:
                slot = torch.argsort(order)[slot]
        return x.gather(-2, slot[..., None].expand(n, num_tokens, c))

    return merge, unmerge


def merge_wavg(
    merge: Merge, x: torch.Tensor, size: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge (ToMe Sec. 3, "Tracking token size").

    Args:
        merge: a closure from :func:`bipartite_soft_matching`.
        x: ``[B, N, C]`` tokens.
        size: ``[B, N, 1]`` patches per token, ``None`` meaning all ones.

    Returns:
        ``([B, N - r, C] merged tokens, [B, N - r, 1] merged sizes)``.
    """
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    # One merge of [x * size | size] instead of two: the same sums (channels are independent), half
    # the gathers and scatters in the exported graph.
    merged = merge(torch.cat([x * size, size], dim=-1), mode="sum")
    x, size = merged[..., :-1], merged[..., -1:]
    return x / size, size


def merge_source(merge: Merge, x: torch.Tensor, source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Track which input tokens each merged token holds (ToMe's source tracing, for unmerging).

    Args:
        merge: a closure from :func:`bipartite_soft_matching`.
        x: ``[B, N, C]`` tokens (only its shape is read when ``source`` is None).
        source: ``[B, N, N0]`` 0/1 membership of the ``N0`` original tokens, ``None`` for identity.

    Returns:
        ``[B, N - r, N0]`` membership after the merge.
    """
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device, dtype=x.dtype)[None].expand(n, t, t)
    return merge(source, mode="amax")
