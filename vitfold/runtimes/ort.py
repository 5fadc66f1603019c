"""ONNX Runtime backend (CPU execution provider by default). Imports only onnxruntime + numpy."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import BuildConfig, Session

ARTIFACT = "model.ort.onnx"
#: The graph ONNX Runtime actually runs (all optimisations, this CPU), saved by a profiling session.
PROFILED_GRAPH = "profiled.ort.onnx"
#: IR version vitfold stamps on every model it writes. onnx 1.23 stamps 14, which ONNX Runtime 1.31
#: refuses (it loads <= 13, measured in tests/test_lint.py); 10 (onnx 1.16) keeps artifacts loadable
#: by the older ONNX Runtime and OpenVINO builds that ship on devices, and opset 18 needs only IR 8.
MAX_IR_VERSION = 10


def _ort():
    from . import require

    return require("onnxruntime", "pip install onnxruntime")


def session_options(cfg: BuildConfig, optimized_path: Path | None = None, extension: Path | None = None):
    """Session options with every speed setting explicit (threads, sequential execution); ``extension``:
    vitfold's custom-op library (a ``--fused-ops`` build), registered here.

    Raises:
        NativeUnavailable: ``extension`` is missing or does not load.
    """
    ort = _ort()
    options = ort.SessionOptions()
    if extension is not None:
        from ..native import load_onnxruntime_ops

        load_onnxruntime_ops(options, extension)
    options.intra_op_num_threads = cfg.resolved_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle worker threads sleep instead of spinning. Alone, a session runs as fast either way (DeiT-S
    # batch 1, 2 threads: 39-43 ms spinning, 41-42 ms not); but the profiles and benchmarks interleave
    # sessions, and each session's spinning workers then take the cores from the next (measured: the
    # dense model at 77 ms instead of 49 ms, ToMe r=13 at 58 instead of 37).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    if optimized_path is not None:
        # Extended (not "all") keeps the saved graph portable across CPUs; layout-specific
        # rewrites are redone at load time.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized_path)
    else:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def providers() -> list[str]:
    return ["CPUExecutionProvider"]


def build(onnx_path: Path, out_dir: Path, cfg: BuildConfig) -> dict:
    """Optimise ``onnx_path`` with ONNX Runtime and save it as ``model.ort.onnx`` in ``out_dir``.

    A ``--fused-ops`` graph (``vitfold`` nodes) is optimised with vitfold's custom-op library
    (:func:`vitfold.native.onnxruntime_ops`) registered, and the build carries a copy (``extension``).

    Raises:
        BackendUnavailable: onnxruntime is not installed (NativeUnavailable: the fused graph's library
            cannot be built or loaded).
        SpecError: precision other than f32 or int8 (ONNX Runtime runs the graph's own precision: int8
            is a Q/DQ graph from :mod:`vitfold.quantize.qdq`).
    """
    from ..errors import SpecError

    ort = _ort()
    if cfg.precision not in ("f32", "int8"):
        raise SpecError("ONNX Runtime CPU runs the graph's precision; use --precision f32 or int8 with --backend onnxruntime")
    files = {"backend": ARTIFACT}
    library = None
    if cfg.extra.get("fused_ops") and _has_fused_ops(Path(onnx_path)):  # the dense twin has no site
        from ..native import ONNXRUNTIME_LIBRARY, onnxruntime_ops

        library = Path(out_dir) / ONNXRUNTIME_LIBRARY
        shutil.copy2(onnxruntime_ops(), library)
        files["extension"] = ONNXRUNTIME_LIBRARY
    ort.InferenceSession(str(onnx_path), session_options(cfg, out_dir / ARTIFACT, library), providers=providers())
    return {"files": files, "versions": {"onnxruntime": ort.__version__}}


def _has_fused_ops(path: Path) -> bool:
    """Whether the ONNX graph at ``path`` holds a node of vitfold's domain (a fused site)."""
    import onnx

    from ..native import DOMAIN

    return any(node.domain == DOMAIN for node in onnx.load(str(path), load_external_data=False).graph.node)


class OrtSession(Session):
    backend = "onnxruntime"

    def __init__(self, path: Path, cfg: BuildConfig, profile_dir: Path | None = None, extension: Path | None = None):
        ort = _ort()
        options = session_options(cfg, extension=extension)
        if profile_dir is not None:  # per-node profiler trace + the graph it refers to (see profile_layers)
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(profile_dir) / "ort_profile")
            options.optimized_model_filepath = str(Path(profile_dir) / PROFILED_GRAPH)
        self._session = ort.InferenceSession(str(path), options, providers=providers())
        inputs = self._session.get_inputs()
        settings = {
            "backend": self.backend,
            "onnxruntime": ort.__version__,
            "providers": self._session.get_providers(),
            "intra_op_threads": cfg.resolved_threads,
            "inter_op_threads": 1,
            "intra_op_spinning": False,
            "precision": cfg.precision,
            "graph_optimization": "all",
        }
        super().__init__(inputs[0].name, tuple(inputs[0].shape), [o.name for o in self._session.get_outputs()], settings)

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        values = self._session.run(self.output_names, {self.input_name: images})
        return dict(zip(self.output_names, values))


