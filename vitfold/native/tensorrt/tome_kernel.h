// Host-side declaration of the ToMeMerge CUDA launcher (defined in tome_kernel.cu), the only thing
// tome_plugin.cpp needs from the CUDA side. Keeping it here lets tome_plugin.cpp compile with a plain
// C++ compiler.
#ifndef VITFOLD_TRT_TOME_KERNEL_H
#define VITFOLD_TRT_TOME_KERNEL_H

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace vitfold {
namespace trt {

//! One enqueue: device pointers and the (validated, all known) dims of the call.
struct ToMeLaunch {
    float const* x;     //!< [B, N, C]
    float const* keys;  //!< [B, H, N, D] (H = 1 for a [B, N, D] metric)
    float* out;         //!< [B, N - r, C]
    void* workspace;    //!< workspaceBytes(B, N, D) bytes, 256-byte aligned
    size_t workspaceSize;
    int64_t B, N, C, H, D;
    int32_t r, numProtected;
};

//! Enqueues the merge on stream; returns the cudaError_t as int32 (0: launched). r == 0 copies x.
int32_t launchToMeMerge(ToMeLaunch const& launch, cudaStream_t stream) noexcept;

}  // namespace trt
}  // namespace vitfold

#endif  // VITFOLD_TRT_TOME_KERNEL_H
