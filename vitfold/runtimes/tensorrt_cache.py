"""TensorRT engine cache: what makes an engine valid, where it lives, when it is rebuilt. No TensorRT import.

A serialized engine is valid only on the TensorRT version, GPU (name and compute capability) and
platform (Jetson module / L4T release, or a discrete GPU on a given host architecture) that built it,
and only for the exact ONNX bytes and build settings (precision, optimisation profiles, builder
optimisation level, workspace, network/builder flags, plugin libraries). All of these go into
:func:`engine_cache_key`; the cache stores them beside the engine and checks them again on load, so a
hash collision or a hand-copied entry cannot hand out an engine built elsewhere.

Layout under the cache root::

    tensorrt/engines/<key>/engine.plan     the serialized engine
    tensorrt/engines/<key>/key.json        the fields the key was derived from
    tensorrt/timing/<device key>.cache     timing cache, one per TensorRT version + GPU + platform
"""

from __future__ import annotations

import hashlib
import json
import os
import platform as _platform
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

CACHE_SCHEMA = 1
#: Fields that tie an engine (and a timing cache) to a machine; the rest tie it to a model and settings.
DEVICE_FIELDS = ("tensorrt", "gpu", "compute_capability", "platform")
ENGINE_FIELDS = DEVICE_FIELDS + (
    "onnx_sha256", "precision", "profiles", "builder_optimization_level", "workspace_bytes", "plan", "plugins",
)
PLAN, KEY = "engine.plan", "key.json"


def detect_platform(root: Path = Path("/")) -> dict:
    """Jetson (module name and L4T release) or discrete GPU host (CPU architecture).

    Jetson is recognised by ``/etc/nv_tegra_release`` (e.g. ``# R36 (release), REVISION: 3.0, ...``
    -> ``R36.3.0``) or a ``/proc/device-tree/model`` naming NVIDIA / Jetson.

    Args:
        root: filesystem root to look under (tests pass a fake one).
    """
    release, model = root / "etc" / "nv_tegra_release", root / "proc" / "device-tree" / "model"
    model_text = _read(model).replace("\x00", "").strip()
    release_text = _read(release)
    if release_text or re.search(r"nvidia|jetson", model_text, re.I):
        match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release_text)
        return {"kind": "jetson", "model": model_text, "l4t": f"R{match.group(1)}.{match.group(2)}" if match else ""}
    return {"kind": "discrete", "machine": _platform.machine()}


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _digest(fields: Mapping[str, Any]) -> str:
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(f"vitfold-trt-cache/{CACHE_SCHEMA}\n{text}".encode()).hexdigest()[:32]


def engine_cache_key(fields: Mapping[str, Any]) -> str:
    """The cache key (32 hex chars) of an engine described by ``fields`` (all of :data:`ENGINE_FIELDS`).

    Raises:
        ValueError: a field is missing (a key over fewer fields would hand out engines that do not fit).
    """
    missing = [name for name in ENGINE_FIELDS if name not in fields]
    if missing:
        raise ValueError(f"engine cache key needs {', '.join(missing)}")
    return _digest({name: fields[name] for name in ENGINE_FIELDS})


def device_key(fields: Mapping[str, Any]) -> str:
    """Key over :data:`DEVICE_FIELDS` only: names the timing cache shared by all models on this machine."""
    return _digest({name: fields[name] for name in DEVICE_FIELDS})


def engine_mismatch(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Why an engine recorded with ``recorded`` fields cannot run here (``current``); empty if it can.

    Only :data:`DEVICE_FIELDS` are compared: they are what the serialized engine depends on at load.
    """
    return [
        f"{name}: engine built with {recorded.get(name)!r}, this machine has {current.get(name)!r}"
        for name in DEVICE_FIELDS
        if recorded.get(name) != current.get(name)
    ]


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EngineCache:
    """Engines and timing caches under ``root/tensorrt`` (layout in the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser() / "tensorrt"

    def entry(self, key: str) -> Path:
        return self.root / "engines" / key

    def load(self, key: str, fields: Mapping[str, Any]) -> tuple[Optional[bytes], str]:
        """The cached plan for ``key``, or None and the reason (missing, unreadable, fields differ)."""
        entry = self.entry(key)
        if not (entry / PLAN).is_file():
            return None, "not cached"
        try:
            recorded = json.loads((entry / KEY).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            return None, f"cache entry {entry} has no readable {KEY} ({exc})"
        differ = sorted(name for name in ENGINE_FIELDS if recorded.get(name) != _plain(fields.get(name)))
        if differ:
            return None, f"cache entry {entry} was recorded for other {', '.join(differ)}"
        return (entry / PLAN).read_bytes(), "cached"

    def store(self, key: str, fields: Mapping[str, Any], plan: bytes) -> Path:
        """Write ``plan`` and its fields atomically (plan first, key last: no key without its plan)."""
        entry = self.entry(key)
        _atomic_write(entry / PLAN, plan)
        _atomic_write(entry / KEY, (json.dumps(_plain(dict(fields)), indent=2, sort_keys=True) + "\n").encode())
        return entry / PLAN

    def evict(self, key: str) -> None:
        shutil.rmtree(self.entry(key), ignore_errors=True)

    def timing_cache(self, fields: Mapping[str, Any]) -> Path:
        """Where the timing cache for this TensorRT version + GPU + platform lives."""
        return self.root / "timing" / f"{device_key(fields)}.cache"

    def save_timing_cache(self, fields: Mapping[str, Any], data: bytes) -> Path:
        path = self.timing_cache(fields)
        _atomic_write(path, data)
        return path


def _plain(value):
    """``value`` as it reads back from JSON (tuples -> lists), so recorded and current fields compare."""
    return json.loads(json.dumps(value, default=list)) if value is not None else None


@dataclass
class CachedEngine:
    """An engine ready to run, its serialized plan, and where it came from (``cache`` / ``built``)."""

    engine: Any
    plan: bytes
    source: str
    reason: str


def cached_engine(
    cache: Optional[EngineCache],
    fields: Mapping[str, Any],
    deserialize: Callable[[bytes], Any],
    build: Callable[[], bytes],
) -> CachedEngine:
    """Return the cached engine for ``fields`` if it deserializes, else build, store and return one.

    A cached plan that fails to deserialize (``deserialize`` returns None or raises) or whose recorded
    fields differ is evicted and rebuilt, never used.

    Args:
        cache: where engines live; None disables caching (always build).
        fields: the engine's :data:`ENGINE_FIELDS`.
        deserialize: plan bytes -> engine object, or None when TensorRT rejects the plan.
        build: builds and returns a plan (bytes).

    Raises:
        RuntimeError: a freshly built plan does not deserialize (a TensorRT bug or out of memory).
    """
    key = engine_cache_key(fields)
    reason = "cache disabled"
    if cache is not None:
        plan, reason = cache.load(key, fields)
        if plan is not None:
            try:
                engine = deserialize(plan)
            except Exception as exc:  # TensorRT raises on some corrupt plans instead of returning None
                engine, reason = None, f"cached engine failed to deserialize ({type(exc).__name__}: {exc})"
            else:
                reason = "cached engine failed to deserialize" if engine is None else reason
            if engine is not None:
                return CachedEngine(engine, plan, "cache", reason)
        if reason != "not cached":
            cache.evict(key)
    plan = build()
    engine = deserialize(plan)
    if engine is None:
        raise RuntimeError("TensorRT could not deserialize the engine it just built; see the TensorRT log above")
    if cache is not None:
        cache.store(key, fields, plan)
    return CachedEngine(engine, plan, "built", reason)
