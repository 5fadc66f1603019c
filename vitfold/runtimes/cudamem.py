"""CUDA device memory, streams, events and graphs for the TensorRT runtime. No torch.

Two implementations behind one small class, picked at :func:`open_device`:

- cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart`` on cuda-python < 12.6): what
  TensorRT's own Python samples use (``samples/python/common_runtime.py``). Every call returns
  ``(cudaError_t, value...)``; :func:`_check` turns a non-zero error into a ``RuntimeError`` naming it.
- pycuda (``pycuda.driver``), for device images that ship only pycuda. It runs in the device's
  primary context (the one TensorRT uses) and has no CUDA graph capture here.

Pointers are plain ``int`` device addresses (what ``IExecutionContext.set_tensor_address`` takes);
host staging buffers are page-locked numpy arrays so that copies are truly asynchronous.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
from typing import Optional

import numpy as np

from ..errors import BackendUnavailable

CUDA_INSTALL_HINT = (
    'pip install "cuda-python>=12" matching the CUDA major version of your driver / JetPack '
    "(JetPack 5: cuda-python 11.8.x; JetPack 6: 12.x; JetPack 7: 13.x), or pycuda on images that ship it"
)


def _import_cudart():
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _version(*dists: str) -> str:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _check(result):
    """Unpack a cuda-python ``(err, *values)`` tuple; raise ``RuntimeError`` naming a CUDA error."""
    err, values = result[0], result[1:]
    if int(err) != 0:
        cudart = _import_cudart()
        name = cudart.cudaGetErrorName(err)[1] if cudart is not None else str(err)
        name = name.decode() if isinstance(name, bytes) else str(name)
        raise RuntimeError(f"CUDA error {int(err)} ({name})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _pinned_view(ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = (ctypes.c_byte * max(nbytes, 1)).from_address(ptr)
    return np.frombuffer(raw, dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)


class CudaDevice:
    """One CUDA device with its own stream: allocations, copies, events, optional graph capture.

    Attributes:
        api: ``cuda-python <version>`` or ``pycuda <version>``.
        name / compute_capability: the GPU (e.g. ``"Orin"``, ``(8, 7)``).
        supports_graphs: whether :meth:`capture` can record a CUDA graph.
        stream_handle: the stream as an ``int`` (what ``execute_async_v3`` takes).
    """

    api = "none"
    supports_graphs = False

    def __init__(self, name: str, compute_capability: tuple[int, int]):
        self.name = name
        self.compute_capability = tuple(compute_capability)

    # Each backend implements the methods below; all sizes in bytes, all times in ms.
    def malloc(self, nbytes: int) -> int: raise NotImplementedError
    def pinned(self, shape: tuple[int, ...], dtype) -> np.ndarray: raise NotImplementedError
    def h2d(self, dst: int, src: np.ndarray) -> None: raise NotImplementedError
    def d2h(self, dst: np.ndarray, src: int) -> None: raise NotImplementedError
    def synchronize(self) -> None: raise NotImplementedError
    def event(self): raise NotImplementedError
    def record(self, event) -> None: raise NotImplementedError
    def elapsed_ms(self, start, end) -> float: raise NotImplementedError
    def close(self) -> None: raise NotImplementedError

    @property
    def stream_handle(self) -> int: raise NotImplementedError

    def capture(self, enqueue) -> object:
        """Record ``enqueue()`` (work on this stream) into an instantiated CUDA graph."""
        raise RuntimeError(f"{self.api} path: CUDA graph capture is not available")

    def launch(self, graph) -> None: raise NotImplementedError


class CudaPythonDevice(CudaDevice):
    """cuda-python runtime API (``cudaMalloc``, ``cudaMemcpyAsync``, ``cudaEvent*``, ``cudaGraph*``)."""

    supports_graphs = True

    def __init__(self, cudart, index: int = 0):
        self._rt = cudart
        _check(cudart.cudaSetDevice(index))
        props = _check(cudart.cudaGetDeviceProperties(index))
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        super().__init__(name.rstrip("\x00").strip(), (int(props.major), int(props.minor)))
        self.api = f"cuda-python {_version('cuda-python', 'cuda-bindings')}"
        self._stream = _check(cudart.cudaStreamCreate())
        self._device: list[int] = []
        self._host: list[int] = []
        self._events: list = []
        self._graphs: list = []

    @property
    def stream_handle(self) -> int:
        # cudaStream_t.getPtr() is the address in every cuda-python; int(handle) is deprecated in cuda-bindings 13
        get_ptr = getattr(self._stream, "getPtr", None)
        return int(get_ptr()) if get_ptr is not None else int(self._stream)

    def malloc(self, nbytes: int) -> int:
        ptr = int(_check(self._rt.cudaMalloc(max(int(nbytes), 1))))
        self._device.append(ptr)
        return ptr

    def pinned(self, shape, dtype) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        ptr = int(_check(self._rt.cudaMallocHost(max(nbytes, 1))))
        self._host.append(ptr)
        return _pinned_view(ptr, tuple(shape), np.dtype(dtype))

    def h2d(self, dst: int, src: np.ndarray) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(self._rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, self._stream))

    def d2h(self, dst: np.ndarray, src: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(self._rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, self._stream))

    def synchronize(self) -> None:
        _check(self._rt.cudaStreamSynchronize(self._stream))

    def event(self):
        event = _check(self._rt.cudaEventCreate())
        self._events.append(event)
        return event

    def record(self, event) -> None:
        _check(self._rt.cudaEventRecord(event, self._stream))

    def elapsed_ms(self, start, end) -> float:
        _check(self._rt.cudaEventSynchronize(end))
        return float(_check(self._rt.cudaEventElapsedTime(start, end)))

    def capture(self, enqueue):
        """Stream capture in global mode around ``enqueue``; returns the instantiated graph.

        TensorRT's developer guide (CUDA Graphs): run ``enqueueV3`` once before capturing, so that
        deferred shape-dependent work is not captured; the caller does that.
        """
        rt = self._rt
        _check(rt.cudaStreamBeginCapture(self._stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
        try:
            enqueue()
        finally:
            graph = _check(rt.cudaStreamEndCapture(self._stream))
        instantiate = getattr(rt, "cudaGraphInstantiateWithFlags", None) or rt.cudaGraphInstantiate
        try:
            graph_exec = _check(instantiate(graph, 0))
        except Exception:
            rt.cudaGraphDestroy(graph)  # the captured graph is ours until an executable holds it
            raise
        self._graphs.append((graph, graph_exec))
        return graph_exec

    def launch(self, graph) -> None:
        _check(self._rt.cudaGraphLaunch(graph, self._stream))

    def close(self) -> None:
        rt = self._rt
        if self._stream is None:
            return
        rt.cudaStreamSynchronize(self._stream)
        for graph, graph_exec in self._graphs:
            rt.cudaGraphExecDestroy(graph_exec)
            rt.cudaGraphDestroy(graph)
        for event in self._events:
            rt.cudaEventDestroy(event)
        for ptr in self._device:
            rt.cudaFree(ptr)
        for ptr in self._host:
            rt.cudaFreeHost(ptr)
        rt.cudaStreamDestroy(self._stream)
        self._graphs, self._events, self._device, self._host, self._stream = [], [], [], [], None


class PyCudaDevice(CudaDevice):
    """pycuda driver API in the device's primary context (shared with TensorRT's runtime API)."""

    def __init__(self, driver, index: int = 0):
        self._drv = driver
        driver.init()
        device = driver.Device(index)
        self._context = device.retain_primary_context()
        self._context.push()
        super().__init__(device.name(), tuple(device.compute_capability()))
        self.api = f"pycuda {_version('pycuda')}"
        self._stream = driver.Stream()
        self._allocations: list = []
        self._host: list[np.ndarray] = []

    @property
    def stream_handle(self) -> int:
        return int(self._stream.handle)

    def malloc(self, nbytes: int) -> int:
        allocation = self._drv.mem_alloc(max(int(nbytes), 1))
        self._allocations.append(allocation)
        return int(allocation)

    def pinned(self, shape, dtype) -> np.ndarray:
        array = self._drv.pagelocked_empty(tuple(shape), np.dtype(dtype))
        self._host.append(array)
        return array

    def h2d(self, dst: int, src: np.ndarray) -> None:
        self._drv.memcpy_htod_async(dst, src, self._stream)

    def d2h(self, dst: np.ndarray, src: int) -> None:
        self._drv.memcpy_dtoh_async(dst, src, self._stream)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def event(self):
        return self._drv.Event()

    def record(self, event) -> None:
        event.record(self._stream)

    def elapsed_ms(self, start, end) -> float:
        end.synchronize()
        return float(end.time_since(start))

    def close(self) -> None:
        if self._context is None:
            return
        self._stream.synchronize()
        for allocation in self._allocations:
            allocation.free()
        self._allocations, self._host = [], []
        self._context.pop()
        self._context.detach()  # release our reference on the primary context (retain_primary_context took one)
        self._context = None


def open_device(index: int = 0, prefer: Optional[str] = None) -> CudaDevice:
    """Open GPU ``index`` through cuda-python, or pycuda when cuda-python is absent.

    Args:
        index: CUDA device ordinal.
        prefer: ``"cuda-python"`` or ``"pycuda"`` to force one path.

    Raises:
        BackendUnavailable: neither package is installed, or no usable GPU / driver (names the CUDA
            error, e.g. ``cudaErrorNoDevice`` or ``cudaErrorInsufficientDriver``; cuda-python 11.8
            raises instead of returning one when there is no driver at all, and that is caught too).
    """
    cudart = _import_cudart() if prefer in (None, "cuda-python") else None
    if cudart is not None:
        try:
            count = cudart.cudaGetDeviceCount()
        except RuntimeError as exc:  # cuda-python 11.8 raises when libcuda.so.1 (the driver) is absent
            raise BackendUnavailable(
                f"TensorRT needs an NVIDIA GPU: CUDA could not start ({exc}); no NVIDIA driver here. Run on a "
                "Jetson / NVIDIA GPU machine with its driver installed, or pick --backend openvino / onnxruntime here."
            ) from exc
        if int(count[0]) != 0 or count[1] <= index:
            name = cudart.cudaGetErrorName(count[0])[1] if int(count[0]) else b"no such device"
            name = name.decode() if isinstance(name, bytes) else str(name)
            raise BackendUnavailable(
                f"TensorRT needs an NVIDIA GPU: CUDA reports {name} for device {index} "
                f"({count[1] or 0} device(s) visible). Run on a Jetson / NVIDIA GPU machine with its driver "
                "installed, or pick --backend openvino / onnxruntime here."
            )
        return CudaPythonDevice(cudart, index)
    if prefer in (None, "pycuda"):
        try:
            driver = importlib.import_module("pycuda.driver")
        except ImportError:
            driver = None
        if driver is not None:
            try:
                return PyCudaDevice(driver, index)
            except Exception as exc:  # pycuda raises its own LogicError/RuntimeError for no device
                raise BackendUnavailable(
                    f"TensorRT needs an NVIDIA GPU: pycuda could not open device {index} ({exc}); "
                    "pick --backend openvino / onnxruntime here."
                ) from exc
    raise BackendUnavailable(
        f"no CUDA Python bindings here (neither cuda-python nor pycuda is installed); install with: {CUDA_INSTALL_HINT}"
    )
