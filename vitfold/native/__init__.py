"""Native kernels: vitfold's fused reduction ops as backend extensions, compiled on the user's machine.

For OpenVINO: ``openvino/tome_op.cpp`` defines ``vitfold.ToMeMerge``, ToMe's metric (the keys' head
mean), bipartite matching and sum merge (about 30 ONNX nodes per reduction site in the graph form) as
one operation, and ``vitfold.ToMeMergeWavg``, the same with ToMe's size weighting (``merge_wavg``) inside
(five graph nodes fewer per site; OpenVINO and ONNX Runtime builds, f32 and int8); ``openvino/prune_op.cpp`` defines ``vitfold.EViTPrune``, EViT's and Top-K's top-k of
the class attention, row gather and inattentive-token fusion (about 15 nodes); both with the ONNX
frontend mapping for nodes of domain ``vitfold``. ToMe's kernels are vectorised for AVX-512, AVX2 and generic vectors (SSE, NEON), picked at run time
(``VITFOLD_NATIVE_ISA=avx2|generic`` caps the choice, for tests). It is compiled with CMake against the
headers and CMake config that the ``openvino`` wheel ships (cmake, a C++17 compiler; ninja when
present), on first use by ``build --fused-ops`` or ahead of time with ``python -m vitfold.native``,
into a cache keyed by the OpenVINO version and the source's hash. Builds that use it carry a copy.

For ONNX Runtime: ``onnxruntime/`` defines the same three ops for the CPU execution provider, a custom-op
library (``RegisterCustomOps``, domain ``vitfold``) on ONNX Runtime's C API alone, running the OpenVINO
ops' host kernels (``kernels/``; images on ONNX Runtime's intra-op threads). :func:`onnxruntime_ops`
compiles it against ONNX Runtime's C API header, which the pip wheel does not ship (``ONNXRUNTIME_ROOT``:
a release archive), and :func:`load_onnxruntime_ops` registers it with a session's options.

For TensorRT 10+: ``tensorrt/`` holds ``ToMeMerge`` and ``EViTPrune`` as IPluginV3 plugins in one
library (CUDA kernels, creators, the library entry point ``getCreators``) whose GPU-free cores
(``tome_plugin_core.h``, ``prune_plugin_core.h``: attributes, serialisation, shape inference,
workspace, the steps the kernels run) are tested on any machine.
:func:`tensorrt_plugin` compiles it on the GPU machine (nvcc and the TensorRT headers). It has not run
on a GPU in this project yet; a build that uses it checks it against the graph form like the OpenVINO op.

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
TENSORRT_SOURCE = Path(__file__).resolve().parent / "tensorrt"
ONNXRUNTIME_SOURCE = Path(__file__).resolve().parent / "onnxruntime"
#: The host kernels that the OpenVINO extension and the ONNX Runtime library share.
KERNELS_SOURCE = Path(__file__).resolve().parent / "kernels"
#: The file name of the built OpenVINO extension (in the cache and in a build folder).
LIBRARY = "libvitfold_ov_ops.so"
#: The file name of the built TensorRT plugin library (in the cache and in a build folder).
TENSORRT_LIBRARY = "libvitfold_trt_plugin.so"
#: The file name of the built ONNX Runtime custom-op library (in the cache and in a build folder).
ONNXRUNTIME_LIBRARY = "libvitfold_ort_ops.so"
#: Largest output change fused sites may cause against the graph form on the same backend and precision,
#: relative to the outputs' scale (their max abs, at least 1): the same token choices give the same sums
#: up to their order. Measured: 0 for every OpenVINO op and for ONNX Runtime's ToMe / Top-K; EViT's fused
#: token on ONNX Runtime 5.2e-6 on DINOv2 features of max abs 6.8 (ONNX Runtime's ReduceSum adds in
#: another order at batch > 1). Another token choice moves outputs by a good part of their scale.
#: Checked at every build.
FUSED_TOLERANCE = 1e-5
#: The fused ops the TensorRT plugin library implements.
TENSORRT_OPS = ("ToMeMerge", "EViTPrune")
#: Backend -> the precisions fused ops build at: the kernels are float32; int8 quantizes the rest as the
#: graph form's (OpenVINO: NNCF on the fused graph; ONNX Runtime: its Q/DQ graph, then fused). TensorRT:
#: vitfold's plugins, f32.
FUSED_TARGETS = {"openvino": ("f32", "int8"), "onnxruntime": ("f32", "int8"), "tensorrt": ("f32",)}
#: ONNX domain and op types of the fused sites (:func:`vitfold.passes.fuse_sites.fuse_sites`): ToMe's
#: matching and merge, the same with the size weighting inside, EViT's / Top-K's top-k and fusion.
DOMAIN, TOME_OP, TOME_WAVG_OP, PRUNE_OP = "vitfold", "ToMeMerge", "ToMeMergeWavg", "EViTPrune"
#: The backends whose fused ToMe sites take the size weighting inside (``ToMeMergeWavg``; five graph nodes
#: fewer per site), at f32 and int8: the op rounds as each one's graph form, so the quantizer sees the same
#: graph and the outputs stay identical. TensorRT's plugins implement ``ToMeMerge`` alone.
WEIGHTED_BACKENDS = ("openvino", "onnxruntime")
#: Node-name prefixes of a site's nodes in an export, ``vitfold.<kind>.<block>/`` (:func:`vitfold.export.onnx.tag_sites`).
TOME_SITE_PREFIX, PRUNE_SITE_PREFIX = "vitfold.tome_site.", "vitfold.prune_site."
SITE_PREFIXES = (TOME_SITE_PREFIX, PRUNE_SITE_PREFIX)


class NativeUnavailable(BackendUnavailable):
    """The native extension cannot be built or loaded here; the message says what is missing and the fix."""


def check_fused_outputs(expected: dict, got: dict, where: str, backend: str) -> float:
    """The largest change (max abs) of a fused build's outputs ``got`` against its graph form's
    ``expected`` (name -> array), on the same backend and batch; the build stops above
    :data:`FUSED_TOLERANCE` times the outputs' scale (``expected``'s max abs, at least 1): the token
    choices differ. ``where`` names the build in the message.

    Raises:
        FidelityError: a change above the tolerance.
    """
    import numpy as np

    from ..errors import FidelityError

    change = max(float(np.abs(expected[name].astype(np.float64) - got[name]).max()) for name in expected)
    limit = FUSED_TOLERANCE * max([1.0] + [float(np.abs(value).max()) for value in expected.values()])
    if not change <= limit:
        raise FidelityError(f"{where}the fused sites moved the outputs by {change:.3g} (max abs) against the graph form "
                            f"on {backend}, above {limit:.3g} ({FUSED_TOLERANCE:g} of their scale): the token choices "
                            f"differ; build without --fused-ops")
    return change


def _source_hash(*sources: Path) -> str:
    """The first 12 hex digits of the SHA-256 over the files of the folders ``sources`` (default: the
    OpenVINO extension's and the shared kernels'), by name and content."""
    digest = hashlib.sha256()
    for source in sources or (SOURCE, KERNELS_SOURCE):
        for path in sorted(source.iterdir()):
            digest.update(source.name.encode() + b"/" + path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def cache_dir() -> Path:
    """Where the extension for this OpenVINO and this source lives: ``$VITFOLD_CACHE`` (default
    ``~/.cache/vitfold``) ``/native/openvino-<version>-<source hash>``."""
    import openvino

    version = openvino.get_version().split("-")[0]
    return _cache_root() / f"openvino-{version}-{_source_hash()}"


def _cache_root() -> Path:
    """``$VITFOLD_CACHE`` (default ``~/.cache/vitfold``) ``/native``: one folder per library, backend version and source."""
    return Path(os.environ.get("VITFOLD_CACHE") or Path.home() / ".cache" / "vitfold") / "native"


def _require_cmake_and_cxx(what: str) -> None:
    """Raises NativeUnavailable naming what ``--fused-ops`` needs on PATH to compile ``what`` (cmake, a C++17 compiler)."""
    missing = [tool for tool in ("cmake",) if shutil.which(tool) is None]
    if shutil.which("c++") is None and shutil.which("g++") is None and not os.environ.get("CXX"):
        missing.append("a C++17 compiler (g++)")
    if missing:
        raise NativeUnavailable(f"--fused-ops compiles {what} and needs {' and '.join(missing)} on PATH; "
                                f"install them, or build without --fused-ops (the graph form)")


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
    _require_cmake_and_cxx("an OpenVINO extension")
    config = Path(openvino.__file__).parent / "cmake"
    log(f"native: compiling the OpenVINO extension into {target} (once per OpenVINO version)")
    return _cmake_build(SOURCE, target, LIBRARY, "libvitfold_ov_ops*.so", [f"-DOpenVINO_DIR={config}"],
                        "the OpenVINO extension", "build without --fused-ops, or fix the toolchain and run: python -m vitfold.native")


def _cmake_build(source: Path, target: Path, name: str, pattern: str, defines: list[str], what: str, fix: str) -> Path:
    """Configure and build ``source`` with CMake in a temporary folder beside ``target`` and rename the
    library matching ``pattern`` into ``target / name``: a failed or concurrent build never leaves a
    half-written library.

    Raises:
        NativeUnavailable: a CMake step failed (its last lines and ``fix`` in the message) or built nothing.
    """
    library = target / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=target.name + ".", dir=target.parent) as tmp:
        work = Path(tmp)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        steps = (["cmake", "-S", str(source), "-B", str(work / "build"), *generator, *defines, "-DCMAKE_BUILD_TYPE=Release"],
                 ["cmake", "--build", str(work / "build"), "--parallel"])
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                tail = " ".join((done.stderr or done.stdout).split())[-600:]
                raise NativeUnavailable(f"compiling {what} failed ({tail}); {fix}")
        built = next((work / "build").glob(pattern), None)
        if built is None:
            raise NativeUnavailable(f"compiling {what} produced no library; {fix}")
        staged = work / "out"
        staged.mkdir()
        shutil.copy2(built, staged / name)
        try:
            staged.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not library.is_file():
                raise
    return library


def tensorrt_plugin(*, build: bool = True, log: Callable[[str], None] = lambda msg: None) -> Path:
    """The TensorRT plugin library (``ToMeMerge``, ``EViTPrune``; IPluginV3), compiled into the cache if it is not there
    yet: ``$VITFOLD_CACHE/native/tensorrt-<version>-<source hash>``. It is built on the machine that runs
    it (a Jetson, a GPU workstation) for its GPU, with nvcc and the TensorRT 10+ headers (JetPack's, or
    ``TensorRT_ROOT`` naming an install or a github.com/NVIDIA/TensorRT checkout; the pip wheels ship none).

    Raises:
        NativeUnavailable: not Linux, tensorrt missing or older than 10, no cmake / nvcc, headers not
            found (the CMake message says where it looked), or ``build`` is False and nothing is cached.
    """
    if not sys.platform.startswith("linux"):
        raise NativeUnavailable(f"the TensorRT plugin is built for Linux only (this is {sys.platform}); build without --fused-ops")
    try:
        import tensorrt
    except ImportError as exc:
        raise NativeUnavailable(f"the fused ops' TensorRT plugin is built against the installed TensorRT, which is missing "
                                f"({exc}); build without --fused-ops") from exc
    version = tensorrt.__version__
    if int(version.split(".")[0]) < 10:
        raise NativeUnavailable(f"the fused ops' TensorRT plugin implements IPluginV3 (TensorRT 10+); this is TensorRT "
                                f"{version}: build without --fused-ops")
    target = _cache_root() / f"tensorrt-{version}-{_source_hash(TENSORRT_SOURCE)}"
    library = target / TENSORRT_LIBRARY
    if library.is_file():
        return library
    if not build:
        raise NativeUnavailable(f"the TensorRT plugin is not built ({library} missing); run: python -m vitfold.native tensorrt")
    missing = [tool for tool in ("cmake", "nvcc") if shutil.which(tool) is None]
    if missing:
        raise NativeUnavailable(f"--fused-ops on TensorRT compiles vitfold's plugin and needs {' and '.join(missing)} on PATH "
                                f"(the CUDA toolkit); install them, or build without --fused-ops (the graph form)")
    defines = [f"-DTensorRT_ROOT={os.environ['TensorRT_ROOT']}"] if os.environ.get("TensorRT_ROOT") else []
    log(f"native: compiling the TensorRT plugin into {target} (once per TensorRT version)")
    return _cmake_build(TENSORRT_SOURCE, target, TENSORRT_LIBRARY, "libvitfold_trt_plugin*.so", defines,
                        "the TensorRT plugin", "set TensorRT_ROOT to the TensorRT headers, or build without --fused-ops")


def onnxruntime_ops(*, build: bool = True, log: Callable[[str], None] = lambda msg: None) -> Path:
    """The ONNX Runtime custom-op library (``vitfold.ToMeMerge``, ``vitfold.EViTPrune`` on the CPU execution
    provider, the OpenVINO ops' host kernels), compiled into the cache if it is not there yet:
    ``$VITFOLD_CACHE/native/onnxruntime-<version>-<source hash>``. It needs ONNX Runtime's C API header,
    which the pip wheel does not ship: ``ONNXRUNTIME_ROOT`` naming an ONNX Runtime release archive
    (``onnxruntime-linux-x64-<version>.tgz`` from its GitHub releases), an install prefix or a source
    checkout, else a system install (``/usr/include/onnxruntime``). Any header of API 17+ serves: the
    library asks ONNX Runtime (1.17+) for API 17 and links nothing of it.

    Raises:
        NativeUnavailable: not Linux, onnxruntime missing, no cmake / C++ compiler, no header found (the
            CMake message says where to point ``ONNXRUNTIME_ROOT``), the compile failed, or ``build`` is
            False and nothing is cached.
    """
    if not sys.platform.startswith("linux"):
        raise NativeUnavailable(f"fused ops are built for Linux only (this is {sys.platform}); build without --fused-ops")
    try:
        import onnxruntime
    except ImportError as exc:
        raise NativeUnavailable(f"fused ops extend ONNX Runtime, which is not installed ({exc}); pip install onnxruntime") from exc
    target = _cache_root() / f"onnxruntime-{onnxruntime.__version__}-{_source_hash(ONNXRUNTIME_SOURCE, KERNELS_SOURCE)}"
    library = target / ONNXRUNTIME_LIBRARY
    if library.is_file():
        return library
    if not build:
        raise NativeUnavailable(f"the ONNX Runtime op library is not built ({library} missing); run: python -m vitfold.native onnxruntime")
    _require_cmake_and_cxx("an ONNX Runtime custom-op library")
    defines = [f"-DONNXRUNTIME_ROOT={os.environ['ONNXRUNTIME_ROOT']}"] if os.environ.get("ONNXRUNTIME_ROOT") else []
    log(f"native: compiling the ONNX Runtime op library into {target} (once per ONNX Runtime version)")
    return _cmake_build(ONNXRUNTIME_SOURCE, target, ONNXRUNTIME_LIBRARY, "libvitfold_ort_ops*.so", defines,
                        "the ONNX Runtime op library",
                        "set ONNXRUNTIME_ROOT to an ONNX Runtime release (the pip wheel has no C API header), "
                        "or build without --fused-ops")


def load_onnxruntime_ops(options, library: Path) -> None:
    """Register the custom-op ``library`` with ``onnxruntime.SessionOptions`` (before the session is made).

    Raises:
        NativeUnavailable: the library is missing or does not load (ONNX Runtime older than 1.17, another CPU).
    """
    library = Path(library)
    if not library.is_file():
        raise NativeUnavailable(f"the build's ONNX Runtime op library {library} is missing; rebuild, or build without --fused-ops")
    try:
        options.register_custom_ops_library(str(library))
    except Exception as exc:  # onnxruntime raises its own Fail / RuntimeException with the loader's message
        raise NativeUnavailable(f"the ONNX Runtime op library {library.name} does not load here "
                                f"({str(exc).strip().splitlines()[0]}); rebuild on this machine") from exc


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
