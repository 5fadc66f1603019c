"""Native kernels: vitfold's fused reduction ops as backend extensions, compiled on the user's machine.

For OpenVINO: ``openvino/tome_op.cpp`` defines ``vitfold.ToMeMerge``, ToMe's metric (the keys' head
mean), bipartite matching and sum merge (about 30 ONNX nodes per reduction site in the graph form) as
one operation; ``openvino/prune_op.cpp`` defines ``vitfold.EViTPrune``, EViT's and Top-K's top-k of
the class attention, row gather and inattentive-token fusion (about 15 nodes); both with the ONNX
frontend mapping for nodes of domain ``vitfold``. ToMe's kernels are vectorised for AVX-512, AVX2 and generic vectors (SSE, NEON), picked at run time
(``VITFOLD_NATIVE_ISA=avx2|generic`` caps the choice, for tests). It is compiled with CMake against the
headers and CMake config that the ``openvino`` wheel ships (cmake, a C++17 compiler; ninja when
present), on first use by ``build --fused-ops`` or ahead of time with ``python -m vitfold.native``,
into a cache keyed by the OpenVINO version and the source's hash. Builds that use it carry a copy.

Nothing else depends on it: without a compiler every build exports and runs the graph form.
Torch-free (the device side may build it too).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import BackendUnavailable

SOURCE = Path(__file__).resolve().parent / "openvino"
#: The file name of the built OpenVINO extension (in the cache and in a build folder).
LIBRARY = "libvitfold_ov_ops.so"
#: ONNX domain and op types of the fused sites (:func:`vitfold.passes.fuse_sites.fuse_sites`): ToMe's
#: matching and merge, EViT's / Top-K's top-k and fusion.
DOMAIN, TOME_OP, PRUNE_OP = "vitfold", "ToMeMerge", "EViTPrune"
#: Node-name prefixes of a site's nodes in an export, ``vitfold.<kind>.<block>/`` (:func:`vitfold.export.onnx.tag_sites`).
TOME_SITE_PREFIX, PRUNE_SITE_PREFIX = "vitfold.tome_site.", "vitfold.prune_site."
SITE_PREFIXES = (TOME_SITE_PREFIX, PRUNE_SITE_PREFIX)


class NativeUnavailable(BackendUnavailable):
    """The native extension cannot be built or loaded here; the message says what is missing and the fix."""


def _source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(SOURCE.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def cache_dir() -> Path:
    """Where the extension for this OpenVINO and this source lives: ``$VITFOLD_CACHE`` (default
    ``~/.cache/vitfold``) ``/native/openvino-<version>-<source hash>``."""
    import openvino

    root = Path(os.environ.get("VITFOLD_CACHE") or Path.home() / ".cache" / "vitfold")
    version = openvino.get_version().split("-")[0]
    return root / "native" / f"openvino-{version}-{_source_hash()}"


def openvino_ops(*, build: bool = True, log: Callable[[str], None] = lambda msg: None) -> Path:
    """The OpenVINO extension library, compiled into :func:`cache_dir` if it is not there yet.

    The build goes to a temporary folder beside the cache entry and is renamed into place, so a
    failed or concurrent build never leaves a half-written library.

    Raises:
        NativeUnavailable: not Linux, openvino missing, no cmake / C++ compiler, the compile failed,
            or ``build`` is False and nothing is cached.
    """
    if not sys.platform.startswith("linux"):
        raise NativeUnavailable(f"fused ops are built for Linux only (this is {sys.platform}); build without --fused-ops")
    try:
        import openvino
    except ImportError as exc:
        raise NativeUnavailable(f"fused ops extend OpenVINO, which is not installed ({exc}); pip install \"vitfold[openvino]\"") from exc
    target = cache_dir()
    library = target / LIBRARY
    if library.is_file():
        return library
    if not build:
        raise NativeUnavailable(f"the OpenVINO extension is not built ({library} missing); run: python -m vitfold.native")
    missing = [tool for tool in ("cmake",) if shutil.which(tool) is None]
    if shutil.which("c++") is None and shutil.which("g++") is None and not os.environ.get("CXX"):
        missing.append("a C++17 compiler (g++)")
    if missing:
        raise NativeUnavailable(f"--fused-ops compiles an OpenVINO extension and needs {' and '.join(missing)} on PATH; "
                                f"install them, or build without --fused-ops (the graph form)")
    config = Path(openvino.__file__).parent / "cmake"
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"native: compiling the OpenVINO extension into {target} (once per OpenVINO version)")
    with tempfile.TemporaryDirectory(prefix=target.name + ".", dir=target.parent) as tmp:
        work = Path(tmp)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        steps = (["cmake", "-S", str(SOURCE), "-B", str(work / "build"), *generator, f"-DOpenVINO_DIR={config}",
                  "-DCMAKE_BUILD_TYPE=Release"],
                 ["cmake", "--build", str(work / "build"), "--parallel"])
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                raise NativeUnavailable(f"compiling the OpenVINO extension failed ({' | '.join(tail)}); "
                                        f"build without --fused-ops, or fix the toolchain and run: python -m vitfold.native")
        built = next((work / "build").glob("libvitfold_ov_ops*.so"), None)
        if built is None:
            raise NativeUnavailable("compiling the OpenVINO extension produced no library; build without --fused-ops")
        staged = work / "out"
        staged.mkdir()
        shutil.copy2(built, staged / LIBRARY)
        try:
            staged.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not library.is_file():
                raise
    return library


def load_openvino_ops(core, library: Path) -> None:
    """Register the extension ``library`` with an ``openvino.Core`` (before it reads a model using it).

    Raises:
        NativeUnavailable: the library is missing or does not load (built for another OpenVINO or CPU).
    """
    library = Path(library)
    if not library.is_file():
        raise NativeUnavailable(f"the build's OpenVINO extension {library} is missing; rebuild, or build without --fused-ops")
    try:
        core.add_extension(str(library))
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses with the loader's message
        raise NativeUnavailable(f"the OpenVINO extension {library.name} does not load here ({str(exc).strip().splitlines()[0]}); "
                                f"it is built per machine and OpenVINO version: rebuild on this machine") from exc
