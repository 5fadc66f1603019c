"""TensorRT profiling: GPU latency from CUDA events, per-layer times from IProfiler, Jetson state.

- :func:`gpu_latency` / :func:`profile_extras`: per-run GPU time measured with CUDA events on the
  session's stream, both for the engine alone (``compute``) and with the H2D / D2H copies
  (``end_to_end``). Host-side ``perf_counter`` timing (``profiles.latency``) adds Python and driver
  overhead on top; on a Jetson the copies are real too (pinned host memory, same DRAM).
- :func:`profile_layers`: ``IProfiler.report_layer_time`` per layer per run, in the record format of
  :mod:`vitfold.profiles.per_layer` (which attributes layers to blocks). Each record carries the ONNX
  nodes the layer came from (``origins``: the engine inspector's ``[ONNX Layer: ...]`` metadata, or
  node names found in the layer name, e.g. Myelin's ``{ForeignNode[first...last]}``) and the layers
  feeding it (``inputs``, from the inspector's tensor names).
- :func:`jetson_state`: power mode (``nvpmodel -q``), clocks (``jetson_clocks --show`` when allowed,
  and the devfreq clocks from sysfs), one ``tegrastats`` sample; None off Jetson.

TensorRT warns of noise earlier than the CPU backends: a CoV above :data:`GPU_NOISY_COV` (2.5%) is flagged.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from .tensorrt_cache import detect_platform
from .tensorrt_config import _require

#: Coefficient of variation above which a TensorRT GPU latency is flagged as noisy.
GPU_NOISY_COV = 0.025


def latency_stats(samples_ms: Sequence[float], batch_size: int) -> dict:
    """Median / p90 / p99 / mean / min / max (ms), CoV, throughput (images/s at the median), noisy flag."""
    data = np.asarray(samples_ms, dtype=np.float64)
    median = float(np.median(data))
    cov = float(data.std() / data.mean()) if len(data) > 1 and data.mean() > 0 else 0.0
    return {
        "runs": int(len(data)), "median_ms": median, "p90_ms": float(np.percentile(data, 90)),
        "p99_ms": float(np.percentile(data, 99)), "mean_ms": float(data.mean()), "min_ms": float(data.min()),
        "max_ms": float(data.max()), "cov": cov, "throughput": batch_size * 1e3 / median if median > 0 else 0.0,
        "noisy": cov > GPU_NOISY_COV,
    }


def gpu_latency(sessions: Mapping[str, object], images: np.ndarray, *, warmup: int = 20, runs: int = 200,
                runs_per_turn: int = 10) -> dict:
    """CUDA-event latency of each TensorRT session on the same ``images`` ``[B, 3, H, W]``, interleaved
    in turns of ``runs_per_turn`` runs (dense and reduced see the same clocks and temperature).

    Returns:
        ``{name: {"compute": stats, "end_to_end": stats, "cuda_graph": ...}}`` (:func:`latency_stats`).
    """
    for session in sessions.values():
        for _ in range(warmup):
            session(images)
    samples = {name: ([], []) for name in sessions}
    while any(len(compute) < runs for compute, _ in samples.values()):
        for name, session in sessions.items():
            for _ in range(min(runs_per_turn, runs - len(samples[name][0]))):
                compute_ms, total_ms = session.timed(images)
                samples[name][0].append(compute_ms)
                samples[name][1].append(total_ms)
    batch = len(images)
    return {
        name: {"compute": latency_stats(compute, batch), "end_to_end": latency_stats(total, batch),
               "cuda_graph": sessions[name].settings.get("cuda_graph")}
        for name, (compute, total) in samples.items()
    }


# ------------------------------------------------------------------------------------------- layers

_FOREIGN = re.compile(r"\.\.\.|\s\+\s|[\[\]{}()\s,]+")
_NOT_NODES = {"", "ForeignNode", "PWN", "Reformatting", "CopyNode", "for", "Input", "Output", "Tensor", "to"}


def layer_origins(name: str, metadata: str = "") -> list[str]:
    """ONNX node names a TensorRT layer came from: ``[ONNX Layer: X]`` entries of the inspector's
    metadata when present, else the identifiers inside the layer name (fused ``a + b``, Myelin
    ``{ForeignNode[a...b]}``, ``PWN(a, b)``)."""
    found = re.findall(r"\[ONNX Layer: ([^\]]+)\]", metadata or "")
    if not found:
        found = [t for t in _FOREIGN.split(name) if t not in _NOT_NODES and not t.isdigit()]
    return list(dict.fromkeys(found))


def parse_layer_info(text: str) -> dict:
    """One layer of ``IEngineInspector.get_layer_information(i, LayerInformationFormat.JSON)``:
    name, type, ONNX origins, input / output tensor names (DETAILED verbosity; a bare name otherwise)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = text
    if not isinstance(data, dict):
        return {"name": str(data), "type": "", "origins": layer_origins(str(data)), "inputs": [], "outputs": []}

    def names(key: str) -> list[str]:
        return [t["Name"] if isinstance(t, dict) else str(t) for t in data.get(key, [])]

    name = str(data.get("Name", ""))
    return {"name": name, "type": str(data.get("LayerType", "")), "origins": layer_origins(name, str(data.get("Metadata", ""))),
            "inputs": names("Inputs"), "outputs": names("Outputs")}


