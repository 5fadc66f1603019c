// Host-side declaration of the EViTPrune CUDA launcher (defined in prune_kernel.cu), the only thing
// prune_plugin.cpp needs from the CUDA side, so that it compiles with a plain C++ compiler.
#ifndef VITFOLD_TRT_PRUNE_KERNEL_H
#define VITFOLD_TRT_PRUNE_KERNEL_H

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace vitfold {
namespace trt {

//! One enqueue: device pointers and the (validated, all known) dims of the call.
struct PruneLaunch {
    float const* x;     //!< [B, N, C]
    float const* attn;  //!< [B, N]
    float* out;         //!< [B, P + keep + fuse, C]
    void* workspace;    //!< prune::workspaceBytes(B, N, P) bytes, 256-byte aligned
    size_t workspaceSize;
    int64_t B, N, C;
    int32_t keep, numProtected, fuse;
};

//! Enqueues the pruning on stream; returns the cudaError_t as int32 (0: launched).
int32_t launchEViTPrune(PruneLaunch const& launch, cudaStream_t stream) noexcept;

}  // namespace trt
}  // namespace vitfold

#endif  // VITFOLD_TRT_PRUNE_KERNEL_H
