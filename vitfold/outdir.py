"""Where a build may be written: never over a user's folder, never two builds into one directory.

:func:`claim` runs before any slow work. It decides what the target directory is:

* absent, or an empty directory: a new build;
* a vitfold build (``manifest.json``) of the same request (``manifest["request_key"]``): rebuilt;
* a vitfold build of another request: replaced only with ``force``;
* anything else (a file, a non-empty directory that is not a build): refused, never deleted.

It then holds an exclusive ``flock`` on ``.<name>.lock`` beside the target (the lock file records the
holder's pid) until the build ends, so a second build into the same directory refuses at once instead
of racing it. The kernel drops the lock when a process dies, so a killed build never blocks the next
one; the next build also removes the staging directories a killed build left (``.<name>.<8 chars>.tmp``
from :func:`vitfold.artifact.atomic_directory`, and ``.<name>.old-<pid>``) and says so. No torch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .artifact import MANIFEST
from .errors import ArtifactError


@dataclass(frozen=True)
class Claim:
    """A build's target directory, locked. ``state``: ``new``, ``rebuilt`` (same request) or
    ``replaced`` (another request's build, with ``force``); ``stale``: leftovers removed."""

    target: Path
    state: str
    stale: tuple[str, ...] = ()


def _state(target: Path, request_key: str, force: bool) -> str:
    if target.is_symlink():
        raise ArtifactError(f"--out {target} is a symbolic link; give the directory it points to")
    if target.exists() and not target.is_dir():
        raise ArtifactError(f"--out {target} exists and is not a directory; choose another --out")
    if not target.exists() or not any(target.iterdir()):
        return "new"
    manifest_path = target / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"--out {target} is a non-empty directory that is not a vitfold build (no {MANIFEST}); "
                            "vitfold never deletes it: choose another --out or an empty directory")
    try:
        previous = json.loads(manifest_path.read_text()).get("request_key")
    except (OSError, ValueError, AttributeError):
        previous = None
    if previous == request_key:
        return "rebuilt"
    if force:
        return "replaced"
    raise ArtifactError(f"--out {target} holds a vitfold build of another request; pass --force to replace it, "
                        "or choose another --out")


def _lock_error(target: Path, exc: OSError) -> ArtifactError:
    reason = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied", errno.ENOTDIR: "a part of the path is a file",
              errno.EEXIST: "a part of the path is a file", errno.ENOSPC: "the disk is full"}.get(exc.errno, exc.strerror)
    return ArtifactError(f"cannot write a build to {target}: {reason}; choose another --out")


@contextlib.contextmanager
def claim(target: Path, request_key: str, *, force: bool = False,
          log: Callable[[str], None] = print) -> Iterator[Claim]:
    """Check and lock ``target`` for one build (see the module docstring); yields a :class:`Claim`.

    Raises:
        ArtifactError: ``target`` is a file, a user's folder, another request's build (without
            ``force``), being written by another build (the message gives its pid), or not writable
            (read-only file system, a file in the path, no permission).
    """
    target = Path(target).absolute()
    with _locked(target):
        state = _state(target, request_key, force)
        leftover = re.compile(rf"\.{re.escape(target.name)}\.([a-z0-9_]{{8}}\.tmp|old-\d+)")
        stale = tuple(sorted(p.name for p in target.parent.iterdir() if p.is_dir() and leftover.fullmatch(p.name)))
        for name in stale:
            shutil.rmtree(target.parent / name, ignore_errors=True)
        if stale:
            log(f"removed {len(stale)} leftover staging director{'y' if len(stale) == 1 else 'ies'} of an "
                f"interrupted build: {', '.join(stale)}")
        yield Claim(target, state, stale)


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Hold ``flock`` on ``.<name>.lock`` beside ``target``; the file is removed on release. A lock
    taken on a file that its holder removed meanwhile is dropped and taken again on the new file."""
    path = target.parent / f".{target.name}.lock"
    for _ in range(3):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")
        except OSError as exc:
            raise _lock_error(target, exc) from exc
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "?"
                raise ArtifactError(f"another build (pid {holder}) is writing {target}; wait for it to finish "
                                    "or choose another --out") from None
            try:
                same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                continue  # the previous holder removed this file while we opened it
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            return
    raise ArtifactError(f"could not lock {path}: other builds keep taking it; retry")
