"""Build directories: ``manifest.json`` plus the files it lists, written atomically. No torch.

A build directory holds one model variant for one backend (``model.onnx``, ``model.opt.onnx``, the
backend's files) and its manifest; a vitfold build keeps the dense twin in ``dense/`` beside it.
Directories are assembled under a temporary name next to the target and renamed into place, so an
interrupted build never leaves a half-written ``builds/<name>``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from . import __version__
from .errors import ArtifactError

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1


def sha256(path: Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: dict) -> Path:
    """Write ``manifest`` (adding schema, vitfold version and the sha256 of every listed file)."""
    directory = Path(directory)
    manifest = dict(manifest, schema=MANIFEST_SCHEMA, vitfold_version=__version__)
    manifest["sha256"] = {name: sha256(directory / name) for name in sorted(manifest.get("files", {}).values())}
    path = directory / MANIFEST
    write_text_atomic(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(directory: Path) -> dict:
    """Read and check a build directory's manifest.

    Raises:
        ArtifactError: no manifest, unreadable JSON, another schema, or a listed file missing.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a vitfold build: no {MANIFEST}. Build one with `deploy.py build`.")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); rebuild the directory") from exc
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise ArtifactError(
            f"{path} has manifest schema {manifest.get('schema')!r} (vitfold "
            f"{manifest.get('vitfold_version', '?')}); this vitfold {__version__} reads schema {MANIFEST_SCHEMA}. Rebuild it."
        )
    for name in manifest.get("files", {}).values():
        if not (directory / name).is_file():
            raise ArtifactError(f"{directory} is incomplete: {name} listed in the manifest is missing. Rebuild it.")
    return manifest


def verify_files(directory: Path, manifest: dict) -> None:
    """Check every file listed in ``manifest["files"]`` against the sha256 recorded at build time.

    Hashing reads each file once (about 0.2 s for a DeiT-S OpenVINO build: ``model.onnx``,
    ``model.opt.onnx`` and ``model.bin`` are ~88 MB each), so a device app that trusts its storage
    can skip it (``vitfold.runtimes.load(..., verify=False)``).

    Raises:
        ArtifactError: a listed file has no recorded sha256, or its bytes differ from it (naming the
            file; the fix is to rebuild).
    """
    directory = Path(directory)
    recorded = manifest.get("sha256", {})
    for name in sorted(set(manifest.get("files", {}).values())):
        if name not in recorded:
            raise ArtifactError(f"{directory / name} has no sha256 in {directory / MANIFEST}; rebuild it with `deploy.py build`")
        if sha256(directory / name) != recorded[name]:
            raise ArtifactError(f"{directory / name} does not match the sha256 in its manifest (corrupt, truncated or "
                                "edited since the build); rebuild it with `deploy.py build`")


def check_writable(directory: Path, what: str) -> None:
    """Refuse early when files cannot be created in ``directory`` (tries to create a temporary file
    there: ``os.access`` answers yes to root on a read-only mount or an immutable directory).

    Raises:
        ArtifactError: ``directory`` is not writable; ``what`` says what was going to be written.
    """
    directory = Path(directory)
    try:
        with tempfile.NamedTemporaryFile(prefix=".write-check.", dir=directory):
            pass
    except OSError as exc:
        raise ArtifactError(f"{directory} is not writable ({exc.strerror or exc}), so {what} cannot be written there; "
                            "copy the build to a writable directory first") from exc


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``:
    readers see the old file or the new one, never half of one."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.chmod(temporary, 0o644)  # mkstemp makes it private
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success replace ``target`` with it.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and ``target``
    is left as it was.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    staging.chmod(0o755)  # mkdtemp makes it private
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
