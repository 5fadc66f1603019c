// C ABI over tome_plugin_core.h and prune_plugin_core.h (the GPU-free parts of vitfold's TensorRT
// plugins ToMeMerge and EViTPrune: vitfold_trt_core_* and vitfold_trt_prune_*), built into
// libvitfold_trt_core.so with only a C++17 compiler (CMakeLists.txt: -DVITFOLD_TRT_CORE_ONLY=ON, or
// g++ -std=c++17 -shared -fPIC), so Python can check the plugin's shape, validation, serialisation and
// workspace logic, and the merge itself on the host, with ctypes (tests/test_tensorrt_plugin.py).
//
// ToMe bipartite soft matching + sum merge (Bolya et al., ICLR 2023, Sec. 3), mirroring
// vitfold/native/openvino/tome_op.cpp; see the header for the exact rules. Every function returns a
// vitfold::trt::Status (0: ok) unless it says otherwise; dims are int64 with -1 for "unknown".
#include "prune_plugin_core.h"
#include "tome_plugin_core.h"

#define VITFOLD_CORE_API extern "C" __attribute__((visibility("default")))

namespace core = vitfold::trt;

namespace {

//! A core's output dims (fill(dims): its outputDims) into out_dims (capacity out_capacity), rank into
//! *out_rank.
template <int32_t Rank, class Fill>
int32_t copyOutputDims(int64_t* out_dims, int32_t out_capacity, int32_t* out_rank, Fill fill) {
    if (!out_dims || !out_rank) return core::kNULL_ARGUMENT;
    if (out_capacity < Rank) return core::kBUFFER_TOO_SMALL;
    int64_t dims[Rank];
    core::Status const s = fill(dims);
    if (s != core::kOK) return s;
    for (int32_t i = 0; i < Rank; ++i) out_dims[i] = dims[i];
    *out_rank = Rank;
    return core::kOK;
}

//! A core's serialize with the C ABI's signed capacity and byte count.
template <class Attrs>
int32_t serializeTo(core::Status (*serialize)(Attrs const&, uint8_t*, size_t, size_t*) noexcept, Attrs const& attrs,
                    uint8_t* buffer, int64_t capacity, int64_t* written) {
    if (capacity < 0 || !written) return core::kNULL_ARGUMENT;
    size_t n = 0;
    core::Status const s = serialize(attrs, buffer, static_cast<size_t>(capacity), &n);
    if (s == core::kOK) *written = static_cast<int64_t>(n);
    return s;
}

}  // namespace

//! Version of this C ABI (bumped when a signature changes).
VITFOLD_CORE_API int32_t vitfold_trt_core_abi_version(void) { return 1; }

VITFOLD_CORE_API char const* vitfold_trt_core_plugin_name(void) { return core::kPluginName; }
VITFOLD_CORE_API char const* vitfold_trt_core_plugin_version(void) { return core::kPluginVersion; }
VITFOLD_CORE_API char const* vitfold_trt_core_status_message(int32_t status) { return core::statusMessage(status); }

//! Checks r, num_protected and the input dims (x [B, N, C]; keys [B, H, N, D] or [B, N, D]).
VITFOLD_CORE_API int32_t vitfold_trt_core_validate(int32_t r, int32_t num_protected, int64_t const* x_dims,
                                                   int32_t x_rank, int64_t const* key_dims, int32_t key_rank) {
    return core::validate(core::Attrs{r, num_protected}, x_dims, x_rank, key_dims, key_rank);
}

//! Output dims [B, N - r, C] into out_dims (capacity out_capacity), rank into *out_rank.
VITFOLD_CORE_API int32_t vitfold_trt_core_output_dims(int32_t r, int32_t num_protected, int64_t const* x_dims,
                                                      int32_t x_rank, int64_t const* key_dims, int32_t key_rank,
                                                      int64_t* out_dims, int32_t out_capacity, int32_t* out_rank) {
    return copyOutputDims<core::kOutputRank>(out_dims, out_capacity, out_rank, [&](int64_t* dims) {
        return core::outputDims(core::Attrs{r, num_protected}, x_dims, x_rank, key_dims, key_rank, dims);
    });
}

//! Largest valid r (not a Status): (N - num_protected) / 2, or 0.
VITFOLD_CORE_API int64_t vitfold_trt_core_max_merge(int64_t num_tokens, int64_t num_protected) {
    return core::maxMerge(num_tokens, num_protected);
}

//! Bytes serialize() writes (not a Status).
VITFOLD_CORE_API int64_t vitfold_trt_core_serialized_size(void) {
    return static_cast<int64_t>(core::kSerializedBytes);
}

VITFOLD_CORE_API int32_t vitfold_trt_core_serialize(int32_t r, int32_t num_protected, uint8_t* buffer,
                                                    int64_t capacity, int64_t* written) {
    return serializeTo(core::serialize, core::Attrs{r, num_protected}, buffer, capacity, written);
}

VITFOLD_CORE_API int32_t vitfold_trt_core_deserialize(uint8_t const* buffer, int64_t size, int32_t* r,
                                                      int32_t* num_protected) {
    if (size < 0 || !r || !num_protected) return core::kNULL_ARGUMENT;
    core::Attrs a;
    core::Status const s = core::deserialize(buffer, static_cast<size_t>(size), &a);
    if (s == core::kOK) {
        *r = a.r;
        *num_protected = a.numProtected;
    }
    return s;
}

