"""TensorRT backend: everything that needs no GPU runs everywhere; GPU tests skip with the reason.

GPU-free: builder settings per TensorRT version (8.5 / 8.6 / 10 / 11), optimisation profiles,
parser-error and build-failure messages, the engine cache key and the rebuild paths, Jetson probes,
inspector parsing, and the refusals (no tensorrt, no GPU) down to the CLI exit code.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from vitfold.errors import ArtifactError, BackendUnavailable, ExportError, SpecError
from vitfold.runtimes import BuildConfig, cudamem
from vitfold.runtimes import tensorrt as trt_backend
from vitfold.runtimes import tensorrt_profile as prof
from vitfold.runtimes.tensorrt_cache import (
    DEVICE_FIELDS, ENGINE_FIELDS, EngineCache, cached_engine, detect_platform, device_key, engine_cache_key,
    engine_mismatch,
)
from vitfold.runtimes.tensorrt_config import (
    check_graph_precision, diagnose_build_failure, format_parser_errors, optimization_profiles, parse_failure,
    translate_config,
)


def _gpu_skip_reason():
    try:
        importlib.import_module("tensorrt")
    except ImportError as exc:
        return f"tensorrt is not installed ({exc}); see README 'Jetson and NVIDIA GPUs (TensorRT)'"
    try:
        cudamem.open_device(0).close()
    except BackendUnavailable as exc:
        return f"no usable NVIDIA GPU: {exc}"
    return None


GPU_SKIP = _gpu_skip_reason()
gpu = pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))


# --------------------------------------------------------------------------- builder settings


def cfg(precision="f32", **extra) -> BuildConfig:
    return BuildConfig(backend="tensorrt", precision=precision, extra=extra)


def test_translate_config_per_tensorrt_version():
    jp5 = translate_config(cfg("fp16"), "8.5.2.2")
    assert jp5.network_flags == ("EXPLICIT_BATCH",) and jp5.set_flags == ("FP16",)
    assert jp5.builder_optimization_level is None and any("8.6" in n for n in jp5.notes)
    assert not jp5.strongly_typed and not jp5.precision_from_graph

    assert translate_config(cfg("fp16"), "8.6.2").builder_optimization_level == 3

    jp6 = translate_config(cfg("fp16", builder_optimization_level=5, workspace_mb=512), "10.3.0.30")
    assert jp6.network_flags == () and jp6.set_flags == ("FP16",) and jp6.clear_flags == ()
    assert jp6.builder_optimization_level == 5 and jp6.workspace_bytes == 512 << 20

    trt11 = translate_config(cfg("fp16"), "11.4.1")
    assert trt11.set_flags == () and trt11.strongly_typed and trt11.precision_from_graph
    assert any("precision pass" in n for n in trt11.notes)

    for version in ("8.5.2", "10.3.0", "11.4.1"):  # f32: true fp32 matmuls, no TF32
        plan = translate_config(cfg("f32"), version)
        assert plan.clear_flags == ("TF32",) and plan.set_flags == () and not plan.precision_from_graph


def test_translate_config_refusals():
    with pytest.raises(SpecError, match="older than 8.5"):
        translate_config(cfg(), "8.4.3")
    with pytest.raises(SpecError, match="use --precision fp16"):
        translate_config(cfg("bf16"), "10.3.0")
    with pytest.raises(SpecError, match="workspace_mb"):
        translate_config(cfg(workspace_mb=0), "10.3.0")
    with pytest.raises(SpecError, match="0..5"):
        translate_config(cfg(builder_optimization_level=7), "10.3.0")


def test_optimization_profiles():
    assert optimization_profiles({"images": (1, 3, 224, 224)}, {}) == {}
    batch = optimization_profiles({"images": (-1, 3, 224, 224)}, {"batch": [1, 4, 8]})
    assert batch == {"images": [[1, 3, 224, 224], [4, 3, 224, 224], [8, 3, 224, 224]]}
    tokens = optimization_profiles({"tokens": (1, -1, 384)}, {"dynamic_dims": {"tokens": {"1": [50, 99, 197]}}})
    assert tokens == {"tokens": [[1, 50, 384], [1, 99, 384], [1, 197, 384]]}
    with pytest.raises(SpecError, match=r"'tokens' has dynamic dimension 1.*dynamic_dims"):
        optimization_profiles({"tokens": (1, -1, 384)}, {"batch": [1, 2, 4]})
    with pytest.raises(SpecError, match="min <= opt <= max"):
        optimization_profiles({"images": (-1, 3, 8, 8)}, {"batch": [4, 2, 8]})


class Tensorrt10ParserError:
    """Shaped like tensorrt.ParserError from a TensorRT 10 parser (node name and operator known)."""

    def code(self):
        return "ErrorCode.UNSUPPORTED_NODE"

    def desc(self):
        return "Assertion failed: reduction == \"none\": ScatterElements reduction needs the plugin"

    def node(self):
        return 57

    def node_name(self):
        return "node_scatter_reduce"

    def node_operator(self):
        return "ScatterElements"


class Tensorrt85ParserError:
    """A TensorRT 8.5 parser error: code, description and node index only."""

    def __init__(self, node, desc):
        self._node, self._desc = node, desc

    def code(self):
        return "ErrorCode.INVALID_NODE"

    def desc(self):
        return self._desc

    def node(self):
        return self._node


def test_parser_errors_name_node_op_and_reason(tmp_path):
    nodes = [("node_conv2d", "Conv"), ("node_sort__1", "TopK")]
    lines = format_parser_errors(
        [Tensorrt10ParserError(), Tensorrt85ParserError(1, "TopK K must be an initializer"), Tensorrt85ParserError(-1, "bad graph")],
        nodes,
    )
    assert lines[0] == ("node 57 'node_scatter_reduce' (ScatterElements): UNSUPPORTED_NODE: "
                        "Assertion failed: reduction == \"none\": ScatterElements reduction needs the plugin")
    assert lines[1] == "node 1 'node_sort__1' (TopK): INVALID_NODE: TopK K must be an initializer"
    assert lines[2] == "graph: INVALID_NODE: bad graph"
    error = parse_failure(tmp_path / "model.opt.onnx", [Tensorrt10ParserError()])
    assert isinstance(error, ExportError) and "(1 error(s))" in str(error)
    assert "node_scatter_reduce" in str(error) and "merge-as-matmul" in str(error)


def test_build_failures_name_the_cause():
    plan = translate_config(cfg(workspace_mb=256), "10.3.0")
    full = diagnose_build_failure(
        ["[TRT] Error Code 4: Internal Error (Could not find any implementation for node "
         "{ForeignNode[node_layer_norm...node_linear_7]} due to insufficient workspace. See verbose log for requested sizes.)"], plan)
    assert isinstance(full, SpecError) and "256 MiB workspace" in str(full) and "'workspace_mb': 512" in str(full)
    oom = diagnose_build_failure(["Error Code 2: OutOfMemory (no further information)"], plan)
    assert isinstance(oom, SpecError) and "out of memory" in str(oom)
    unsupported = diagnose_build_failure(["Error Code 9: API Usage Error (node_sort__1: TopK K not supported)"], plan)
    assert isinstance(unsupported, ExportError) and "node_sort__1" in str(unsupported) and "lint" in str(unsupported)
    other = diagnose_build_failure(["Error Code 1: Cuda Runtime (an illegal memory access)"], plan)
    assert isinstance(other, ExportError) and "illegal memory access" in str(other)


def test_fp16_on_strongly_typed_tensorrt_needs_an_fp16_graph():
    plan = translate_config(cfg("fp16"), "11.4.1")
    with pytest.raises(SpecError, match="precision pass"):
        check_graph_precision({"DataType.FLOAT", "DataType.INT64"}, plan)
    check_graph_precision({"DataType.FLOAT", "DataType.HALF"}, plan)
    check_graph_precision({"DataType.FLOAT"}, translate_config(cfg("fp16"), "10.3.0"))  # TRT 10: the flag does it


# --------------------------------------------------------------------------- engine cache

BASE = {
    "tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": [8, 7],
    "platform": {"kind": "jetson", "model": "NVIDIA Jetson AGX Orin Developer Kit", "l4t": "R36.3.0"},
    "onnx_sha256": "ab" * 32, "precision": "fp16", "profiles": {}, "builder_optimization_level": 3,
    "workspace_bytes": 1 << 30, "plan": {"network": [], "set": ["FP16"], "clear": [], "verbosity": "DETAILED"},
    "plugins": [],
}
CHANGED = {
    "tensorrt": "10.7.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0],
    "platform": {"kind": "discrete", "machine": "x86_64"}, "onnx_sha256": "cd" * 32, "precision": "f32",
    "profiles": {"images": [[1, 3, 224, 224], [4, 3, 224, 224], [8, 3, 224, 224]]}, "builder_optimization_level": 5,
    "workspace_bytes": 2 << 30, "plan": {"network": ["EXPLICIT_BATCH"], "set": ["FP16"], "clear": [], "verbosity": "DETAILED"},
    "plugins": [{"name": "libscatter.so", "sha256": "00" * 32}],
}


def test_cache_key_covers_every_field():
    assert set(CHANGED) == set(ENGINE_FIELDS)
    key = engine_cache_key(BASE)
    assert key == engine_cache_key(dict(reversed(list(BASE.items())))) and len(key) == 32
    keys = {name: engine_cache_key({**BASE, name: value}) for name, value in CHANGED.items()}
    assert all(k != key for k in keys.values()), [n for n, k in keys.items() if k == key]
    assert len(set(keys.values())) == len(keys)
    with pytest.raises(ValueError, match="plugins"):
        engine_cache_key({k: v for k, v in BASE.items() if k != "plugins"})
    assert device_key(BASE) == device_key({**BASE, "onnx_sha256": "ef" * 32, "precision": "f32"})
    assert device_key(BASE) != device_key({**BASE, "gpu": "Orin Nano"})


def test_engine_mismatch_names_tensorrt_and_gpu():
    assert engine_mismatch(BASE, {k: BASE[k] for k in DEVICE_FIELDS}) == []
    reasons = engine_mismatch(BASE, {**BASE, "tensorrt": "10.7.0", "compute_capability": [9, 0]})
    assert len(reasons) == 2 and "'10.3.0'" in reasons[0] and "'10.7.0'" in reasons[0] and "[9, 0]" in reasons[1]


class Builds:
    """Counts builds; plans that start with b'corrupt' fail to deserialize, like a truncated engine."""

    def __init__(self):
        self.count = 0

    def build(self) -> bytes:
        self.count += 1
        return f"plan-{self.count}".encode()

    @staticmethod
    def deserialize(plan: bytes):
        return None if plan.startswith(b"corrupt") else ("engine", plan)


def test_cache_hit_miss_and_rebuild_of_a_corrupt_engine(tmp_path):
    cache, builds = EngineCache(tmp_path), Builds()
    first = cached_engine(cache, BASE, builds.deserialize, builds.build)
    assert (first.source, first.engine, builds.count) == ("built", ("engine", b"plan-1"), 1)
    entry = cache.entry(engine_cache_key(BASE))
    assert json.loads((entry / "key.json").read_text())["gpu"] == "Orin"
    again = cached_engine(cache, BASE, builds.deserialize, builds.build)
    assert (again.source, again.plan, builds.count) == ("cache", b"plan-1", 1)

    (entry / "engine.plan").write_bytes(b"corrupt: half an engine")
    rebuilt = cached_engine(cache, BASE, builds.deserialize, builds.build)
    assert (rebuilt.source, rebuilt.plan, builds.count) == ("built", b"plan-2", 2)
    assert "failed to deserialize" in rebuilt.reason and (entry / "engine.plan").read_bytes() == b"plan-2"

    def raising(plan):  # some TensorRT versions raise instead of returning None
        if plan == b"plan-2":
            raise RuntimeError("Serialization assertion failed")
        return ("engine", plan)

    assert cached_engine(cache, BASE, raising, builds.build).plan == b"plan-3"


def test_cache_entry_recorded_for_other_settings_is_not_used(tmp_path):
    cache, builds = EngineCache(tmp_path), Builds()
    cached_engine(cache, BASE, builds.deserialize, builds.build)
    key_file = cache.entry(engine_cache_key(BASE)) / "key.json"
    key_file.write_text(json.dumps({**BASE, "tensorrt": "8.5.2"}))  # a hand-copied entry from a JetPack 5 box
    result = cached_engine(cache, BASE, builds.deserialize, builds.build)
    assert result.source == "built" and "tensorrt" in result.reason and builds.count == 2
    assert cached_engine(None, BASE, builds.deserialize, builds.build).source == "built" and builds.count == 3
    with pytest.raises(RuntimeError, match="could not deserialize"):
        cached_engine(cache, {**BASE, "precision": "f32"}, lambda plan: None, builds.build)


def test_timing_cache_is_per_device(tmp_path):
    cache = EngineCache(tmp_path)
    path = cache.save_timing_cache(BASE, b"timings")
    assert path.read_bytes() == b"timings" and path == cache.timing_cache({**BASE, "onnx_sha256": "00"})
    assert cache.timing_cache({**BASE, "tensorrt": "10.7.0"}) != path


def test_engine_cache_location(tmp_path, monkeypatch):
    assert trt_backend.engine_cache(BuildConfig("tensorrt", cache_dir=str(tmp_path))).root == tmp_path / "tensorrt"
    assert trt_backend.engine_cache(cfg(engine_cache=False)) is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert trt_backend.engine_cache(cfg()).root == tmp_path / "xdg" / "vitfold" / "tensorrt"


def test_detect_platform(tmp_path):
    assert detect_platform(tmp_path)["kind"] == "discrete"
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text(
        "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, DATE: Fri Jul 19 23:24:25 UTC 2024\n")
    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    (tmp_path / "proc" / "device-tree" / "model").write_text("NVIDIA Jetson AGX Orin Developer Kit\x00")
    assert detect_platform(tmp_path) == {"kind": "jetson", "model": "NVIDIA Jetson AGX Orin Developer Kit", "l4t": "R36.3.0"}


# --------------------------------------------------------------------------- load: rebuild paths


class FakeDevice:
    name, compute_capability, api = "Orin", (8, 7), "fake"

    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


@pytest.fixture
def fake_load(tmp_path, monkeypatch):
    """``load`` wired to a fake tensorrt / device; records deserialize and rebuild calls."""
    calls = {"deserialize": [], "rebuild": [], "device": []}
    here = {"kind": "jetson", "model": "NVIDIA Jetson AGX Orin Developer Kit", "l4t": "R36.3.0"}

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            calls["deserialize"].append(plan)
            return None if plan.startswith(b"corrupt") else ("engine", plan)

    def open_device(index=0):
        calls["device"].append(FakeDevice())
        return calls["device"][-1]

    def obtain_engine(trt, onnx_path, config, plan, identity):
        calls["rebuild"].append(onnx_path)
        if onnx_path.name == "broken.onnx":
            raise ExportError("parser failed")
        return SimpleNamespace(engine=("engine", b"rebuilt"), source="built"), {}, "runtime-2"

    monkeypatch.setattr(trt_backend, "_trt", lambda: SimpleNamespace(__version__="10.3.0", Runtime=Runtime))
    monkeypatch.setattr(trt_backend, "_logger", lambda trt: None)
    monkeypatch.setattr(trt_backend.cudamem, "open_device", open_device)
    monkeypatch.setattr(trt_backend, "detect_platform", lambda: here)
    monkeypatch.setattr(trt_backend, "obtain_engine", obtain_engine)
    monkeypatch.setattr(trt_backend, "TensorRTSession", lambda trt, engine, runtime, device, config, settings:
                        SimpleNamespace(engine=engine, runtime=runtime, settings=settings))
    record = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": [8, 7], "platform": here}
    (tmp_path / "engine.json").write_text(json.dumps(record))
    (tmp_path / "model.engine").write_bytes(b"plan")
    manifest = {"build": cfg().to_json(), "files": {"backend": "model.engine", "engine_record": "engine.json",
                                                    "optimized": "model.opt.onnx"}}
    return SimpleNamespace(dir=tmp_path, manifest=manifest, calls=calls, record=record)


def test_load_uses_an_engine_built_here(fake_load):
    session = trt_backend.load(fake_load.dir, fake_load.manifest)
    assert session.engine == ("engine", b"plan") and session.settings["engine_source"] == "build directory"
    assert fake_load.calls["rebuild"] == []


def test_load_rebuilds_an_engine_from_another_tensorrt_or_gpu(fake_load):
    (fake_load.dir / "engine.json").write_text(json.dumps({**fake_load.record, "tensorrt": "8.5.2", "gpu": "Xavier"}))
    session = trt_backend.load(fake_load.dir, fake_load.manifest)
    assert fake_load.calls["deserialize"] == []  # never even tried
    assert fake_load.calls["rebuild"] == [fake_load.dir / "model.opt.onnx"]
    assert session.engine == ("engine", b"rebuilt") and session.runtime == "runtime-2"
    assert "'8.5.2'" in session.settings["engine_source"] and "'Xavier'" in session.settings["engine_source"]


def test_load_rebuilds_a_corrupt_engine_and_closes_the_device_on_failure(fake_load):
    (fake_load.dir / "model.engine").write_bytes(b"corrupt")
    session = trt_backend.load(fake_load.dir, fake_load.manifest)
    assert "does not deserialize" in session.settings["engine_source"] and len(fake_load.calls["rebuild"]) == 1
    fake_load.manifest["files"]["optimized"] = "broken.onnx"
    with pytest.raises(ExportError):
        trt_backend.load(fake_load.dir, fake_load.manifest)
    assert fake_load.calls["device"][-1].closed
    del fake_load.manifest["files"]["engine_record"]
    with pytest.raises(ArtifactError, match="no TensorRT engine record"):
        trt_backend.load(fake_load.dir, fake_load.manifest)


# --------------------------------------------------------------------------- build wiring (fake TensorRT)


def fake_tensorrt(version="10.3.0", shape=(-1, 3, 4, 4), dtypes=("DataType.FLOAT",), parse_ok=True, build_log=()):
    """A stand-in for the ``tensorrt`` module with the documented names ``obtain_engine`` calls; it
    records what it was told (``calls``). It checks the wiring (flags, pools, profiles, timing cache,
    failures), not TensorRT itself."""
    calls = {"flags": None, "config": {}, "set": [], "clear": [], "shapes": [], "builds": 0, "timing_in": []}

    class ILogger:
        Severity = SimpleNamespace(WARNING=2)

        def __init__(self):
            pass

    class Network:
        num_inputs, num_layers = 1, 1

        def get_input(self, i):
            return SimpleNamespace(name="images", shape=shape, dtype=dtypes[0])

        def get_layer(self, i):
            return SimpleNamespace(num_outputs=len(dtypes), get_output=lambda j: SimpleNamespace(dtype=dtypes[j]))

    class TimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls["config"][pool] = size

        def __setattr__(self, name, value):
            calls["config"][name] = value

        def set_flag(self, flag):
            calls["set"].append(flag)

        def clear_flag(self, flag):
            calls["clear"].append(flag)

        def add_optimization_profile(self, profile):
            calls["config"]["profiles"] = calls["config"].get("profiles", 0) + 1

        def create_timing_cache(self, data):
            calls["timing_in"].append(bytes(data))
            calls["timing"] = TimingCache(bytes(data))
            return calls["timing"]

        def set_timing_cache(self, cache, ignore_mismatch):
            calls["config"]["timing_cache_set"] = not ignore_mismatch

        def get_timing_cache(self):
            return calls["timing"]

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            calls["flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return SimpleNamespace(set_shape=lambda name, lo, opt, hi: calls["shapes"].append((name, lo, opt, hi)))

        def build_serialized_network(self, network, config):
            calls["builds"] += 1
            for message in build_log:
                self.logger.log(1, message)
            return None if build_log else b"plan-%d" % calls["builds"]

    class OnnxParser:
        num_errors = 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return parse_ok

        def get_error(self, i):
            return Tensorrt10ParserError()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            return ("engine", plan)

    module = SimpleNamespace(
        __version__=version, ILogger=ILogger, Builder=Builder, OnnxParser=OnnxParser, Runtime=Runtime,
        NetworkDefinitionCreationFlag=SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1),
        BuilderFlag=SimpleNamespace(FP16="FP16", TF32="TF32"), MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
        ProfilingVerbosity=SimpleNamespace(DETAILED="DETAILED"), init_libnvinfer_plugins=lambda logger, ns: None,
    )
    return module, calls


IDENTITY = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": [8, 7], "platform": {"kind": "jetson"}}


@pytest.fixture
def onnx_file(tmp_path, monkeypatch):
    monkeypatch.setattr(trt_backend, "_LOGGER", None)  # the fake logger class must not outlive the test
    path = tmp_path / "model.opt.onnx"
    _tiny_dynamic_onnx(path)
    return path


def test_obtain_engine_wires_plan_profiles_and_timing_cache(onnx_file, tmp_path):
    trt, calls = fake_tensorrt("10.3.0")
    config = BuildConfig("tensorrt", "fp16", cache_dir=str(tmp_path / "cache"), extra={"batch": [1, 2, 4]})
    plan = translate_config(config, trt.__version__)
    result, fields, runtime = trt_backend.obtain_engine(trt, onnx_file, config, plan, IDENTITY)
    assert result.source == "built" and result.plan == b"plan-1" and calls["flags"] == 0
    assert calls["config"]["WORKSPACE"] == 1024 << 20 and calls["config"]["builder_optimization_level"] == 3
    assert calls["config"]["profiling_verbosity"] == "DETAILED" and calls["config"]["timing_cache_set"]
    assert calls["set"] == ["FP16"] and calls["clear"] == [] and calls["config"]["profiles"] == 1
    assert calls["shapes"] == [("images", [1, 3, 4, 4], [2, 3, 4, 4], [4, 3, 4, 4])]
    assert fields["profiles"] == {"images": [[1, 3, 4, 4], [2, 3, 4, 4], [4, 3, 4, 4]]} and fields["precision"] == "fp16"
    timing = trt_backend.engine_cache(config).timing_cache(fields)
    assert timing.read_bytes() == b"+" and calls["timing_in"] == [b""]

    again, _, _ = trt_backend.obtain_engine(trt, onnx_file, config, plan, IDENTITY)
    assert again.source == "cache" and calls["builds"] == 1
    other = BuildConfig("tensorrt", "fp16", cache_dir=config.cache_dir, extra={"batch": [1, 2, 8]})
    trt_backend.obtain_engine(trt, onnx_file, other, translate_config(other, trt.__version__), IDENTITY)
    assert calls["builds"] == 2 and calls["timing_in"][-1] == b"+"  # new profile: rebuilt, timing cache reused


def test_obtain_engine_on_tensorrt_8_5_and_11(onnx_file):
    trt, calls = fake_tensorrt("8.5.2", shape=(1, 3, 4, 4))
    config = cfg("f32", engine_cache=False)
    trt_backend.obtain_engine(trt, onnx_file, config, translate_config(config, "8.5.2"), IDENTITY)
    assert calls["flags"] == 1 << 0 and "builder_optimization_level" not in calls["config"]
    assert calls["clear"] == ["TF32"] and calls["shapes"] == [] and "profiles" not in calls["config"]

    trt, calls = fake_tensorrt("11.4.1", shape=(1, 3, 4, 4))
    with pytest.raises(SpecError, match="no float16 tensor"):
        trt_backend.obtain_engine(trt, onnx_file, cfg("fp16"), translate_config(cfg("fp16"), "11.4.1"), IDENTITY)
    assert calls["builds"] == 0
    trt, calls = fake_tensorrt("11.4.1", shape=(1, 3, 4, 4), dtypes=("DataType.FLOAT", "DataType.HALF"))
    config = cfg("fp16", engine_cache=False)
    trt_backend.obtain_engine(trt, onnx_file, config, translate_config(config, "11.4.1"), IDENTITY)
    assert calls["flags"] == 0 and calls["set"] == [] and calls["builds"] == 1


def test_obtain_engine_failures_name_the_cause(onnx_file):
    config = cfg("f32", engine_cache=False)
    trt, _ = fake_tensorrt(shape=(1, 3, 4, 4), parse_ok=False)
    with pytest.raises(ExportError, match=r"node 57 'node_scatter_reduce' \(ScatterElements\)"):
        trt_backend.obtain_engine(trt, onnx_file, config, translate_config(config, "10.3.0"), IDENTITY)
    trt, _ = fake_tensorrt(shape=(1, 3, 4, 4), build_log=[
        "[optimizer.cpp::computeCosts] Error Code 4: Internal Error (Could not find any implementation for node "
        "{ForeignNode[node_matmul]} due to insufficient workspace. See verbose log for requested sizes.)"])
    with pytest.raises(SpecError, match="1024 MiB workspace"):
        trt_backend.obtain_engine(trt, onnx_file, config, translate_config(config, "10.3.0"), IDENTITY)
    trt, _ = fake_tensorrt()  # dynamic batch, no range given
    with pytest.raises(SpecError, match="dynamic dimension 0"):
        trt_backend.obtain_engine(trt, onnx_file, config, translate_config(config, "10.3.0"), IDENTITY)


def test_build_writes_engine_and_record(onnx_file, tmp_path, monkeypatch):
    trt, _ = fake_tensorrt(shape=(1, 3, 4, 4))
    monkeypatch.setattr(trt_backend, "_trt", lambda: trt)
    monkeypatch.setattr(trt_backend.cudamem, "open_device", lambda index=0: FakeDevice())
    out = tmp_path / "out"
    out.mkdir()
    entries = trt_backend.build(onnx_file, out, BuildConfig("tensorrt", "f32", cache_dir=str(tmp_path / "cache")))
    assert entries == {"files": {"backend": "model.engine", "engine_record": "engine.json"},
                       "versions": {"tensorrt": "10.3.0", "cuda_bindings": "fake"}}
    record = json.loads((out / "engine.json").read_text())
    assert (out / "model.engine").read_bytes() == b"plan-1" and record["gpu"] == "Orin" and record["source"] == "built"
    assert record["builder"]["clear_flags"] == ["TF32"] and record["platform"] == detect_platform()


# --------------------------------------------------------------------------- profiling helpers

TEGRASTATS = (
    "RAM 3027/30536MB (lfb 6441x4MB) SWAP 0/15268MB (cached 0MB) CPU [2%@729,0%@729,off,off] EMC_FREQ 1%@3199 "
    "GR3D_FREQ 87%@[1300,1300] VIC_FREQ 729 APE 174 CPU@45.343C Tboard@34C GPU@47.5C tj@48.1C "
    "VDD_GPU_SOC 9181mW/8790mW VDD_CPU_CV 795mW/801mW VIN_SYS_5V0 3419mW/3420mW"
)
CLOCKS = """SOC family:tegra234  Machine:NVIDIA Jetson AGX Orin Developer Kit
cpu0: Online=1 Governor=schedutil MinFreq=729600 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=0 c7=0
GPU MinFreq=306000000 MaxFreq=1300500000 CurrentFreq=1300500000
EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=1
NV Power Mode: MAXN
"""


def test_jetson_parsers():
    assert prof.parse_nvpmodel("NV Fan Mode:quiet\nNV Power Mode: MAXN\n0\n") == {"mode": "MAXN", "id": 0}
    assert prof.parse_nvpmodel("NV Power Mode: 15W\n2") == {"mode": "15W", "id": 2}
    stats = prof.parse_tegrastats(TEGRASTATS)
    assert stats["ram_used_mb"] == 3027 and stats["gpu_load_pct"] == 87 and stats["gpu_mhz"] == 1300
    assert stats["emc_mhz"] == 3199 and stats["temperature_c"]["gpu"] == 47.5 and stats["temperature_c"]["tboard"] == 34
    assert stats["power_mw"]["VDD_GPU_SOC"] == {"now_mw": 9181, "avg_mw": 8790}
    clocks = prof.parse_jetson_clocks(CLOCKS)
    assert clocks["locked"] and clocks["clocks"]["GPU"]["maxfreq"] == 1300500000 and "cpu0" in clocks["clocks"]
    assert not prof.parse_jetson_clocks(CLOCKS.replace("CurrentFreq=1300500000", "CurrentFreq=306000000"))["locked"]


def test_jetson_state_with_fake_tools(tmp_path):
    assert prof.jetson_state(tmp_path, run=lambda *a, **k: pytest.fail("no tools off Jetson")) is None
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text("# R35 (release), REVISION: 4.1, GCID: 1\n")
    gpu = tmp_path / "sys" / "class" / "devfreq" / "17000000.ga10b"
    gpu.mkdir(parents=True)
    for field, value in (("cur_freq", "1300500000"), ("max_freq", "1300500000"), ("governor", "nvhost_podgov")):
        (gpu / field).write_text(value + "\n")
    seen = []

    def run(cmd, **kwargs):
        seen.append(cmd[0])
        if cmd[0] == "nvpmodel":
            return subprocess.CompletedProcess(cmd, 0, "NV Power Mode: MODE_30W\n3\n", "")
        if cmd[0] == "jetson_clocks":
            return subprocess.CompletedProcess(cmd, 1, "", "Error: please run as root")
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"], output=(TEGRASTATS + "\n").encode())

    state = prof.jetson_state(tmp_path, run=run)
    assert seen == ["nvpmodel", "jetson_clocks", "tegrastats"]
    assert state["platform"]["l4t"] == "R35.4.1" and state["power_mode"] == {"mode": "MODE_30W", "id": 3}
    assert "run as root" in state["jetson_clocks"]["error"] and "sudo jetson_clocks --show" in state["jetson_clocks"]["error"]
    assert state["devfreq"]["17000000.ga10b"]["cur_freq"] == 1300500000
    assert state["tegrastats"]["gpu_load_pct"] == 87
    lines = prof.render_markdown({"gpu_latency": {}, "noisy": [], "noisy_cov": prof.GPU_NOISY_COV, "jetson": state})
    assert any("MODE_30W" in line and "not locked" in line for line in lines)


def test_inspector_layers_link_to_onnx_nodes_and_producers():
    gemm = json.dumps({"Name": "node_MatMul_11 + node_linear", "LayerType": "CaskGemm",
                       "Inputs": [{"Name": "layer_norm", "Dimensions": [1, 197, 384]}], "Outputs": [{"Name": "linear"}],
                       "Metadata": "[ONNX Layer: node_MatMul_11]\x1f[ONNX Layer: node_linear]"})
    myelin = json.dumps({"Name": "{ForeignNode[node_view_1...node_linear_7]}", "LayerType": "Myelin",
                         "Inputs": [{"Name": "linear"}], "Outputs": [{"Name": "add_3"}]})
    layers = prof.link_layers([prof.parse_layer_info(gemm), prof.parse_layer_info(myelin), prof.parse_layer_info('"node_head"')])
    assert layers["node_MatMul_11 + node_linear"]["origins"] == ["node_MatMul_11", "node_linear"]
    assert layers["{ForeignNode[node_view_1...node_linear_7]}"] == {"type": "Myelin", "origins": ["node_view_1", "node_linear_7"],
                                                                   "inputs": ["node_MatMul_11 + node_linear"]}
    assert layers["node_head"]["origins"] == ["node_head"]
    assert prof.layer_origins("Reformatting CopyNode for Input Tensor 0 to node_gelu") == ["node_gelu"]
    assert prof.layer_origins("PWN(node_Div_212, PWN(node_Erf_213, node_Add_215))") == ["node_Div_212", "node_Erf_213", "node_Add_215"]


def test_latency_stats_flag_noise_above_two_and_a_half_percent():
    steady = prof.latency_stats([2.00, 2.01, 1.99, 2.00], batch_size=8)
    assert not steady["noisy"] and steady["median_ms"] == 2.0 and steady["throughput"] == pytest.approx(4000)
    assert prof.latency_stats([2.0, 2.2, 1.8, 2.0], batch_size=1)["noisy"]  # CoV 7%


class TimedSession:
    """Stands in for a TensorRTSession in the report hook: fixed CUDA-event times, records call order."""

    def __init__(self, name, compute_ms, order):
        self.name, self.compute_ms, self.order = name, compute_ms, order
        self.settings = {"cuda_graph": "on", "tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7",
                         "engine_source": "build directory"}

    def __call__(self, images):
        self.order.append(("warmup", self.name))

    def timed(self, images):
        self.order.append(("timed", self.name))
        return self.compute_ms, self.compute_ms + 0.5


def test_profile_extras_interleaves_variants_and_reports_gpu_speedup(monkeypatch):
    monkeypatch.setattr(prof, "jetson_state", lambda: None)
    order = []
    sessions = {"dense": TimedSession("dense", 4.0, order), "reduced": TimedSession("reduced", 2.5, order)}
    extras = prof.profile_extras(sessions, np.zeros((2, 3, 8, 8), np.float32), warmup=3, runs=25)
    timed = [name for kind, name in order if kind == "timed"]
    assert order[:6] == [("warmup", "dense")] * 3 + [("warmup", "reduced")] * 3
    assert timed[:10] == ["dense"] * 10 and timed[10:20] == ["reduced"] * 10 and timed.count("reduced") == 25
    dense = extras["gpu_latency"]["dense"]
    assert dense["compute"]["median_ms"] == 4.0 and dense["end_to_end"]["median_ms"] == 4.5
    assert dense["compute"]["throughput"] == pytest.approx(500) and extras["noisy"] == []
    assert "GPU compute speedup 1.60x (dense / reduced median)." in extras["markdown"]
    assert "\nreduced: TensorRT 10.3.0 on Orin (compute 8.7), engine from build directory." in extras["markdown"]


# --------------------------------------------------------------------------- refusals


@pytest.mark.skipif(GPU_SKIP is None, reason="a GPU is present: the no-GPU refusal cannot be seen here")
def test_no_gpu_or_no_bindings_is_one_clear_message(monkeypatch):
    if cudamem._import_cudart() is not None:
        with pytest.raises(BackendUnavailable, match=r"needs an NVIDIA GPU: CUDA reports cuda\w+"):
            cudamem.open_device(0)
    monkeypatch.setattr(cudamem, "_import_cudart", lambda: None)
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(BackendUnavailable, match="neither cuda-python nor pycuda.*pip install"):
        cudamem.open_device(0)


def test_missing_tensorrt_is_refused_and_other_backends_keep_working(monkeypatch):
    from vitfold.runtimes import backend_module

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable, match=r"'tensorrt' is not installed.*pip install \"tensorrt-cu12>=10,<11\".*JetPack"):
        backend_module("tensorrt")
    assert backend_module("onnxruntime").build is not None


@pytest.mark.skipif(GPU_SKIP is None, reason="TensorRT and a GPU are here: the build would run")
def test_cli_build_tensorrt_without_it_exits_2_and_writes_nothing(tmp_path):
    """In process (click's runner) to stay fast; ``deploy.py`` is the same ``main``."""
    from click.testing import CliRunner

    from vitfold.cli import main

    result = CliRunner().invoke(main, ["build", "--backend", "tensorrt", "--precision", "fp16",
                                       "--out", str(tmp_path / "b" / "x")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    if importlib.util.find_spec("tensorrt") is not None:  # installed, but no GPU / driver here
        assert "needs an NVIDIA GPU" in errors[0] or "CUDA" in errors[0]
    else:
        assert "'tensorrt' is not installed here" in errors[0] and "pip install \"tensorrt-cu12>=10,<11\"" in errors[0]
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- GPU (skip without one)


def _tiny_dynamic_onnx(path: Path) -> np.ndarray:
    """images [N, 3, 4, 4] -> Flatten -> MatMul [48, 5] -> logits [N, 5]; batch left dynamic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((48, 5)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"], name="node_flatten", axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["logits"], name="node_matmul")],
        "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return weight


def _manifest(config: BuildConfig) -> dict:
    return {"build": config.to_json(), "files": {"backend": "model.engine", "engine_record": "engine.json",
                                                 "optimized": "model.opt.onnx"}}


@gpu
def test_gpu_dynamic_batch_cache_and_rebuild(tmp_path):
    weight = _tiny_dynamic_onnx(tmp_path / "model.opt.onnx")
    config = BuildConfig("tensorrt", "f32", cache_dir=str(tmp_path / "cache"), extra={"batch": [1, 2, 4]})
    out = tmp_path / "build"
    out.mkdir()
    (out / "model.opt.onnx").write_bytes((tmp_path / "model.opt.onnx").read_bytes())
    trt_backend.build(out / "model.opt.onnx", out, config)
    record = json.loads((out / "engine.json").read_text())
    assert record["source"] == "built" and record["profiles"]["images"][2] == [4, 3, 4, 4]
    again = tmp_path / "again"
    again.mkdir()
    trt_backend.build(out / "model.opt.onnx", again, config)
    assert json.loads((again / "engine.json").read_text())["source"] == "cache"
    with trt_backend.load(out, _manifest(config)) as session:
        for batch in (1, 3):
            images = np.random.default_rng(batch).standard_normal((batch, 3, 4, 4)).astype(np.float32)
            np.testing.assert_allclose(session(images)["logits"], images.reshape(batch, -1) @ weight, atol=1e-4)
        with pytest.raises(SpecError, match="from"):
            session(np.zeros((5, 3, 4, 4), np.float32))
    (out / "engine.json").write_text(json.dumps({**record, "tensorrt": "0.0.0"}))
    with trt_backend.load(out, _manifest(config)) as session:
        assert session.settings["engine_source"].startswith("rebuilt")


@gpu
def test_gpu_parser_error_names_the_node(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("NoSuchOp", ["images"], ["logits"], name="node_mystery", domain="vitfold.test")],
                              "bad", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("vitfold.test", 1)])
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(ExportError, match=r"node 0 'node_mystery' \(NoSuchOp\)"):
        trt_backend.build(tmp_path / "bad.onnx", tmp_path, BuildConfig("tensorrt", "f32", extra={"engine_cache": False}))


@gpu
def test_gpu_tiny_tome_parity_graph_layers_and_latency(tmp_path):
    from conftest import tiny_vit
    from vitfold.export.onnx import export_onnx
    from vitfold.passes.pipeline import run_pipeline
    from vitfold.reduce import TokenLayout, create_method
    from vitfold.runtimes.ort import run_onnx

    model = tiny_vit()
    method = create_method("tome", r=2)
    reduced = method.apply(model, method.schedule(TokenLayout.of(model)))
    images = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    export_onnx(reduced, tmp_path / "model.onnx", images.shape)
    from vitfold.compile import pipeline_for

    passes, _ = pipeline_for(BuildConfig("tensorrt", "f32"))  # the installed TensorRT's own (8.5 needs more)
    run_pipeline(tmp_path / "model.onnx", tmp_path / "model.opt.onnx", passes, [images])
    reference = run_onnx(tmp_path / "model.opt.onnx", [images])[0]["logits"]
    sessions = {}
    for graph in (True, False):
        config = BuildConfig("tensorrt", "f32", extra={"engine_cache": False, "cuda_graph": graph})
        trt_backend.build(tmp_path / "model.opt.onnx", tmp_path, config)
        sessions[graph] = trt_backend.load(tmp_path, _manifest(config))
        np.testing.assert_allclose(sessions[graph](images)["logits"], reference, atol=1e-3)
    if sessions[True].settings["cuda_bindings"].startswith("cuda-python"):  # graphs are asked for and available
        assert sessions[True].settings["cuda_graph"] == "on"
    else:
        assert sessions[True].settings["cuda_graph"].startswith("off: not available")
    assert sessions[False].settings["cuda_graph"] == "off"
    layers = prof.session_layers(sessions[False], images, warmup=1, runs=3)
    assert len(layers["runs"]) == 3 and all(r["ms"] >= 0 and r["origins"] for r in layers["runs"][0])
    latency = prof.gpu_latency({"a": sessions[True], "b": sessions[False]}, images, warmup=2, runs=20)
    assert latency["a"]["compute"]["runs"] == 20
    assert latency["a"]["compute"]["median_ms"] <= latency["a"]["end_to_end"]["median_ms"]
    for session in sessions.values():
        session.close()


@gpu
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["f32", "fp16"])
def test_gpu_deit_small_dense_and_tome13(tmp_path, precision):
    """DeiT-S dense twin and ToMe r=13 end to end: parity (f32 1e-3 max abs; fp16 cosine >= 0.999 and
    100% top-1 on the photos, enforced by the build) and a profile report."""
    from vitfold.build import BuildRequest, build
    from vitfold.profiles.report import LatencyOptions
    from vitfold.spec import ModelSpec

    request = BuildRequest(ModelSpec("deit_small_patch16_224"), "tome", {"r": 13},
                           BuildConfig("tensorrt", precision, cache_dir=str(tmp_path / "cache")),
                           out=tmp_path / "build", latency=LatencyOptions(min_runs=20, min_seconds=1.0))
    directory, report = build(request, log=lambda message: None)
    for variant in ("dense", "reduced"):
        parity = report["parity_vs_torch"][variant]
        if precision == "f32":
            assert parity["max_abs"] <= 1e-3
        else:
            assert parity["min_cosine"] >= 0.999 and parity["top1_agreement"] == 1.0
    assert (directory / "model.engine").is_file() and (directory / "dense" / "model.engine").is_file()
    gpu_latency = report["backend_profile"]["gpu_latency"]
    for variant in ("dense", "reduced"):
        assert 0 < gpu_latency[variant]["compute"]["median_ms"] <= gpu_latency[variant]["end_to_end"]["median_ms"]


@pytest.mark.parametrize("version, precision, target, has_precision_pass", [
    ("8.5.2", "fp16", "tensorrt-8.5", False),
    ("8.6.1", "fp16", "tensorrt-8.6", False),
    ("9.2.0", "f32", "tensorrt-9", False),
    ("10.3.0", "fp16", "tensorrt-10", False),
    ("11.4.1", "f32", "tensorrt-11", False),
    ("11.4.1", "fp16", "tensorrt-11", True),
])
def test_build_pipeline_follows_the_installed_tensorrt(monkeypatch, version, precision, target, has_precision_pass):
    """GPU-free: passes and lint rules are picked for the TensorRT that will build the engine."""
    import vitfold.runtimes.tensorrt as trt_runtime
    from vitfold.compile import pipeline_for
    from vitfold.runtimes import BuildConfig

    monkeypatch.setattr(trt_runtime, "installed_version", lambda: version)
    passes, lint_target = pipeline_for(BuildConfig(backend="tensorrt", precision=precision))
    assert lint_target == target
    assert "merge-as-matmul" in passes  # no native scatter reduction before 10, a plugin on 10
    assert ("decompose-layernorm" in passes) == (target == "tensorrt-8.5")  # 8.6 adds LayerNormalization
    assert (("precision", {"precision": precision}) in passes) == has_precision_pass


def test_no_driver_is_a_clear_backend_unavailable(monkeypatch):
    """cuda-python 11.8 raises RuntimeError from cudaGetDeviceCount where libcuda.so.1 is missing
    (12.x / 13.x return an error code): the user gets the "no GPU" line, not a traceback."""
    def no_driver():
        raise RuntimeError("Failed to dlopen libcuda.so.1")

    monkeypatch.setattr(cudamem, "_import_cudart", lambda: SimpleNamespace(cudaGetDeviceCount=no_driver))
    with pytest.raises(BackendUnavailable, match="libcuda.so.1.*no NVIDIA driver here"):
        cudamem.open_device(0, prefer="cuda-python")


@pytest.mark.parametrize("version", ["8.6.1", "8.6.2.3", "9.2.0"])
def test_tensorrt_86_and_9_have_lint_rules(version, tmp_path):
    """8.6 and 9 are accepted (they were refused after the export): their own targets, and a ToMe
    graph through their pipeline lints clean."""
    from conftest import tiny_vit
    from vitfold.compile import pipeline_for
    from vitfold.export.onnx import export_onnx
    from vitfold.passes.lint import errors, lint, target_for
    from vitfold.passes.pipeline import run_pipeline
    from vitfold.reduce import TokenLayout, create_method

    target = target_for("tensorrt", version)
    assert target == ("tensorrt-9" if version.startswith("9") else "tensorrt-8.6")
    model = tiny_vit()
    method = create_method("tome", r=2)
    images = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    export_onnx(method.apply(model, method.schedule(TokenLayout.of(model))), tmp_path / "model.onnx", images.shape)
    raw = {f.rule for f in errors(lint(tmp_path / "model.onnx", target))}
    assert "scatter-reduction" in raw  # no scatter reduction before 10: merge-as-matmul is needed
    import vitfold.runtimes.tensorrt as trt_runtime

    original = trt_runtime.installed_version
    trt_runtime.installed_version = lambda: version
    try:
        passes, lint_target = pipeline_for(BuildConfig("tensorrt", "f32"))
    finally:
        trt_runtime.installed_version = original
    assert lint_target == target
    run_pipeline(tmp_path / "model.onnx", tmp_path / "model.opt.onnx", passes, [images])
    assert errors(lint(tmp_path / "model.opt.onnx", target)) == []


def test_build_failure_names_the_error_not_a_routine_warning():
    """A tactic skipped for memory is logged as a warning in many successful builds; the error line
    (no implementation for a node) is the cause and is the one reported."""
    plan = translate_config(BuildConfig("tensorrt", "f32"), "10.3.0")
    messages = ["[W] Skipping tactic 0x3 due to insufficient memory on requested size of 2048 MiB",
                "[E] 10: Could not find any implementation for node {ForeignNode[node_scatter]}."]
    error = trt_backend.diagnose_build_failure(messages, plan)
    assert isinstance(error, ExportError) and "node_scatter" in str(error)
    only_warning = trt_backend.diagnose_build_failure(messages[:1], plan)  # nothing better logged: it is the lead
    assert isinstance(only_warning, SpecError) and "workspace" in str(only_warning)


def test_failed_graph_instantiation_frees_the_captured_graph():
    """cudaGraphInstantiate failing must not leak the graph that stream capture produced."""
    calls = []
    rt = SimpleNamespace(
        cudaStreamCaptureMode=SimpleNamespace(cudaStreamCaptureModeGlobal=0),
        cudaStreamBeginCapture=lambda stream, mode: (0,),
        cudaStreamEndCapture=lambda stream: (0, "graph"),
        cudaGraphInstantiateWithFlags=lambda graph, flags: (1, None),
        cudaGraphDestroy=lambda graph: calls.append(graph) or (0,),
        cudaGetErrorName=lambda err: (0, b"cudaErrorInvalidValue"),
    )
    device = cudamem.CudaPythonDevice.__new__(cudamem.CudaPythonDevice)
    device._rt, device._stream, device._graphs = rt, "stream", []
    import vitfold.runtimes.cudamem as module

    original = module._import_cudart
    module._import_cudart = lambda: rt
    try:
        with pytest.raises(RuntimeError, match="cudaErrorInvalidValue"):
            device.capture(lambda: None)
    finally:
        module._import_cudart = original
    assert calls == ["graph"] and device._graphs == []


def test_rejected_binding_raises():
    from vitfold.runtimes.tensorrt_config import _require

    _require(True, "set_tensor_address(x)")
    _require(None, "set_tensor_address(x)")  # TensorRT 8.5's binding returns None
    with pytest.raises(ArtifactError, match=r"refused set_input_shape\(images, \(9, 3, 224, 224\)\)"):
        _require(False, "set_input_shape(images, (9, 3, 224, 224))")


def test_per_layer_pass_uses_the_sessions_own_context_and_restores_its_shape():
    """TensorRT 8.5: one optimisation profile per context, so the profiler runs on the session's own
    context (no second one); a dynamic session gets its input shape back, the profiler detached."""
    events = []

    class Profiler:
        def __init__(self):
            self.layers = []

    class Context:
        profiler = None
        shape = (8, 3, 32, 32)

        def get_tensor_shape(self, name):
            return self.shape

        def set_input_shape(self, name, shape):
            events.append(("shape", tuple(shape)))
            self.shape = tuple(shape)
            return True

        def execute_async_v3(self, stream):
            self.profiler.layers = [("layer0", 0.5)]
            return True

    class Engine:
        num_layers = 1

        def create_engine_inspector(self):
            return SimpleNamespace(get_layer_information=lambda i, fmt: json.dumps(
                {"Name": "layer0", "LayerType": "MatMul", "Inputs": [], "Outputs": []}))

        def create_execution_context(self):
            raise AssertionError("a second execution context breaks TensorRT 8.5's one-profile-per-context rule")

    class trt:  # the module's stand-in (hashable, as the real module is)
        IProfiler = object
        LayerInformationFormat = SimpleNamespace(JSON=1)

    prof._PROFILER[trt] = Profiler
    context = Context()
    device = SimpleNamespace(h2d=lambda ptr, host: None, event=lambda: None, record=lambda e: None, synchronize=lambda: None,
                             elapsed_ms=lambda a, b: 1.0, stream_handle=0)
    session = SimpleNamespace(_trt=trt, _engine=Engine(), _device=device, _context=context, _input="images", dynamic=True,
                              _ptr={"images": 1}, _view=lambda name: np.zeros((1, 3, 32, 32), np.float32), settings={})
    result = prof.session_layers(session, np.ones((1, 3, 32, 32), np.float32), warmup=1, runs=2)
    assert [r[0]["name"] for r in result["runs"]] == ["layer0", "layer0"] and result["run_ms"] == [1.0, 1.0]
    assert events == [("shape", (1, 3, 32, 32)), ("shape", (8, 3, 32, 32))] and context.shape == (8, 3, 32, 32)
    assert context.profiler is None


def test_plugin_libraries_with_get_creators_go_through_the_registry(monkeypatch, tmp_path):
    import ctypes

    calls = []
    old, new, copy, other = (tmp_path / f"lib{name}.so" for name in ("old", "new", "copy", "other"))
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    copy.write_bytes(b"y")  # a build folder's copy of the cached plugin: the same bytes
    other.write_bytes(b"z")
    libraries = {str(old): SimpleNamespace(), **{str(p): SimpleNamespace(getCreators=lambda: None) for p in (new, copy, other)}}
    monkeypatch.setattr(ctypes, "CDLL", lambda path, mode=0: libraries[path])
    monkeypatch.setattr(trt_backend, "_LOADED_PLUGINS", {})
    registry = SimpleNamespace(load_library=lambda path: calls.append(path) or object())
    trt = SimpleNamespace(get_plugin_registry=lambda: registry)
    loaded = trt_backend.load_plugins([str(old), str(new)], trt)
    assert [p["loaded_by"] for p in loaded] == ["dlopen", "plugin registry"] and calls == [str(new)]
    registry.load_library = lambda path: None  # TensorRT refuses a library whose plugins are registered already
    assert trt_backend.load_plugins([str(copy)], trt)[0]["loaded_by"] == "plugin registry"  # not loaded twice
    with pytest.raises(SpecError, match="registry refused"):
        trt_backend.load_plugins([str(other)], trt)


def test_stream_handle_and_pycuda_context_release():
    """cuda-bindings 13 deprecates int(cudaStream_t): the address comes from getPtr(); pycuda's
    primary context is popped and detached on close."""
    device = cudamem.CudaPythonDevice.__new__(cudamem.CudaPythonDevice)
    device._stream = SimpleNamespace(getPtr=lambda: 0x7F00)
    assert device.stream_handle == 0x7F00
    calls = []
    pycuda = cudamem.PyCudaDevice.__new__(cudamem.PyCudaDevice)
    pycuda._stream = SimpleNamespace(synchronize=lambda: None)
    pycuda._allocations, pycuda._host = [], []
    pycuda._context = SimpleNamespace(pop=lambda: calls.append("pop"), detach=lambda: calls.append("detach"))
    pycuda.close()
    assert calls == ["pop", "detach"] and pycuda._context is None


def test_bf16_on_tensorrt_is_refused_before_any_export():
    """The record offers f32 / fp16 / int8: the request itself is refused, before a model is built."""
    from vitfold.build import BuildRequest
    from vitfold.spec import ModelSpec

    with pytest.raises(SpecError, match="--precision bf16 is not built for tensorrt; choose f32 or fp16 or int8"):
        BuildRequest(ModelSpec("deit_small_patch16_224"), build=BuildConfig("tensorrt", "bf16"))


@gpu
@pytest.mark.slow
def test_gpu_fp16_beats_f32_and_tome_beats_dense_at_batch_8(tmp_path):
    """The fast paths are on: at batch 8 an fp16 engine runs faster than the f32 one, and ToMe r=13
    faster than dense at the same precision (GPU event medians of one interleaved run), with parity."""
    from vitfold.compile import compile_module
    from vitfold.export.models import create_model
    from vitfold.reduce import TokenLayout, create_method
    from vitfold.spec import ModelSpec

    model, _ = create_model(ModelSpec("deit_small_patch16_224"))
    images = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
    sessions = {}
    for label, r in (("dense", 0), ("tome", 13)):
        method = create_method("tome", r=r)
        module = method.apply(model, method.schedule(TokenLayout.of(model)))
        for precision in ("f32", "fp16"):
            cfg = BuildConfig("tensorrt", precision, extra={"engine_cache": False})
            compiled = compile_module(module, images.shape, tmp_path / f"{label}-{precision}", cfg, sample=images)
            sessions[f"{label} {precision}"] = compiled.open(cfg)
    for label in ("dense", "tome"):
        f32, fp16 = sessions[f"{label} f32"](images)["logits"], sessions[f"{label} fp16"](images)["logits"]
        cosine = (f32 * fp16).sum(1) / np.linalg.norm(f32, axis=1) / np.linalg.norm(fp16, axis=1)
        assert cosine.min() >= 0.999
    latency = prof.gpu_latency(sessions, images, warmup=10, runs=50)
    ms = {k: v["compute"]["median_ms"] for k, v in latency.items()}
    assert ms["dense fp16"] < ms["dense f32"] and ms["tome fp16"] < ms["tome f32"], ms
    assert ms["tome f32"] < ms["dense f32"] and ms["tome fp16"] < ms["dense fp16"], ms
    for session in sessions.values():
        session.close()
