"""vitfold's TensorRT plugins ``ToMeMerge`` and ``EViTPrune`` (``vitfold/native/tensorrt``), without
TensorRT or a GPU.

``ToMeMerge`` computes ToMe's bipartite soft matching with a sum merge (Bolya et al., ICLR 2023, Sec. 3)
as ``vitfold/native/openvino/tome_op.cpp`` does. Its GPU-free core (``tome_plugin_core.h``: attributes,
validation, shape inference, serialisation, workspace size, and the merge steps the CUDA kernel runs)
is compiled here with g++ into a small C-ABI library and driven through ctypes: shapes, refusals, the
byte format, and the host reference of the merge against numpy and ``vitfold.reduce.matching``.
``EViTPrune`` (EViT's top-k of the class attention and inattentive-token fusion, Liang et al., ICLR 2022,
Sec. 3; Top-K with ``fuse = 0``), as ``vitfold/native/openvino/prune_op.cpp``: the same for its core
(``prune_plugin_core.h``, the ``vitfold_trt_prune_*`` functions of the same library), against numpy and
``vitfold.reduce.evit._prune``.

Where the TensorRT headers are there (``VITFOLD_TRT_INCLUDE``: a TensorRT ``include/`` folder, e.g. a
checkout of github.com/NVIDIA/TensorRT), the real plugin is also syntax-checked, and with nvcc it is
built and driven through TensorRT's plugin interfaces by ``plugin_host_check.cpp`` (no kernel runs).
``VITFOLD_CUDA_INCLUDE`` names the CUDA headers when they are not next to nvcc or in /usr/local/cuda.
Each test skips, saying what is missing, where its toolchain is not there.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

SOURCE = Path(__file__).resolve().parents[1] / "vitfold" / "native" / "tensorrt"
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
NVCC = shutil.which("nvcc")
TRT_INCLUDE = os.environ.get("VITFOLD_TRT_INCLUDE")
needs_cxx = pytest.mark.skipif(CXX is None, reason="compiling the TensorRT plugin's core needs a C++17 compiler (g++)")

# tome_plugin_core.h's Status values.
(OK, NEGATIVE_R, NEGATIVE_PROTECTED, R_TOO_LARGE, BAD_X_RANK, BAD_KEYS_RANK, BATCH_MISMATCH, TOKEN_MISMATCH, BAD_DIM,
 NULL_ARGUMENT, BUFFER_TOO_SMALL, TRUNCATED, BAD_MAGIC, BAD_VERSION, BAD_PAYLOAD_SIZE, OVERFLOW,
 BAD_KEEP, BAD_FUSE, BAD_ATTN_RANK) = range(19)
RECORD = "<4sIIii"  # the serialised attributes, format version 1: magic, version, payload bytes, r, num_protected

I64P = ctypes.POINTER(ctypes.c_int64)
I32P = ctypes.POINTER(ctypes.c_int32)
F32P = ctypes.POINTER(ctypes.c_float)
U8P = ctypes.POINTER(ctypes.c_uint8)


def compile_core(out_dir: Path) -> Path:
    """Compile ``tome_plugin_core_capi.cpp`` into ``out_dir/libvitfold_trt_core.so`` with g++ (C++17)."""
    library = out_dir / "libvitfold_trt_core.so"
    cmd = [CXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off", "-shared", "-fPIC",
           "-fvisibility=hidden",
           str(SOURCE / "tome_plugin_core_capi.cpp"), "-o", str(library)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    return library


def load_core(library: Path) -> ctypes.CDLL:
    """Load the core library and declare the C ABI's signatures."""
    lib = ctypes.CDLL(str(library))
    signatures = {
        "vitfold_trt_core_abi_version": (ctypes.c_int32, []),
        "vitfold_trt_core_plugin_name": (ctypes.c_char_p, []),
        "vitfold_trt_core_plugin_version": (ctypes.c_char_p, []),
        "vitfold_trt_core_status_message": (ctypes.c_char_p, [ctypes.c_int32]),
        "vitfold_trt_core_validate": (ctypes.c_int32, [ctypes.c_int32, ctypes.c_int32, I64P, ctypes.c_int32, I64P,
                                                       ctypes.c_int32]),
        "vitfold_trt_core_output_dims": (ctypes.c_int32, [ctypes.c_int32, ctypes.c_int32, I64P, ctypes.c_int32, I64P,
                                                          ctypes.c_int32, I64P, ctypes.c_int32, I32P]),
        "vitfold_trt_core_max_merge": (ctypes.c_int64, [ctypes.c_int64, ctypes.c_int64]),
        "vitfold_trt_core_serialized_size": (ctypes.c_int64, []),
        "vitfold_trt_core_serialize": (ctypes.c_int32, [ctypes.c_int32, ctypes.c_int32, U8P, ctypes.c_int64, I64P]),
        "vitfold_trt_core_deserialize": (ctypes.c_int32, [U8P, ctypes.c_int64, I32P, I32P]),
        "vitfold_trt_core_workspace_size": (ctypes.c_int64, [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]),
        "vitfold_trt_core_reference": (ctypes.c_int32, [ctypes.c_int32, ctypes.c_int32, I64P, ctypes.c_int32, I64P,
                                                        ctypes.c_int32, F32P, F32P, F32P]),
        "vitfold_trt_prune_plugin_name": (ctypes.c_char_p, []),
        "vitfold_trt_prune_plugin_version": (ctypes.c_char_p, []),
        "vitfold_trt_prune_validate": (ctypes.c_int32, [ctypes.c_int32] * 3 + [I64P, ctypes.c_int32, I64P,
                                                                               ctypes.c_int32]),
        "vitfold_trt_prune_output_dims": (ctypes.c_int32, [ctypes.c_int32] * 3 + [I64P, ctypes.c_int32, I64P,
                                                                                  ctypes.c_int32, I64P, ctypes.c_int32,
                                                                                  I32P]),
        "vitfold_trt_prune_serialized_size": (ctypes.c_int64, []),
        "vitfold_trt_prune_serialize": (ctypes.c_int32, [ctypes.c_int32] * 3 + [U8P, ctypes.c_int64, I64P]),
        "vitfold_trt_prune_deserialize": (ctypes.c_int32, [U8P, ctypes.c_int64, I32P, I32P, I32P]),
        "vitfold_trt_prune_workspace_size": (ctypes.c_int64, [ctypes.c_int64] * 3),
        "vitfold_trt_prune_reference": (ctypes.c_int32, [ctypes.c_int32] * 3 + [I64P, ctypes.c_int32, I64P,
                                                                                ctypes.c_int32, F32P, F32P, F32P]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


@pytest.fixture(scope="module")
def core(tmp_path_factory) -> ctypes.CDLL:
    """The core's C ABI, compiled once per module into a temporary folder."""
    if CXX is None:
        pytest.skip("compiling the TensorRT plugin's core needs a C++17 compiler (g++)")
    return load_core(compile_core(tmp_path_factory.mktemp("trt_core")))


def int64s(values) -> ctypes.Array:
    """A ctypes int64 array of ``values``."""
    return (ctypes.c_int64 * max(1, len(values)))(*values)


def output_dims(core, r: int, protected: int, x: tuple, keys: tuple) -> tuple[int, tuple]:
    """``(status, output dims)`` of the core's shape inference for tokens ``x`` and keys ``keys`` dims."""
    out, rank = int64s([0] * 8), ctypes.c_int32(0)
    status = core.vitfold_trt_core_output_dims(r, protected, int64s(x), len(x), int64s(keys), len(keys), out, 8,
                                               ctypes.byref(rank))
    return status, tuple(out[: rank.value])


def validate(core, r: int, protected: int, x: tuple, keys: tuple) -> int:
    """The core's validation status for these attributes and input dims."""
    return core.vitfold_trt_core_validate(r, protected, int64s(x), len(x), int64s(keys), len(keys))


def serialize(core, r: int, protected: int, capacity: int = 64) -> tuple[int, bytes]:
    """``(status, record bytes)`` of the core's attribute serialisation."""
    buffer, written = (ctypes.c_uint8 * capacity)(), ctypes.c_int64(0)
    status = core.vitfold_trt_core_serialize(r, protected, buffer, capacity, ctypes.byref(written))
    return status, bytes(buffer[: written.value]) if status == OK else b""


def deserialize(core, record: bytes) -> tuple[int, int, int]:
    """``(status, r, num_protected)`` read back from ``record`` (r, num_protected are -7 when refused)."""
    buffer = (ctypes.c_uint8 * max(1, len(record))).from_buffer_copy(record or b"\0")
    r, protected = ctypes.c_int32(-7), ctypes.c_int32(-7)
    status = core.vitfold_trt_core_deserialize(buffer, len(record), ctypes.byref(r), ctypes.byref(protected))
    return status, r.value, protected.value


def reference(core, x: np.ndarray, keys: np.ndarray, r: int, protected: int) -> np.ndarray:
    """The core's host reference of the merge (the CUDA kernel's steps, in its order): ``[B, N - r, C]``."""
    x, keys = np.ascontiguousarray(x, np.float32), np.ascontiguousarray(keys, np.float32)
    out = np.full((x.shape[0], x.shape[1] - r, x.shape[2]), np.nan, np.float32)
    pointers = (array.ctypes.data_as(F32P) for array in (x, keys, out))
    status = core.vitfold_trt_core_reference(r, protected, int64s(x.shape), x.ndim, int64s(keys.shape), keys.ndim,
                                             *pointers)
    assert status == OK, core.vitfold_trt_core_status_message(status)
    return out


def numpy_merge(x: np.ndarray, keys: np.ndarray, r: int, protected: int) -> np.ndarray:
    """ToMe's merge written out in numpy from matching.py's definition (float64 scores).

    metric = keys averaged over heads (or the ``[B, N, D]`` metric itself), rows L2-normalised; A = even
    tokens, B = odd; prefix scores -inf; each A token's best B (first on ties); the r strongest edges
    (stable) summed into their partners in edge order; ``cat([unmerged A, B])`` with the unmerged A by
    position when there are prefix tokens, else by score, and matching._prefix_order for >= 2 prefixes.
    """
    if r == 0:
        return x.copy()
    metric = keys.mean(1) if keys.ndim == 4 else keys
    batch, tokens, _ = x.shape
    num_a, num_b = (tokens + 1) // 2, tokens // 2
    kept = num_a - r
    order = None
    if protected > 1:
        in_a, in_b = (protected + 1) // 2, protected // 2
        order = [p // 2 if p % 2 == 0 else kept + p // 2 for p in range(protected)]
        order += list(range(in_a, kept)) + list(range(kept + in_b, tokens - r))
    images = []
    for b in range(batch):
        unit = metric[b].astype(np.float64)
        unit = unit / np.linalg.norm(unit, axis=-1, keepdims=True)
        scores = unit[0::2] @ unit[1::2].T
        scores[np.arange(num_a) * 2 < protected, :] = -np.inf
        scores[:, np.arange(num_b) * 2 + 1 < protected] = -np.inf
        best, partner = scores.max(-1), scores.argmax(-1)
        edges = np.argsort(-best, kind="stable")
        unmerged = np.sort(edges[r:]) if protected else edges[r:]
        a, dst = x[b, 0::2], x[b, 1::2].copy()
        for i in edges[:r]:
            dst[partner[i]] += a[i]
        rows = np.concatenate([a[unmerged], dst])
        images.append(rows[order] if order is not None else rows)
    return np.stack(images)


def sample(batch: int, tokens: int, channels: int, heads: int | None, width: int, seed: int = 0):
    """Random float32 tokens ``[B, N, C]`` and keys ``[B, H, N, D]`` (``[B, N, D]`` when heads is None)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, tokens, channels)).astype(np.float32)
    shape = (batch, tokens, width) if heads is None else (batch, heads, tokens, width)
    return x, rng.standard_normal(shape).astype(np.float32)


# -------------------------------------------------------------------------------------------- core


def test_plugin_identity(core):
    assert core.vitfold_trt_core_abi_version() == 1
    assert core.vitfold_trt_core_plugin_name() == b"ToMeMerge"  # the fused node's op_type (vitfold.native.TOME_OP)
    assert core.vitfold_trt_core_plugin_version() == b"1"  # the ONNX parser's default plugin_version


@pytest.mark.parametrize("batch, tokens, channels, heads, width, r, protected", [
    (2, 197, 384, 6, 64, 13, 1),   # DeiT-S, class token
    (1, 17, 8, None, 4, 0, 0),     # r = 0: the identity, from a [B, N, D] metric
    (3, 10, 6, 2, 5, 4, 2),        # class + distillation
    (2, 9, 4, 1, 3, 3, 3),         # r at max_merge(9, 3) = 3
    (4, 201, 16, 3, 8, 98, 4),     # registers, r at max_merge
    (1, 2, 3, 1, 1, 1, 0),         # the smallest merge
])
def test_output_dims(core, batch, tokens, channels, heads, width, r, protected):
    keys = (batch, tokens, width) if heads is None else (batch, heads, tokens, width)
    assert output_dims(core, r, protected, (batch, tokens, channels), keys) == (OK, (batch, tokens - r, channels))


def test_unknown_dims_stay_unknown_and_are_checked_once_known(core):
    # dynamic B and N: out N = N - r stays symbolic (-1 here); r is checked when N is known
    assert output_dims(core, 50, 1, (-1, -1, 8), (-1, 2, -1, 4)) == (OK, (-1, -1, 8))
    assert output_dims(core, 3, 1, (-1, 17, 8), (2, 2, -1, 4)) == (OK, (-1, 14, 8))
    assert output_dims(core, 9, 0, (-1, 17, 8), (-1, 2, -1, 4))[0] == R_TOO_LARGE  # max_merge(17, 0) = 8
    assert output_dims(core, 9, 0, (-1, -1, 8), (-1, 2, 17, 4))[0] == R_TOO_LARGE  # N known from the keys


def test_max_merge_never_exceeds_the_mergeable_a_tokens(core):
    for tokens in range(40):
        for protected in range(8):
            limit = core.vitfold_trt_core_max_merge(tokens, protected)
            assert limit == max(0, (tokens - protected) // 2)  # matching.max_merge
            assert limit <= (tokens + 1) // 2 - (protected + 1) // 2 or limit == 0  # unprotected A tokens
            assert limit == 0 or tokens // 2 - protected // 2 >= 1  # an unprotected B partner exists
            x, keys = (1, tokens, 4), (1, 2, tokens, 3)
            assert validate(core, limit, protected, x, keys) == OK
            assert validate(core, limit + 1, protected, x, keys) == R_TOO_LARGE


@pytest.mark.parametrize("r, protected, x, keys, status", [
    (-1, 0, (2, 17, 8), (2, 2, 17, 4), NEGATIVE_R),
    (1, -1, (2, 17, 8), (2, 2, 17, 4), NEGATIVE_PROTECTED),
    (9, 0, (2, 17, 8), (2, 2, 17, 4), R_TOO_LARGE),      # 17 tokens: 9 A tokens, but max_merge 8
    (8, 2, (2, 17, 8), (2, 2, 17, 4), R_TOO_LARGE),      # max_merge(17, 2) = 7
    (1, 20, (2, 17, 8), (2, 2, 17, 4), R_TOO_LARGE),     # every token protected
    (1, 0, (17, 8), (2, 2, 17, 4), BAD_X_RANK),
    (1, 0, (1, 2, 17, 8), (2, 2, 17, 4), BAD_X_RANK),
    (1, 0, (2, 17, 8), (2, 17), BAD_KEYS_RANK),
    (1, 0, (2, 17, 8), (2, 1, 2, 17, 4), BAD_KEYS_RANK),
    (1, 0, (2, 17, 8), (3, 2, 17, 4), BATCH_MISMATCH),
    (1, 0, (2, 17, 8), (2, 2, 16, 4), TOKEN_MISMATCH),
    (1, 0, (2, 17, 8), (2, 17, 16), OK),                  # a [B, N, D] metric wider than the tokens is fine
    (1, 0, (2, 17, 8), (2, 17, 0), BAD_DIM),
    (1, 0, (2, 17, 8), (2, 0, 17, 4), BAD_DIM),
    (1, 0, (2, -2, 8), (2, 2, 17, 4), BAD_DIM),
])
def test_validation_refuses(core, r, protected, x, keys, status):
    assert validate(core, r, protected, x, keys) == status
    assert output_dims(core, r, protected, x, keys)[0] == status
    assert core.vitfold_trt_core_status_message(status)  # every status has a message


# ----------------------------------------------------------------------------------- serialisation


@pytest.mark.parametrize("r, protected", [(0, 0), (13, 1), (98, 4), (2**31 - 1, 2**31 - 1)])
def test_serialise_round_trip_and_byte_format(core, r, protected):
    status, record = serialize(core, r, protected)
    assert status == OK and len(record) == core.vitfold_trt_core_serialized_size() == 20
    assert record == struct.pack(RECORD, b"VTMM", 1, 8, r, protected)
    assert deserialize(core, record) == (OK, r, protected)


def test_serialise_refuses_a_small_buffer_and_bad_attributes(core):
    assert serialize(core, 3, 1, capacity=19)[0] == BUFFER_TOO_SMALL
    assert serialize(core, -1, 1)[0] == NEGATIVE_R
    assert serialize(core, 1, -1)[0] == NEGATIVE_PROTECTED


def test_deserialise_refuses_truncated_foreign_and_other_version_records(core):
    record = struct.pack(RECORD, b"VTMM", 1, 8, 13, 1)
    for size in range(len(record)):
        assert deserialize(core, record[:size]) == (TRUNCATED, -7, -7), size
    assert deserialize(core, struct.pack(RECORD, b"VTMX", 1, 8, 13, 1))[0] == BAD_MAGIC
    assert deserialize(core, struct.pack(RECORD, b"VTMM", 2, 8, 13, 1))[0] == BAD_VERSION
    assert deserialize(core, struct.pack(RECORD, b"VTMM", 0, 8, 13, 1))[0] == BAD_VERSION
    assert deserialize(core, struct.pack(RECORD, b"VTMM", 1, 12, 13, 1) + b"\0" * 4)[0] == BAD_PAYLOAD_SIZE
    assert deserialize(core, record + b"\0")[0] == BAD_PAYLOAD_SIZE
    assert deserialize(core, struct.pack(RECORD, b"VTMM", 1, 8, -3, 1))[0] == NEGATIVE_R
    assert deserialize(core, struct.pack(RECORD, b"VTMM", 1, 8, 3, -1))[0] == NEGATIVE_PROTECTED


def test_workspace_size(core):
    size = core.vitfold_trt_core_workspace_size
    # one image of 197 tokens, D = 64: unit 197 * 64 floats (50432 bytes), then best, partner, rank, order
    # (99 x 4 bytes, each padded to 512) and aslot (99 x 8 bytes, padded to 1024)
    assert size(1, 197, 64) == 50432 + 4 * 512 + 1024
    assert size(2, 197, 64) == 2 * size(1, 197, 64)
    assert size(0, 197, 64) == 0
    for batch, tokens, width in [(1, 1, 1), (3, 10, 5), (2, 577, 64)]:
        num_a = (tokens + 1) // 2
        assert size(batch, tokens, width) >= batch * (tokens * width * 4 + num_a * (4 * 4 + 8))
        assert size(batch, tokens + 1, width) >= size(batch, tokens, width)
        assert size(batch, tokens, width + 1) >= size(batch, tokens, width)
    assert size(-1, 197, 64) == size(1, -1, 64) == size(1, 197, 0) == -1
    assert size(2**40, 2**20, 2**10) == -1  # overflows int64


# ------------------------------------------------------------------------------------- the merge


@pytest.mark.parametrize("batch, tokens, channels, heads, width, r, protected", [
    (2, 17, 8, 3, 4, 5, 0),
    (2, 17, 8, 3, 4, 8, 0),       # r = max_merge
    (2, 16, 6, None, 5, 4, 1),    # a [B, N, D] metric
    (3, 21, 5, 2, 4, 6, 2),       # class + distillation: prefix tokens back at 0 and 1
    (1, 24, 7, 4, 3, 9, 5),       # five prefix tokens (class + 4 registers)
    (2, 9, 4, 1, 3, 0, 1),        # r = 0: the identity
])
def test_host_reference_matches_numpy(core, batch, tokens, channels, heads, width, r, protected):
    x, keys = sample(batch, tokens, channels, heads, width, seed=tokens + r)
    got = reference(core, x, keys, r, protected)
    assert got.shape == (batch, tokens - r, channels) == output_dims(core, r, protected, x.shape, keys.shape)[1]
    np.testing.assert_allclose(got, numpy_merge(x, keys, r, protected), rtol=1e-6, atol=1e-6)
    if protected:  # prefix tokens are never merged and keep their own positions
        np.testing.assert_array_equal(got[:, :protected], x[:, :protected])


@pytest.mark.parametrize("tokens, heads, r, protected", [(17, 3, 6, 0), (20, 2, 7, 1), (23, 4, 8, 2), (30, 2, 10, 5)])
def test_host_reference_makes_matching_py_token_choices(core, tokens, heads, r, protected):
    torch = pytest.importorskip("torch")
    from vitfold.reduce.matching import bipartite_soft_matching

    x, keys = sample(2, tokens, 8, heads, 6, seed=r)
    membership = np.broadcast_to(np.eye(tokens, dtype=np.float32), (2, tokens, tokens)).copy()
    merge, _ = bipartite_soft_matching(torch.from_numpy(keys).mean(1), r, protected)
    for tensor in (membership, x):  # one-hot rows: which tokens each output row holds; then real tokens
        expected = merge(torch.from_numpy(tensor), mode="sum").numpy()
        got = reference(core, tensor, keys, r, protected)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_output_dims_agree_with_onnx_shape_inference_of_the_graph_form(core):
    torch = pytest.importorskip("torch")
    onnx = pytest.importorskip("onnx")
    from vitfold.reduce.matching import bipartite_soft_matching

    class Site(torch.nn.Module):
        """The graph form of one site: head mean, bipartite matching, sum merge."""

        def forward(self, x, keys):
            merge, _ = bipartite_soft_matching(keys.mean(1), 4, 2)
            return merge(x, mode="sum")

    x, keys = sample(2, 13, 6, 3, 4)
    program = torch.onnx.export(Site().eval(), (torch.from_numpy(x), torch.from_numpy(keys)), dynamo=True,
                                opset_version=18, verbose=False)
    inferred = onnx.shape_inference.infer_shapes(program.model_proto)
    shape = tuple(d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim)
    assert shape == (2, 9, 6) == output_dims(core, 4, 2, x.shape, keys.shape)[1]
    assert shape == numpy_merge(x, keys, 4, 2).shape


# ------------------------------------------------------------------------------------ EViTPrune core
# prune_plugin_core.h through the vitfold_trt_prune_* functions of the same library: EViT's attentive-token
# selection and inattentive-token fusion (Liang et al., ICLR 2022, Sec. 3; Top-K is fuse = 0).

PRUNE_RECORD = "<4sIIiii"  # format version 1: magic "VEVP", version, payload bytes (12), keep, num_protected, fuse


def prune_output_dims(core, keep: int, protected: int, fuse: int, x: tuple, attn: tuple) -> tuple[int, tuple]:
    """``(status, output dims)`` of EViTPrune's shape inference for tokens ``x`` and attention ``attn`` dims."""
    out, rank = int64s([0] * 8), ctypes.c_int32(0)
    status = core.vitfold_trt_prune_output_dims(keep, protected, fuse, int64s(x), len(x), int64s(attn), len(attn), out,
                                                8, ctypes.byref(rank))
    return status, tuple(out[: rank.value])


def prune_validate(core, keep: int, protected: int, fuse: int, x: tuple, attn: tuple) -> int:
    return core.vitfold_trt_prune_validate(keep, protected, fuse, int64s(x), len(x), int64s(attn), len(attn))


def prune_serialize(core, keep: int, protected: int, fuse: int, capacity: int = 64) -> tuple[int, bytes]:
    buffer, written = (ctypes.c_uint8 * capacity)(), ctypes.c_int64(0)
    status = core.vitfold_trt_prune_serialize(keep, protected, fuse, buffer, capacity, ctypes.byref(written))
    return status, bytes(buffer[: written.value]) if status == OK else b""


def prune_deserialize(core, record: bytes) -> tuple[int, int, int, int]:
    """``(status, keep, num_protected, fuse)`` read back from ``record`` (-7 each when refused)."""
    buffer = (ctypes.c_uint8 * max(1, len(record))).from_buffer_copy(record or b"\0")
    values = [ctypes.c_int32(-7) for _ in range(3)]
    status = core.vitfold_trt_prune_deserialize(buffer, len(record), *(ctypes.byref(v) for v in values))
    return (status, *(v.value for v in values))


def prune_reference(core, x: np.ndarray, attn: np.ndarray, keep: int, protected: int, fuse: int) -> np.ndarray:
    """The core's host reference (the CUDA kernel's steps, in its order): ``[B, P + keep + fuse, C]``."""
    x, attn = np.ascontiguousarray(x, np.float32), np.ascontiguousarray(attn, np.float32)
    out = np.full((x.shape[0], protected + keep + fuse, x.shape[2]), np.nan, np.float32)
    status = core.vitfold_trt_prune_reference(keep, protected, fuse, int64s(x.shape), x.ndim, int64s(attn.shape),
                                              attn.ndim, *(a.ctypes.data_as(F32P) for a in (x, attn, out)))
    assert status == OK, core.vitfold_trt_core_status_message(status)
    return out


def numpy_prune(x: np.ndarray, attn: np.ndarray, keep: int, protected: int, fuse: int) -> np.ndarray:
    """EViTPrune written out in numpy from its definition (float32 throughout).

    s = attn[:, P:]; the prefix rows; then the keep largest s in falling order, equal scores in rising index
    (a stable sort of -s); then with fuse the not-kept rows in rising index, each x * s rounded to float32
    and added to a float32 sum that starts from 0.
    """
    batch, tokens, channels = x.shape
    P = protected
    out = np.empty((batch, P + keep + fuse, channels), np.float32)
    for b in range(batch):
        s = attn[b, P:]
        idx = np.argsort(-s, kind="stable")[:keep]
        out[b, :P] = x[b, :P]
        out[b, P:P + keep] = x[b, P + idx]
        if fuse:
            kept = np.zeros(tokens - P, bool)
            kept[idx] = True
            acc = np.zeros(channels, np.float32)
            for j in np.flatnonzero(~kept):
                acc = acc + x[b, P + j] * s[j]  # float32 product, rounded; then a float32 add
            out[b, P + keep] = acc
    return out


def prune_sample(batch: int, tokens: int, channels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random float32 tokens ``[B, N, C]`` and class attention ``[B, N]`` (a softmax, as the model's)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, tokens, channels)).astype(np.float32)
    logits = 3 * rng.standard_normal((batch, tokens))
    attn = np.exp(logits - logits.max(1, keepdims=True))
    return x, (attn / attn.sum(1, keepdims=True)).astype(np.float32)


def torch_prune(x: np.ndarray, attn: np.ndarray, keep: int, protected: int, fuse: int) -> np.ndarray:
    """``vitfold.reduce.evit._prune`` (what PruneSite computes) on float32 numpy inputs."""
    torch = pytest.importorskip("torch")
    from vitfold.reduce.evit import _prune

    with torch.no_grad():
        return _prune(torch.from_numpy(x), torch.from_numpy(attn), keep, protected, bool(fuse)).numpy()


def test_prune_plugin_identity(core):
    assert core.vitfold_trt_prune_plugin_name() == b"EViTPrune"  # vitfold.native.PRUNE_OP, the node's op_type
    assert core.vitfold_trt_prune_plugin_version() == b"1"


@pytest.mark.parametrize("batch, tokens, channels, keep, protected, fuse", [
    (2, 197, 384, 138, 1, 1),   # DeiT-S, keep rate 0.7, EViT
    (2, 197, 384, 138, 1, 0),   # Top-K
    (1, 201, 16, 100, 5, 1),    # class token + 4 registers
    (3, 7, 4, 5, 1, 1),         # keep at its largest, N - P - 1: one token fused
    (1, 3, 2, 1, 0, 0),         # the smallest: no prefix, keep one of three
])
def test_prune_output_dims(core, batch, tokens, channels, keep, protected, fuse):
    out = (batch, protected + keep + fuse, channels)
    assert prune_output_dims(core, keep, protected, fuse, (batch, tokens, channels), (batch, tokens)) == (OK, out)


def test_prune_output_tokens_do_not_depend_on_n(core):
    # dynamic N: the output token count P + keep + fuse is still known; keep is checked once N is known
    assert prune_output_dims(core, 138, 1, 1, (-1, -1, 384), (-1, -1)) == (OK, (-1, 140, 384))
    assert prune_output_dims(core, 138, 1, 0, (-1, 197, 384), (2, -1)) == (OK, (2, 139, 384))  # B from attn
    assert prune_output_dims(core, 10, 1, 1, (-1, -1, 8), (-1, 11))[0] == BAD_KEEP  # N known from attn: 10 > 11 - 2


@pytest.mark.parametrize("keep, protected, fuse, x, attn, status", [
    (0, 1, 1, (2, 17, 8), (2, 17), BAD_KEEP),
    (-3, 1, 1, (2, 17, 8), (2, 17), BAD_KEEP),
    (16, 1, 1, (2, 17, 8), (2, 17), BAD_KEEP),          # keep = N - P: nothing left to prune
    (12, 5, 0, (2, 17, 8), (2, 17), BAD_KEEP),          # N - P - 1 = 11
    (1, 17, 0, (2, 17, 8), (2, 17), BAD_KEEP),          # every token protected
    (15, 1, 1, (2, 17, 8), (2, 17), OK),                # keep = N - P - 1
    (3, -1, 1, (2, 17, 8), (2, 17), NEGATIVE_PROTECTED),
    (3, 1, 2, (2, 17, 8), (2, 17), BAD_FUSE),
    (3, 1, -1, (2, 17, 8), (2, 17), BAD_FUSE),
    (3, 1, 1, (17, 8), (2, 17), BAD_X_RANK),
    (3, 1, 1, (1, 2, 17, 8), (2, 17), BAD_X_RANK),
    (3, 1, 1, (2, 17, 8), (2, 1, 17), BAD_ATTN_RANK),  # attention per head: not averaged
    (3, 1, 1, (2, 17, 8), (17,), BAD_ATTN_RANK),
    (3, 1, 1, (2, 17, 8), (3, 17), BATCH_MISMATCH),
    (3, 1, 1, (2, 17, 8), (2, 16), TOKEN_MISMATCH),
    (3, 1, 1, (2, -2, 8), (2, 17), BAD_DIM),
    (3, 1, 1, (2, 17, 8), (-5, 17), BAD_DIM),
])
def test_prune_validation_refuses(core, keep, protected, fuse, x, attn, status):
    assert prune_validate(core, keep, protected, fuse, x, attn) == status
    assert prune_output_dims(core, keep, protected, fuse, x, attn)[0] == status
    assert core.vitfold_trt_core_status_message(status)


@pytest.mark.parametrize("keep, protected, fuse", [(1, 0, 0), (138, 1, 1), (100, 5, 0), (2**31 - 1, 2**31 - 1, 1)])
def test_prune_serialise_round_trip_and_byte_format(core, keep, protected, fuse):
    status, record = prune_serialize(core, keep, protected, fuse)
    assert status == OK and len(record) == core.vitfold_trt_prune_serialized_size() == 24
    assert record == struct.pack(PRUNE_RECORD, b"VEVP", 1, 12, keep, protected, fuse)
    assert prune_deserialize(core, record) == (OK, keep, protected, fuse)


def test_prune_serialise_refuses_a_small_buffer_and_bad_attributes(core):
    assert prune_serialize(core, 3, 1, 1, capacity=23)[0] == BUFFER_TOO_SMALL
    assert prune_serialize(core, 0, 1, 1)[0] == BAD_KEEP
    assert prune_serialize(core, 3, -1, 1)[0] == NEGATIVE_PROTECTED
    assert prune_serialize(core, 3, 1, 2)[0] == BAD_FUSE


def test_prune_deserialise_refuses_truncated_foreign_and_other_version_records(core):
    record = struct.pack(PRUNE_RECORD, b"VEVP", 1, 12, 138, 1, 1)
    for size in range(len(record)):
        assert prune_deserialize(core, record[:size]) == (TRUNCATED, -7, -7, -7), size
    assert prune_deserialize(core, struct.pack(RECORD, b"VTMM", 1, 8, 13, 1))[0] == BAD_MAGIC  # a ToMeMerge record
    assert deserialize(core, record)[0] == BAD_MAGIC  # and the other way round
    assert prune_deserialize(core, struct.pack(PRUNE_RECORD, b"VEVP", 2, 12, 138, 1, 1))[0] == BAD_VERSION
    assert prune_deserialize(core, struct.pack(PRUNE_RECORD, b"VEVP", 0, 12, 138, 1, 1))[0] == BAD_VERSION
    assert prune_deserialize(core, struct.pack(PRUNE_RECORD, b"VEVP", 1, 16, 138, 1, 1) + b"\0" * 4)[0] == \
        BAD_PAYLOAD_SIZE
    assert prune_deserialize(core, struct.pack(RECORD, b"VEVP", 1, 8, 138, 1))[0] == BAD_PAYLOAD_SIZE
    assert prune_deserialize(core, record + b"\0")[0] == BAD_PAYLOAD_SIZE
    assert prune_deserialize(core, struct.pack(PRUNE_RECORD, b"VEVP", 1, 12, 0, 1, 1))[0] == BAD_KEEP
    assert prune_deserialize(core, struct.pack(PRUNE_RECORD, b"VEVP", 1, 12, 5, -1, 1))[0] == NEGATIVE_PROTECTED
    assert prune_deserialize(core, struct.pack(PRUNE_RECORD, b"VEVP", 1, 12, 5, 1, 3))[0] == BAD_FUSE


def test_prune_workspace_size(core):
    size = core.vitfold_trt_prune_workspace_size
    # one image of 197 tokens, 1 protected: rank and order, 196 int32 each (784 bytes, padded to 1024)
    assert size(1, 197, 1) == 2 * 1024
    assert size(3, 197, 1) == 3 * size(1, 197, 1)
    assert size(0, 197, 1) == 0
    for batch, tokens, protected in [(1, 3, 0), (2, 201, 5), (4, 577, 1)]:
        assert size(batch, tokens, protected) >= batch * (tokens - protected) * 8
        assert size(batch, tokens + 1, protected) >= size(batch, tokens, protected)
        assert size(batch + 1, tokens, protected) >= size(batch, tokens, protected)
    assert size(-1, 197, 1) == size(1, -1, 1) == size(1, 197, -1) == -1
    assert size(2**62, 2**20, 0) == -1  # overflows int64


PRUNE_CASES = [  # batch, tokens, channels, keep, protected
    (2, 17, 8, 5, 1),
    (2, 197, 384, 138, 1),   # DeiT-S at keep rate 0.7
    (3, 30, 12, 24, 5),      # class + 4 registers, keep near its largest
    (2, 7, 3, 5, 1),         # keep = N - P - 1: one token left out
    (1, 205, 64, 100, 5),
]


@pytest.mark.parametrize("fuse", [0, 1])
@pytest.mark.parametrize("batch, tokens, channels, keep, protected", PRUNE_CASES)
def test_prune_host_reference_equals_numpy(core, batch, tokens, channels, keep, protected, fuse):
    x, attn = prune_sample(batch, tokens, channels, seed=tokens + keep + fuse)
    got = prune_reference(core, x, attn, keep, protected, fuse)
    assert got.shape == prune_output_dims(core, keep, protected, fuse, x.shape, attn.shape)[1]
    assert np.array_equal(got, numpy_prune(x, attn, keep, protected, fuse))  # bit for bit, fused row included
    if fuse:  # the graph form: every candidate weighted, the kept ones by exactly 0, summed in rising order
        s = attn[:, protected:]
        idx = np.argsort(-s, axis=1, kind="stable")[:, :keep]
        dropped = np.ones_like(s)
        np.put_along_axis(dropped, idx, 0.0, axis=1)
        acc = np.zeros((batch, channels), np.float32)
        for j in range(tokens - protected):
            acc = acc + x[:, protected + j] * (s[:, j] * dropped[:, j])[:, None]
        assert np.array_equal(got[:, -1], acc)


@pytest.mark.parametrize("fuse", [0, 1])
@pytest.mark.parametrize("batch, tokens, channels, keep, protected", PRUNE_CASES)
def test_prune_host_reference_against_evit_prune(core, batch, tokens, channels, keep, protected, fuse):
    """Against ``evit._prune`` on random float32 inputs: the prefix and kept rows (row copies: the same
    tokens in the same order) are exactly equal, and so is the whole output without fusion. The fused row
    is the same sum in another order: torch's CPU sum adds rows in blocks (cascade summation), this op one
    row at a time as the ONNX graph form does, so it differs from torch in the last bits; it is held to the
    error bound of two summation orders here and to numpy's rising-order sum exactly above."""
    x, attn = prune_sample(batch, tokens, channels, seed=tokens + keep + fuse)
    got = prune_reference(core, x, attn, keep, protected, fuse)
    expected = torch_prune(x, attn, keep, protected, fuse)
    assert got.shape == expected.shape
    assert np.array_equal(got[:, :protected + keep], expected[:, :protected + keep])
    if fuse:
        terms = np.abs(x[:, protected:] * attn[:, protected:, None]).sum(1)
        bound = (tokens - protected) * np.finfo(np.float32).eps * terms
        assert np.all(np.abs(got[:, -1] - expected[:, -1]) <= bound)
    else:
        assert np.array_equal(got, expected)


@pytest.mark.parametrize("fuse", [0, 1])
@pytest.mark.parametrize("protected", [1, 5])
def test_prune_host_reference_equals_evit_prune_exactly_when_every_sum_is_exact(core, protected, fuse):
    """With values whose products and sums float32 holds exactly (small integers, distinct dyadic scores)
    every summation order gives the same sum, so the whole output, fused row included, equals
    ``evit._prune`` bit for bit: the same kept tokens, order, weights and fused tokens."""
    rng = np.random.default_rng(protected + fuse)
    batch, tokens, channels = 3, 197, 48
    x = rng.integers(-8, 9, (batch, tokens, channels)).astype(np.float32)
    attn = np.stack([rng.permutation(tokens) + 1 for _ in range(batch)]).astype(np.float32) / 1024
    keep = 120
    got = prune_reference(core, x, attn, keep, protected, fuse)
    assert np.array_equal(got, torch_prune(x, attn, keep, protected, fuse))
    assert np.array_equal(got, numpy_prune(x, attn, keep, protected, fuse))


@pytest.mark.parametrize("fuse", [0, 1])
@pytest.mark.parametrize("protected", [1, 5])
def test_prune_ties_keep_the_lower_index_first(core, protected, fuse):
    """Equal scores rank by rising index (a stable descending sort; ONNX TopK's rule, which the graph form
    follows). torch.topk on the CPU does not promise that order for ties, so this is checked against numpy."""
    rng = np.random.default_rng(11 + protected)
    batch, tokens, channels, keep = 4, 40, 6, 17
    x = rng.standard_normal((batch, tokens, channels)).astype(np.float32)
    attn = (rng.integers(0, 4, (batch, tokens)) / 8).astype(np.float32)  # four levels: many ties, also at the cut
    attn[0] = 0.25  # all equal: the first keep candidates, in order
    got = prune_reference(core, x, attn, keep, protected, fuse)
    assert np.array_equal(got, numpy_prune(x, attn, keep, protected, fuse))
    assert np.array_equal(got[0, protected:protected + keep], x[0, protected:protected + keep])


def test_prune_nan_scores_rank_first_and_every_row_is_written(core):
    """NaN scores (which softmax attention never gives) rank above every number, in rising index, as torch.topk
    ranks NaN highest: the ranks stay a permutation, so each output row is one candidate's row."""
    x, attn = prune_sample(1, 12, 4, seed=3)
    attn[0, [4, 9]] = np.nan
    got = prune_reference(core, x, attn, 4, 1, 1)
    s = attn[0, 1:]
    finite = np.flatnonzero(~np.isnan(s))
    order = np.concatenate([np.flatnonzero(np.isnan(s)), finite[np.argsort(-s[finite], kind="stable")]])
    assert np.array_equal(got[0, 1:5], x[0, 1 + order[:4]])
    assert not np.isnan(got[0, :5]).any()
    acc = np.zeros(4, np.float32)
    for j in np.sort(order[4:]):
        acc = acc + x[0, 1 + j] * s[j]
    assert np.array_equal(got[0, 5], acc)


# -------------------------------------------------------------------------------------- build files


@needs_cxx
@pytest.mark.skipif(shutil.which("cmake") is None, reason="the CMake build needs cmake")
def test_cmake_builds_the_core_alone(tmp_path):
    build = tmp_path / "build"
    configure = subprocess.run(["cmake", "-S", str(SOURCE), "-B", str(build), "-DVITFOLD_TRT_CORE_ONLY=ON"],
                               capture_output=True, text=True, check=False, timeout=120)
    assert configure.returncode == 0, configure.stderr
    done = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    built = load_core(build / "libvitfold_trt_core.so")
    assert built.vitfold_trt_core_abi_version() == 1
    assert built.vitfold_trt_prune_plugin_name() == b"EViTPrune"
    assert not list(build.glob("libvitfold_trt_plugin*"))


@needs_cxx
@pytest.mark.skipif(shutil.which("cmake") is None, reason="the CMake build needs cmake")
def test_cmake_plugin_build_says_what_is_missing(tmp_path):
    empty = tmp_path / "no-tensorrt"
    empty.mkdir()
    configure = subprocess.run(
        ["cmake", "-S", str(SOURCE), "-B", str(tmp_path / "build"), f"-DTensorRT_ROOT={empty}"],
        capture_output=True, text=True, check=False, timeout=120)
    assert configure.returncode != 0
    message = " ".join((configure.stdout + configure.stderr).split())
    assert "vitfold TensorRT plugin:" in message  # no nvcc, or (with nvcc) no TensorRT headers
    assert ("no CUDA compiler" in message) != ("TensorRT headers (NvInferRuntime.h) not found" in message)
    assert "VITFOLD_TRT_CORE_ONLY" in message


# --------------------------------------------------------------------- the plugin (TensorRT headers)


def cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (cuda_runtime_api.h): VITFOLD_CUDA_INCLUDE, next to nvcc, or
    /usr/local/cuda/include; None when there is none."""
    candidates = [os.environ.get("VITFOLD_CUDA_INCLUDE"), "/usr/local/cuda/include"]
    if NVCC:
        candidates.insert(1, str(Path(NVCC).resolve().parent.parent / "include"))
    return next((Path(c) for c in candidates if c and (Path(c) / "cuda_runtime_api.h").is_file()), None)


def trt_include() -> Path:
    """``VITFOLD_TRT_INCLUDE`` (a TensorRT include folder), or skip saying how to set it."""
    if not TRT_INCLUDE or not (Path(TRT_INCLUDE) / "NvInferRuntime.h").is_file():
        pytest.skip("set VITFOLD_TRT_INCLUDE to a TensorRT 10+ include folder (NvInferRuntime.h), e.g. the include/ "
                    "of a github.com/NVIDIA/TensorRT checkout, to check the plugin itself")
    return Path(TRT_INCLUDE)


def header_flags(cuda: Path | None) -> list[str]:
    """Compiler flags for the TensorRT and CUDA headers (system includes: their own warnings are not ours)."""
    trt = trt_include()
    include = cuda or cuda_include()
    if include is None:
        pytest.skip("TensorRT's headers include cuda_runtime_api.h: set VITFOLD_CUDA_INCLUDE to the CUDA toolkit's "
                    "include folder (or a stand-in header declaring cudaStream_t for a syntax check)")
    return ["-isystem", str(trt), "-isystem", str(include)]


@needs_cxx
@pytest.mark.parametrize("source", ["tome_plugin.cpp", "prune_plugin.cpp"])
def test_plugin_compiles_against_the_tensorrt_headers(source):
    flags = header_flags(None)
    done = subprocess.run([CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", *flags,
                           str(SOURCE / source)], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr


@needs_cxx
@pytest.mark.skipif(NVCC is None, reason="building the plugin library needs nvcc (CUDA toolkit)")
def test_plugin_library_through_tensorrts_interfaces(tmp_path):
    """Builds libvitfold_trt_plugin.so (nvcc + g++, static CUDA runtime) and runs plugin_host_check.cpp on
    it: both creators (ToMeMerge, EViTPrune) looked up as the ONNX parser does it, fields, shapes, formats,
    serialisation round trip."""
    cuda = cuda_include()
    flags = header_flags(cuda)
    cudart = next((p for p in (cuda.parent / "lib64", cuda.parent / "lib") if (p / "libcudart_static.a").is_file()),
                  None)
    if cudart is None:
        pytest.skip(f"no libcudart_static.a next to {cuda}")
    objects = [str(tmp_path / f"{name}.o") for name in ("tome_kernel", "prune_kernel", "tome_plugin", "prune_plugin")]
    steps = [
        *([NVCC, "-std=c++17", "-O2", "-Xcompiler", "-fPIC,-fvisibility=hidden", "--fmad=false", "-c",
           str(SOURCE / f"{name}.cu"), "-o", str(tmp_path / f"{name}.o")] for name in ("tome_kernel", "prune_kernel")),
        *([CXX, "-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror",
           *flags, "-c", str(SOURCE / f"{name}.cpp"), "-o", str(tmp_path / f"{name}.o")]
          for name in ("tome_plugin", "prune_plugin")),
        [CXX, "-shared", *objects, f"-L{cudart}", "-lcudart_static",
         "-ldl", "-lpthread", "-lrt", "-o", str(tmp_path / "libvitfold_trt_plugin.so")],
        [CXX, "-std=c++17", "-O1", f"-I{SOURCE}", *flags, str(SOURCE / "plugin_host_check.cpp"), "-ldl",
         "-o", str(tmp_path / "check")],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False, timeout=300)
        assert done.returncode == 0, f"{' '.join(step)}\n{done.stderr}"
    library = tmp_path / "libvitfold_trt_plugin.so"
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True,
                             check=False).stdout.split()
    assert "getCreators" in symbols and "setLoggerFinder" in symbols
    run = subprocess.run([str(tmp_path / "check"), str(library)], capture_output=True, text=True, check=False,
                         timeout=60)
    assert run.returncode == 0 and "PASSED" in run.stdout, run.stdout + run.stderr
