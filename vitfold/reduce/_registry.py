"""The method registry (as timm's ``_registry.py``): :func:`register_method`, :func:`create_method`,
and :class:`TokenLayout`, which every method module imports. Method modules import from here, never
from the package ``__init__``, which imports them to register them."""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from ..errors import SpecError

METHODS: dict[str, type] = {}
T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class TokenLayout:
    """What a schedule needs to know about a model: ``depth`` blocks, ``num_tokens`` entering block 0
    (prefix included), ``num_prefix_tokens`` class/distillation/register tokens."""

    depth: int
    num_tokens: int
    num_prefix_tokens: int

    @classmethod
    def of(cls, model) -> "TokenLayout":
        """Read the layout off a timm ``VisionTransformer``."""
        num_patches = model.patch_embed.num_patches
        prefix = model.num_prefix_tokens
        return cls(depth=len(model.blocks), num_tokens=num_patches + prefix, num_prefix_tokens=prefix)


#: Model classes other than timm's ``VisionTransformer`` -> the module that patches them (``apply_tome``,
#: ``apply_prune``, ``unpatch``), registered by that module on import (:mod:`.eva` for timm's ``Eva``).
MODEL_PATCHES: dict[type, object] = {}


def register_model_patch(model_cls: type, module) -> None:
    """Route methods' ``apply`` / ``remove`` for ``model_cls`` (and subclasses) to ``module``."""
    MODEL_PATCHES[model_cls] = module


def model_patch(model):
    """The registered patch module for ``model``'s class, or None (a timm ``VisionTransformer``)."""
    return next((module for cls, module in MODEL_PATCHES.items() if isinstance(model, cls)), None)


#: ``max_removed(block, tokens) -> int``: the most tokens a block may remove from ``tokens`` entering it.
MaxRemoved = Callable[[int, int], int]


@dataclass(frozen=True)
class SchedulePlan:
    """What a method tells the schedule planner (:mod:`vitfold.plan.auto_schedule`) about itself.

    A method is planned when its class has ``schedule_param`` (the parameter the planner picks),
    ``plan_max_fraction`` (the default cap on one block's removal) and ``plan(layout, max_fraction)
    -> SchedulePlan``.

    Attributes:
        max_removed: the per-block limit the search respects.
        reference: parameters of the reduced model the planner's calibration times (a middle setting).
        params_for: a searched token schedule ``tokens[0..depth]`` -> the method's parameters that
            run exactly that schedule.
    """

    max_removed: MaxRemoved
    reference: dict
    params_for: Callable[[Sequence[int]], dict]


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: register a method under ``name``. Registering a name twice raises."""

    def wrap(cls: T) -> T:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered by {METHODS[name].__name__}")
        METHODS[name] = cls
        cls.name = name
        return cls

    return wrap


def create_method(name: str, **params):
    """Instantiate method ``name`` with ``params``.

    Raises:
        SpecError: unknown method (with close matches) or a parameter the method does not take.
    """
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise SpecError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}.{hint}")
    cls = METHODS[name]
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise SpecError(
            f"method {name!r} takes no parameter {', '.join(unknown)}; it takes: {', '.join(sorted(accepted))}"
        )
    return cls(**params)
