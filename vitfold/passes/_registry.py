"""The pass registry: :func:`register_pass` and :data:`PASSES`. Pass modules import from here, never
from the package ``__init__``, which imports them to register them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx_graphsurgeon as gs

PassFn = Callable[..., gs.Graph]


@dataclass(frozen=True)
class Pass:
    """A registered rewrite: ``fn``, the max abs output change it may cause, and what it does."""

    name: str
    fn: PassFn
    tolerance: float
    description: str


PASSES: dict[str, Pass] = {}


def register_pass(name: str, *, tolerance: float = 0.0) -> Callable[[PassFn], PassFn]:
    """Decorator: register ``fn`` as pass ``name`` (first docstring line = description).

    Raises:
        ValueError: ``name`` is already registered.
    """

    def wrap(fn: PassFn) -> PassFn:
        if name in PASSES:
            raise ValueError(f"pass {name!r} is already registered by {PASSES[name].fn.__module__}")
        doc = (fn.__doc__ or "").strip().splitlines()
        PASSES[name] = Pass(name, fn, tolerance, doc[0] if doc else "")
        return fn

    return wrap