def link_layers(layers: Sequence[dict]) -> dict[str, dict]:
    """Per layer name: type, origins, and the names of the layers producing its input tensors."""
    producer = {tensor: layer["name"] for layer in layers for tensor in layer["outputs"]}
    return {layer["name"]: {"type": layer["type"], "origins": layer["origins"],
                            "inputs": [producer[t] for t in layer["inputs"] if t in producer]} for layer in layers}


_PROFILER = {}


def _profiler(trt):
    if trt not in _PROFILER:

        class LayerProfiler(trt.IProfiler):
            def __init__(self):
                trt.IProfiler.__init__(self)
                self.layers: list[tuple[str, float]] = []

            def report_layer_time(self, layer_name, ms):
                self.layers.append((str(layer_name), float(ms)))

        _PROFILER[trt] = LayerProfiler
    return _PROFILER[trt]()


def session_layers(session, images: np.ndarray, *, warmup: int = 5, runs: int = 20) -> dict:
    """IProfiler pass on ``session``'s own execution context (same buffers; plain enqueues, not the
    CUDA graph, since a profiled enqueue reports per layer).

    Not a second context: TensorRT 8.5 requires each execution context to have its own
    optimisation profile (``NvInferRuntime.h``, ``createExecutionContext``; relaxed in 10), and the
    session's context holds the engine's only one. A dynamic session's input shape is set to
    ``images.shape`` for the pass and restored afterwards; the profiler is detached.

    Returns:
        ``{"runs": [[{name, type, ms, origins, inputs}, ...] per run], "run_ms": [GPU ms per run,
        profiler on], "settings": session.settings}``.

    Raises:
        RuntimeError: an enqueue failed. ArtifactError: the engine refused the shape.
    """
    trt, engine, device, context = session._trt, session._engine, session._device, session._context
    inspector = engine.create_engine_inspector()
    info = link_layers([parse_layer_info(inspector.get_layer_information(i, trt.LayerInformationFormat.JSON))
                        for i in range(engine.num_layers)])
    images = np.ascontiguousarray(images, dtype=np.float32)
    previous = tuple(context.get_tensor_shape(session._input)) if session.dynamic else None
    if session.dynamic:
        _require(context.set_input_shape(session._input, images.shape), f"set_input_shape({session._input}, {images.shape})")
    profiler = _profiler(trt)
    context.profiler = profiler
    layer_runs, run_ms = [], []
    try:
        staged = session._view(session._input)
        np.copyto(staged, images, casting="same_kind")
        device.h2d(session._ptr[session._input], staged)
        start, end = device.event(), device.event()
        for i in range(warmup + runs):
            profiler.layers = []
            device.record(start)
            if not context.execute_async_v3(device.stream_handle):
                raise RuntimeError("TensorRT execute_async_v3 failed while profiling; see the TensorRT log")
            device.record(end)
            device.synchronize()
            if i >= warmup:
                run_ms.append(device.elapsed_ms(start, end))
                layer_runs.append([{"name": n, "ms": ms, **info.get(n, {"type": "", "origins": layer_origins(n), "inputs": []})}
                                   for n, ms in profiler.layers])
    finally:
        try:
            context.profiler = None  # nullptr: later enqueues are not reported
        except TypeError:  # a binding that takes no None: the profiler stays, reporting into a list nobody reads
            pass
        if previous is not None:
            _require(context.set_input_shape(session._input, previous), f"set_input_shape({session._input}, {previous})")
    return {"runs": layer_runs, "run_ms": run_ms, "settings": dict(session.settings)}


