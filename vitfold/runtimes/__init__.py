"""Backends behind one interface: ``build(onnx, out_dir, cfg)`` and ``load(build_dir) -> Session``.

Device apps need only this package (numpy + the backend's own library; no torch)::

    from vitfold.runtimes import load
    session = load("builds/deit_small_patch16_224-tome-r13-openvino-f32-b1")
    logits = session(images)["logits"]          # images: [B, 3, H, W] float32, preprocessed

``vitfold.images.load_images(paths, Preprocess.from_json(manifest["preprocess"]))`` prepares images
the way the manifest says.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from ..artifact import read_manifest, verify_files
from ..errors import ArtifactError, BackendUnavailable, VitfoldError
from .backends import BACKENDS, Backend, get_backend
from .base import PRECISIONS, BuildConfig, Session


def require(package: str, install_hint: str) -> ModuleType:
    """Import a backend's package or raise :class:`BackendUnavailable` with the install command."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise BackendUnavailable(f"backend package {package!r} is not installed here ({exc}); install it with: {install_hint}") from exc


def backend_module(backend: str) -> ModuleType:
    """The module of ``backend``'s record, after its ``check_available()`` where the record says it
    needs a device.

    Raises:
        SpecError: unknown backend name.
        BackendUnavailable: the backend's packages or device are missing here (checked before any
            slow step, e.g. TensorRT without a GPU).
    """
    record = get_backend(backend)
    module = record.load_module()
    if record.needs_device:
        module.check_available()
    return module


def build(onnx_path: Path, out_dir: Path, cfg: BuildConfig) -> dict:
    """Build the backend artifact for ``onnx_path`` into ``out_dir`` (created if absent); returns
    manifest entries (``files``: role -> file name, ``versions``)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return backend_module(cfg.backend).build(Path(onnx_path), Path(out_dir), cfg)


def build_session(onnx_path: Path, out_dir: Path, cfg: BuildConfig) -> Session:
    """Build ``onnx_path`` for ``cfg`` into ``out_dir`` and open it, without a build manifest: for
    benchmarks, latency curves and calibration runs, which time backend artifacts they throw away.

    Raises:
        BackendUnavailable: the backend is not installed here.
    """
    built = build(onnx_path, out_dir, cfg)
    return backend_module(cfg.backend).load(Path(out_dir), {"files": built["files"], "build": cfg.to_json()})


def load(directory: str | Path, *, verify: bool = True) -> Session:
    """Load a build directory (its manifest says which backend) into a ready :class:`Session`.

    ``verify`` checks every file the manifest lists against its recorded sha256 first (about 0.2 s
    for a DeiT-S OpenVINO build); a device app that trusts its storage can pass ``verify=False`` to
    start faster.

    Raises:
        ArtifactError: not a build directory, incomplete, from an incompatible vitfold, a file that
            does not match its sha256, or files the backend cannot load.
        BackendUnavailable: the build's backend is not installed here.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if "backend" not in manifest.get("files", {}):
        raise ArtifactError(f"{directory} was exported without its {manifest['build']['backend']} artifact "
                            f"(--export-only); build it on the device: python -m vitfold.device build {directory}")
    if verify:
        verify_files(directory, manifest)
    module = backend_module(manifest["build"]["backend"])
    try:
        return module.load(directory, manifest)
    except VitfoldError:
        raise
    except Exception as exc:  # the backend refuses files that match their hashes: say so in one line
        checked = "although its files match their sha256" if verify else "(its files were not checked against their sha256)"
        raise ArtifactError(f"{manifest['build']['backend']} cannot load the build in {directory} {checked}: "
                            f"{_one_line(exc)}; rebuild it with `deploy.py build`") from exc


def _one_line(exc: BaseException) -> str:
    """A backend exception as one short line (OpenVINO's start with a source location line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.strip().startswith("Exception from")]
    text = " ".join(lines)[:300] or "no message"
    return f"{type(exc).__name__}: {text}"


__all__ = ["BACKENDS", "PRECISIONS", "Backend", "BuildConfig", "get_backend", "Session", "backend_module", "build", "build_session", "load", "require"]
