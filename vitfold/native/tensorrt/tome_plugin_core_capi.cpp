// C ABI over tome_plugin_core.h (vitfold's TensorRT ToMeMerge plugin, GPU-free part), built into
// libvitfold_trt_core.so with only a C++17 compiler (CMakeLists.txt: -DVITFOLD_TRT_CORE_ONLY=ON, or
// g++ -std=c++17 -shared -fPIC), so Python can check the plugin's shape, validation, serialisation and
// workspace logic, and the merge itself on the host, with ctypes (tests/test_tensorrt_plugin.py).
//
// ToMe bipartite soft matching + sum merge (Bolya et al., ICLR 2023, Sec. 3), mirroring
// vitfold/native/openvino/tome_op.cpp; see the header for the exact rules. Every function returns a
// vitfold::trt::Status (0: ok) unless it says otherwise; dims are int64 with -1 for "unknown".
#include "tome_plugin_core.h"

#define VITFOLD_CORE_API extern "C" __attribute__((visibility("default")))

namespace core = vitfold::trt;

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
    if (!out_dims || !out_rank) return core::kNULL_ARGUMENT;
    if (out_capacity < core::kOutputRank) return core::kBUFFER_TOO_SMALL;
    int64_t dims[core::kOutputRank];
    core::Status const s = core::outputDims(core::Attrs{r, num_protected}, x_dims, x_rank, key_dims, key_rank, dims);
    if (s != core::kOK) return s;
    for (int32_t i = 0; i < core::kOutputRank; ++i) out_dims[i] = dims[i];
    *out_rank = core::kOutputRank;
    return core::kOK;
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
    if (capacity < 0 || !written) return core::kNULL_ARGUMENT;
    size_t n = 0;
    core::Status const s =
        core::serialize(core::Attrs{r, num_protected}, buffer, static_cast<size_t>(capacity), &n);
    if (s == core::kOK) *written = static_cast<int64_t>(n);
    return s;
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