# ------------------------------------------------------------------------------------------- Jetson

Runner = Callable[..., subprocess.CompletedProcess]


def parse_nvpmodel(text: str) -> dict:
    """``nvpmodel -q`` -> ``{"mode": "MAXN", "id": 0}`` (either may be None)."""
    mode = re.search(r"NV Power Mode:\s*(\S[^\n]*)", text)
    ident = re.search(r"NV Power Mode:[^\n]*\n\s*(\d+)", text)
    return {"mode": mode.group(1).strip() if mode else None, "id": int(ident.group(1)) if ident else None}


def parse_tegrastats(line: str) -> dict:
    """One ``tegrastats`` line -> RAM (MB), GPU load (% and MHz), EMC load, temperatures (C), power rails (mW)."""
    out: dict = {}
    ram = re.search(r"RAM (\d+)/(\d+)MB", line)
    if ram:
        out["ram_used_mb"], out["ram_total_mb"] = int(ram.group(1)), int(ram.group(2))
    for key, label in (("gpu", "GR3D_FREQ"), ("emc", "EMC_FREQ")):
        match = re.search(rf"{label} (\d+)%(?:@\[?(\d+))?", line)
        if match:
            out[f"{key}_load_pct"] = int(match.group(1))
            if match.group(2):
                out[f"{key}_mhz"] = int(match.group(2))
    temps = {name.lower(): float(value) for name, value in re.findall(r"(\w+)@(-?\d+(?:\.\d+)?)C\b", line)}
    if temps:
        out["temperature_c"] = temps
    rails = {name: {"now_mw": int(now), "avg_mw": int(avg)} for name, now, avg in re.findall(r"(\w+) (\d+)mW/(\d+)mW", line)}
    if rails:
        out["power_mw"] = rails
    return out


def parse_jetson_clocks(text: str) -> dict:
    """``jetson_clocks --show`` -> per engine (GPU, EMC, cpuN) min / max / current Hz and ``locked``
    (GPU and EMC running at their maximum, as after ``sudo jetson_clocks``)."""
    clocks = {}
    for name, body in re.findall(r"^(GPU|EMC|cpu\d+)[: ]\s*(.*)$", text, re.M):
        values = {k.lower(): int(v) for k, v in re.findall(r"(MinFreq|MaxFreq|CurrentFreq)=(\d+)", body)}
        if values:
            clocks[name] = values
    fixed = [c for k, c in clocks.items() if k in ("GPU", "EMC")]
    return {"clocks": clocks, "locked": bool(fixed) and all(c.get("currentfreq") == c.get("maxfreq") for c in fixed)}


def devfreq_clocks(root: Path = Path("/")) -> dict:
    """Current / min / max frequency (Hz) and governor of every devfreq device (the Jetson GPU is one)."""
    out = {}
    for device in sorted((root / "sys" / "class" / "devfreq").glob("*")):
        values = {}
        for field in ("cur_freq", "min_freq", "max_freq", "governor"):
            try:
                text = (device / field).read_text().strip()
            except OSError:
                continue
            values[field] = int(text) if text.isdigit() else text
        if values:
            out[device.name] = values
    return out


def _command(cmd: Sequence[str], run: Runner, timeout: float) -> tuple[str, Optional[str]]:
    """stdout of ``cmd`` (what it printed before ``timeout`` for streaming tools) and an error or None."""
    try:
        result = run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return "", f"{cmd[0]} not found"
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        return (out.decode(errors="replace") if isinstance(out, bytes) else out), None
    if result.returncode != 0:
        return result.stdout, (result.stderr or result.stdout).strip()[:300] or f"exit {result.returncode}"
    return result.stdout, None


