"""Token reduction methods as patches of timm Vision Transformers.

A method is a class registered under its paper's short name. ``create_method("tome", r=13)`` builds
one; ``method.schedule(layout)`` turns its parameters into a static :class:`Schedule`, and
``method.apply(model, schedule)`` returns a patched copy (the original stays dense).
Adding a method is one new module (registering itself through :mod:`._registry`) plus one import
line at the bottom of this file.
"""

from __future__ import annotations

from ._registry import METHODS, SchedulePlan, TokenLayout, create_method, register_method
from .schedule import Schedule, ScheduleError, parse_r

from . import evit, tome, topk  # noqa: F401  (register "evit", "tome", "topk")
from . import evit_mass  # noqa: F401  (registers "evit-mass")
from . import cluster, expedite  # noqa: F401  (register "dpc-knn", "kmedoids", "expedite")
from . import eva  # noqa: F401  (registers the patch of timm's Eva for tome / evit / topk)

__all__ = ["METHODS", "Schedule", "SchedulePlan", "ScheduleError", "TokenLayout", "create_method", "parse_r", "register_method"]