//! Workspace bytes the kernel needs for B images of N tokens, D-wide metrics; -1 when invalid.
VITFOLD_CORE_API int64_t vitfold_trt_core_workspace_size(int64_t batch, int64_t num_tokens, int64_t metric_dim) {
    return core::workspaceBytes(batch, num_tokens, metric_dim);
}

//! The op on the host (the kernel's steps in its order): out [B, N - r, C], float32, C order.
VITFOLD_CORE_API int32_t vitfold_trt_core_reference(int32_t r, int32_t num_protected, int64_t const* x_dims,
                                                    int32_t x_rank, int64_t const* key_dims, int32_t key_rank,
                                                    float const* x, float const* keys, float* out) {
    core::Shape shape;
    core::Status const s = core::inferShape(core::Attrs{r, num_protected}, x_dims, x_rank, key_dims, key_rank, &shape);
    if (s != core::kOK) return s;
    return core::referenceMerge(shape, x, keys, out);
}

// ----------------------------------------------------------------------------------------- EViTPrune
// The same for the second plugin of the library, EViTPrune (prune_plugin_core.h): EViT's top-k of the
// class attention and inattentive-token fusion (Liang et al., ICLR 2022, Sec. 3; Top-K with fuse = 0),
// mirroring vitfold/native/openvino/prune_op.cpp. x [B, N, C], attn [B, N]; out [B, P + keep + fuse, C].
namespace prune = vitfold::trt::prune;

VITFOLD_CORE_API char const* vitfold_trt_prune_plugin_name(void) { return prune::kPluginName; }
VITFOLD_CORE_API char const* vitfold_trt_prune_plugin_version(void) { return prune::kPluginVersion; }

//! Checks keep, num_protected, fuse and the input dims.
VITFOLD_CORE_API int32_t vitfold_trt_prune_validate(int32_t keep, int32_t num_protected, int32_t fuse,
                                                    int64_t const* x_dims, int32_t x_rank, int64_t const* attn_dims,
                                                    int32_t attn_rank) {
    return prune::validate(prune::Attrs{keep, num_protected, fuse}, x_dims, x_rank, attn_dims, attn_rank);
}

//! Output dims [B, P + keep + fuse, C] into out_dims (capacity out_capacity), rank into *out_rank.
VITFOLD_CORE_API int32_t vitfold_trt_prune_output_dims(int32_t keep, int32_t num_protected, int32_t fuse,
                                                       int64_t const* x_dims, int32_t x_rank, int64_t const* attn_dims,
                                                       int32_t attn_rank, int64_t* out_dims, int32_t out_capacity,
                                                       int32_t* out_rank) {
    return copyOutputDims<prune::kOutputRank>(out_dims, out_capacity, out_rank, [&](int64_t* dims) {
        return prune::outputDims(prune::Attrs{keep, num_protected, fuse}, x_dims, x_rank, attn_dims, attn_rank, dims);
    });
}

//! Bytes vitfold_trt_prune_serialize writes (not a Status).
VITFOLD_CORE_API int64_t vitfold_trt_prune_serialized_size(void) {
    return static_cast<int64_t>(prune::kSerializedBytes);
}

VITFOLD_CORE_API int32_t vitfold_trt_prune_serialize(int32_t keep, int32_t num_protected, int32_t fuse,
                                                     uint8_t* buffer, int64_t capacity, int64_t* written) {
    return serializeTo(prune::serialize, prune::Attrs{keep, num_protected, fuse}, buffer, capacity, written);
}

VITFOLD_CORE_API int32_t vitfold_trt_prune_deserialize(uint8_t const* buffer, int64_t size, int32_t* keep,
                                                       int32_t* num_protected, int32_t* fuse) {
    if (size < 0 || !keep || !num_protected || !fuse) return core::kNULL_ARGUMENT;
    prune::Attrs a;
    core::Status const s = prune::deserialize(buffer, static_cast<size_t>(size), &a);
    if (s == core::kOK) {
        *keep = a.keep;
        *num_protected = a.numProtected;
        *fuse = a.fuse;
    }
    return s;
}

//! Workspace bytes the kernel needs for B images of N tokens with num_protected prefix tokens; -1 when
//! invalid (not a Status).
VITFOLD_CORE_API int64_t vitfold_trt_prune_workspace_size(int64_t batch, int64_t num_tokens, int64_t num_protected) {
    return prune::workspaceBytes(batch, num_tokens, num_protected);
}

//! The op on the host (the kernel's steps in its order): out [B, P + keep + fuse, C], float32, C order.
VITFOLD_CORE_API int32_t vitfold_trt_prune_reference(int32_t keep, int32_t num_protected, int32_t fuse,
                                                     int64_t const* x_dims, int32_t x_rank, int64_t const* attn_dims,
                                                     int32_t attn_rank, float const* x, float const* attn, float* out) {
    prune::Shape shape;
    core::Status const s =
        prune::inferShape(prune::Attrs{keep, num_protected, fuse}, x_dims, x_rank, attn_dims, attn_rank, &shape);
    if (s != core::kOK) return s;
    return prune::referencePrune(shape, x, attn, out);
}
