"""Static token schedules: how many tokens each block sees, known before export.

Convention (ToMe, EViT and Top-K all reduce between a block's attention and its MLP): block ``l``'s
attention runs on ``tokens[l]`` tokens, its MLP and everything after it on ``tokens[l + 1]``.
``tokens`` has ``depth + 1`` entries; ``tokens[depth]`` is what the final norm and head see.
Because every count is a Python int fixed here, every shape in the exported graph is static.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from ..errors import ScheduleError

RSpec = Union[int, Sequence[int], tuple[int, float]]
#: Where a block removes its tokens (see :class:`Schedule`).
SITES = ("attention", "block")


@dataclass(frozen=True)
class Schedule:
    """Token counts per block for one method on one model.

    Attributes:
        tokens: ``depth + 1`` counts; ``tokens[0]`` is every token entering block 0 (prefix included).
        removed: tokens removed inside each block (``depth`` entries): ``tokens[l] - tokens[l + 1]``.
        num_prefix_tokens: class / distillation / register tokens, never merged or pruned.
        notes: human-readable remarks (e.g. where a method capped a request), shown in reports.
        site: where inside block ``l`` the ``removed[l]`` tokens go: ``attention`` (between attention
            and MLP: ToMe, EViT, Top-K) or ``block`` (after the MLP, before block ``l + 1``: the
            clustering methods). FLOP counts depend on it.
        restored_at: the one block whose reduction site rebuilds the full token grid instead of
            removing tokens (``--task features``, EViT / Top-K ``restore_at``), or None. There the
            count grows back to ``tokens[0]`` (``removed`` is negative) and stays there: that block's
            MLP and every later block run on all tokens.
    """

    tokens: tuple[int, ...]
    num_prefix_tokens: int
    notes: tuple[str, ...] = field(default=())
    site: str = "attention"
    restored_at: Optional[int] = None

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ScheduleError(f"reduction site {self.site!r} unknown; one of {', '.join(SITES)}")
        if len(self.tokens) < 2:
            raise ScheduleError("a schedule needs at least one block (tokens has depth + 1 entries)")
        if self.restored_at is not None:
            self._check_restore()
        for block, (before, after) in enumerate(zip(self.tokens, self.tokens[1:])):
            if after > before and block != self.restored_at:
                raise ScheduleError(f"block {block}: token count grows from {before} to {after}")
            if after <= self.num_prefix_tokens:
                raise ScheduleError(
                    f"block {block}: leaves {after} tokens, but {self.num_prefix_tokens} are class/"
                    f"register tokens; at least one patch token must remain. Use a smaller reduction."
                )

    def _check_restore(self) -> None:
        at, full = self.restored_at, self.tokens[0]
        if self.site != "attention":
            raise ScheduleError(f"restored_at needs reduction site 'attention' (between attention and MLP), not {self.site!r}")
        if not 0 <= at < len(self.tokens) - 1:
            raise ScheduleError(f"restored_at={at} is outside the model's blocks 0..{len(self.tokens) - 2}")
        if self.tokens[at] >= full:
            raise ScheduleError(f"restored_at={at}: nothing was removed before block {at}, so there is nothing to rebuild")
        if any(n != full for n in self.tokens[at + 1:]):
            raise ScheduleError(f"restored_at={at}: every count after block {at}'s site must be the full {full} tokens, "
                                f"got {list(self.tokens[at + 1:])}")

    @property
    def depth(self) -> int:
        return len(self.tokens) - 1

    @property
    def removed(self) -> tuple[int, ...]:
        return tuple(a - b for a, b in zip(self.tokens, self.tokens[1:]))

    @property
    def is_dense(self) -> bool:
        return all(r == 0 for r in self.removed)

    @classmethod
    def dense(cls, depth: int, num_tokens: int, num_prefix_tokens: int) -> "Schedule":
        """The identity schedule: ``num_tokens`` in every block."""
        return cls(tokens=(num_tokens,) * (depth + 1), num_prefix_tokens=num_prefix_tokens)

    def to_json(self) -> dict:
        return {
            "tokens": list(self.tokens),
            "removed": list(self.removed),
            "num_prefix_tokens": self.num_prefix_tokens,
            "notes": list(self.notes),
            "site": self.site,
            "restored_at": self.restored_at,
        }

    @classmethod
    def from_json(cls, data: dict) -> "Schedule":
        return cls(
            tokens=tuple(data["tokens"]),
            num_prefix_tokens=int(data["num_prefix_tokens"]),
            notes=tuple(data.get("notes", ())),
            site=data.get("site", "attention"),
            restored_at=data.get("restored_at"),
        )


def parse_r(depth: int, r: RSpec) -> list[int]:
    """Normalise ToMe's ``r`` into one value per block, as the reference ``tome.utils.parse_r`` does.

    Args:
        depth: number of transformer blocks.
        r: an int (constant r), a ``(r, inflect)`` pair (inflect in [-1, 1]: -1 is the paper's
            "decreasing" schedule, 0 constant), or a list with one r per block (shorter lists are
            padded with 0).

    Returns:
        ``depth`` non-negative ints.

    Raises:
        ScheduleError: negative r, a list longer than the model, or inflect outside [-1, 1].
    """
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        base, inflect = r
        if not -1.0 <= inflect <= 1.0:
            raise ScheduleError(f"inflect must be in [-1, 1], got {inflect}")
    elif isinstance(r, (list, tuple)):
        values = [int(v) for v in r]
        if len(values) > depth:
            raise ScheduleError(f"r lists {len(values)} values but the model has {depth} blocks")
        values += [0] * (depth - len(values))
        _check_non_negative(values)
        return values
    else:
        base, inflect = int(r), 0.0
    # Same arithmetic as the reference so that (r, inflect) schedules give the same integers.
    low = int(base * (1.0 - inflect))
    high = 2 * base - low
    step = (high - low) / (depth - 1) if depth > 1 else 0.0
    values = [int(low + step * i) for i in range(depth)]
    _check_non_negative(values)
    return values


def _check_non_negative(values: list[int]) -> None:
    for block, value in enumerate(values):
        if value < 0:
            raise ScheduleError(f"block {block}: r must be >= 0, got {value}")