def _extension(directory: Path, manifest: dict) -> Path | None:
    """The build's custom-op library (a ``--fused-ops`` build), or None."""
    name = manifest["files"].get("extension")
    return Path(directory) / name if name else None


def load(directory: Path, manifest: dict) -> Session:
    return OrtSession(Path(directory) / manifest["files"]["backend"], BuildConfig.from_json(manifest["build"]),
                      extension=_extension(directory, manifest))


def run_onnx(path: Path, batches: Sequence[np.ndarray], threads: int | None = None) -> list[dict[str, np.ndarray]]:
    """Run an ONNX file on each ``[B, 3, H, W]`` batch with one CPU session (export checks, passes)."""
    session = OrtSession(Path(path), BuildConfig(backend="onnxruntime", threads=threads))
    return [session._run(np.ascontiguousarray(batch, dtype=np.float32)) for batch in batches]


def profile_layers(directory: Path, manifest: dict, images: np.ndarray, *, warmup: int = 5, runs: int = 20) -> dict:
    """Run a build with ONNX Runtime's profiler (``SessionOptions.enable_profiling``) on ``images``.

    The JSON trace from ``end_profiling()`` holds one ``<node>_kernel_time`` event per node and run,
    named after the nodes of the graph ONNX Runtime runs after its own fusions; that graph is saved
    beside the trace and read (with ``onnx``) for each node's inputs, the topology fallback for
    nodes ONNX Runtime created.

    Returns:
        ``{"layers": [{name, type, ms, kernel_ms, origins, inputs}, ...], "run_ms": [wall ms per timed
        run], "settings": {...}}``: per node, the mean over the timed runs of ``kernel_ms`` (the
        kernel alone) and ``ms`` (plus the executor's gap since the previous kernel); wall time is
        ``perf_counter`` around ``run`` (profiler on).
    """
    import json
    import tempfile
    import time

    import onnx

    images = np.ascontiguousarray(images, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="vitfold-ort-profile-") as tmp:
        session = OrtSession(Path(directory) / manifest["files"]["backend"], BuildConfig.from_json(manifest["build"]),
                             profile_dir=Path(tmp), extension=_extension(directory, manifest))
        for _ in range(warmup):
            session(images)
        run_ms = []
        for _ in range(runs):
            t0 = time.perf_counter_ns()
            session(images)
            run_ms.append((time.perf_counter_ns() - t0) / 1e6)
        trace = json.loads(Path(session._session.end_profiling()).read_text())
        graph = onnx.load(str(Path(tmp) / PROFILED_GRAPH), load_external_data=False).graph
    producer = {out: node.name for node in graph.node for out in node.output}
    inputs = {node.name: tuple(producer[t] for t in node.input if t in producer) for node in graph.node}
    model_runs = sorted((e for e in trace if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])
    nodes = sorted((e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")), key=lambda e: e["ts"])
    per_run = []
    for run in model_runs[warmup:]:
        start, end = run["ts"], run["ts"] + run["dur"]
        events = [e for e in nodes if start <= e["ts"] <= end]
        records, previous_end = [], start
        for e in events:
            name = e["name"][: -len("_kernel_time")] if e["name"].endswith("_kernel_time") else e["name"]  # 3.8: no removesuffix
            # A node's time is its kernel plus the executor's gap since the previous kernel ended
            # (dispatch, output allocation): about 5% of a run, real time spent on that node.
            records.append({"name": name, "type": e["args"].get("op_name", ""), "kernel_ms": e["dur"] / 1e3,
                            "ms": (e["ts"] + e["dur"] - previous_end) / 1e3, "origins": (), "inputs": inputs.get(name, ())})
            previous_end = e["ts"] + e["dur"]
        per_run.append(records)
    totals: dict[str, list[float]] = {}
    for records in per_run:
        for record in records:
            total = totals.setdefault(record["name"], [0.0, 0.0])
            total[0] += record["ms"]
            total[1] += record["kernel_ms"]
    layers = [{**r, "ms": totals[r["name"]][0] / len(per_run), "kernel_ms": totals[r["name"]][1] / len(per_run)}
              for r in per_run[0]]
    return {"layers": layers, "run_ms": run_ms, "settings": {**session.settings, "profiler": True}}