def jetson_state(root: Path = Path("/"), run: Runner = subprocess.run) -> Optional[dict]:
    """Power mode, clocks and a tegrastats sample on a Jetson; None elsewhere.

    Args:
        root: filesystem root (tests pass a fake Jetson).
        run: ``subprocess.run``-compatible runner (tests pass a fake).
    """
    platform = detect_platform(root)
    if platform["kind"] != "jetson":
        return None
    state: dict = {"platform": platform}
    text, error = _command(["nvpmodel", "-q"], run, 10)
    state["power_mode"] = parse_nvpmodel(text) if not error else {"error": error}
    text, error = _command(["jetson_clocks", "--show"], run, 10)
    state["jetson_clocks"] = parse_jetson_clocks(text) if not error else {"error": f"{error} (run `sudo jetson_clocks --show`)"}
    state["devfreq"] = devfreq_clocks(root)
    text, error = _command(["tegrastats", "--interval", "200"], run, 1.5)
    lines = [line for line in text.splitlines() if "RAM" in line]
    state["tegrastats"] = {"line": lines[-1], **parse_tegrastats(lines[-1])} if lines else {"error": error or "no output"}
    return state


# ------------------------------------------------------------------------------------------- report

def profile_extras(sessions: Mapping[str, object], images: np.ndarray, *, warmup: int = 20, runs: int = 200) -> dict:
    """What a TensorRT report adds (``report["backend_profile"]``): CUDA-event latency per variant
    (interleaved, same ``images``), the Jetson state, variants whose CoV exceeds :data:`GPU_NOISY_COV`, and
    the report.md lines for all of it (``markdown``)."""
    latency = gpu_latency(sessions, images, warmup=warmup, runs=runs)
    noisy = sorted(f"{name} {kind}" for name, entry in latency.items() for kind in ("compute", "end_to_end")
                   if entry[kind]["noisy"])
    device = {name: {key: session.settings.get(key) for key in ("tensorrt", "gpu", "compute_capability", "engine_source")}
              for name, session in sessions.items()}
    extras = {"gpu_latency": latency, "device": device, "noisy": noisy, "noisy_cov": GPU_NOISY_COV, "jetson": jetson_state()}
    extras["markdown"] = render_markdown(extras)
    return extras


def render_markdown(extras: dict) -> list[str]:
    """Report lines for :func:`profile_extras` output."""
    lines = ["", "## GPU latency (CUDA events)", "", "| variant | compute median ms | p90 | CoV | with copies median ms | p90 | CoV | CUDA graph |",
             "|---|---|---|---|---|---|---|---|"]
    for name, entry in extras["gpu_latency"].items():
        c, e = entry["compute"], entry["end_to_end"]
        lines.append(f"| {name} | {c['median_ms']:.3f} | {c['p90_ms']:.3f} | {c['cov']:.1%} | {e['median_ms']:.3f} | "
                     f"{e['p90_ms']:.3f} | {e['cov']:.1%} | {entry['cuda_graph']} |")
    for name, info in extras.get("device", {}).items():
        lines.append(f"\n{name}: TensorRT {info['tensorrt']} on {info['gpu']} (compute {info['compute_capability']}), "
                     f"engine from {info['engine_source']}.")
    latency = extras["gpu_latency"]
    if "dense" in latency and "reduced" in latency:
        speedup = latency["dense"]["compute"]["median_ms"] / latency["reduced"]["compute"]["median_ms"]
        lines += ["", f"GPU compute speedup {speedup:.2f}x (dense / reduced median)."]
    jetson = extras.get("jetson")
    if jetson:
        mode = jetson["power_mode"]
        clocks = jetson["jetson_clocks"]
        lines += ["", f"Jetson {jetson['platform']['model']} (L4T {jetson['platform']['l4t']}): power mode "
                  f"{mode.get('mode', mode.get('error'))}, clocks "
                  + ("locked at max (jetson_clocks)" if clocks.get("locked") else f"not locked ({clocks.get('error', 'dynamic')})")]
        stats = jetson["tegrastats"]
        if "line" in stats:
            lines.append(f"tegrastats: `{stats['line']}`")
    if extras["noisy"]:
        lines += ["", f"Warning: CoV above {extras['noisy_cov']:.1%} for {', '.join(extras['noisy'])}: clocks or "
                  "other load moved; lock clocks (`sudo jetson_clocks`) and re-run `deploy.py profile`."]
    return lines
