// CUDA kernel of vitfold's TensorRT plugin ToMeMerge: ToMe's bipartite soft matching with a sum merge
// (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023, Sec. 3), the same token choices and
// sums as vitfold/native/openvino/tome_op.cpp and vitfold.reduce.matching (rules: tome_plugin_core.h).
//
// NEVER RUN: written on a machine without a GPU. It compiles (nvcc 13.0, sm_90 and nvcc's default
// arch: no warnings, 48 registers, no spills) but has not run. Its arithmetic is the core header's step
// functions, which the host reference runs and tests/test_tensorrt_plugin.py checks against numpy and
// matching.py; what is new here is only the launch and the block-stride loops. Build it with
// CMakeLists.txt (no --use_fast_math) and compare the plugin's output with the host reference (C ABI:
// vitfold_trt_core_reference) and the graph form on a device before relying on it.
//
// One block per image, kThreads threads; the steps are separated by __syncthreads() because each
// reads what the previous one wrote for every item:
//   1 normalise the metric rows (thread per token)        -> unit [N, D]
//   2 best B partner of each A token (thread per A token)  -> best, partner [Na]
//   3 stable rank of each edge by falling score            -> rank, order [Na]
//   4 output row of each A token (-1: merged)              -> aslot [Na]
//   5 copy the kept rows (thread per element of x)         -> out
//   6 add the r merged A rows into their B rows in edge order (thread per channel) -> out
// Steps 2 and 3 are O(Na * Nb * D) and O(Na^2) per image: small for ViT token counts (Na ~ 100 - 600);
// a faster kernel (tiled scores in shared memory, a block-wide sort) is future work once this one is
// verified on a device. Scratch lives in TensorRT's workspace (workspaceBytes in the core header).
#include "tome_kernel.h"
#include "tome_plugin_core.h"

#include <cuda_runtime.h>

namespace vitfold {
namespace trt {
namespace {

constexpr int kThreads = 256;

struct KernelArgs {
    float const* x;
    float const* keys;
    float* out;
    char* workspace;
    WorkspaceLayout layout;
    MergeShape s;
};

__global__ void __launch_bounds__(kThreads) tomeMergeKernel(KernelArgs a) {
    MergeShape const& s = a.s;
    int64_t const image = blockIdx.x;
    float const* x = a.x + image * s.N * s.C;
    float const* keys = a.keys + image * s.H * s.N * s.D;
    float* out = a.out + image * (s.N - s.r) * s.C;
    char* ws = a.workspace + image * static_cast<int64_t>(a.layout.perImage);
    float* unit = reinterpret_cast<float*>(ws + a.layout.unit);
    float* best = reinterpret_cast<float*>(ws + a.layout.best);
    int32_t* partner = reinterpret_cast<int32_t*>(ws + a.layout.partner);
    int32_t* rank = reinterpret_cast<int32_t*>(ws + a.layout.rank);
    int32_t* order = reinterpret_cast<int32_t*>(ws + a.layout.order);
    int64_t* aslot = reinterpret_cast<int64_t*>(ws + a.layout.aslot);
    int64_t const tid = threadIdx.x, stride = blockDim.x;

    for (int64_t i = tid; i < s.N; i += stride) normalizeToken(keys, unit, s, i);
    __syncthreads();
    for (int64_t i = tid; i < s.Na(); i += stride) matchToken(unit, s, i, best, partner);
    __syncthreads();
    for (int64_t i = tid; i < s.Na(); i += stride) {
        int32_t const k = edgeRank(best, s, i);
        rank[i] = k;
        order[k] = static_cast<int32_t>(i);
    }
    __syncthreads();
    for (int64_t i = tid; i < s.Na(); i += stride) aslot[i] = unmergedSlot(rank, s, i);
    __syncthreads();
    for (int64_t item = tid; item < s.N * s.C; item += stride) copyElement(x, out, aslot, s, item);
    __syncthreads();
    for (int64_t c = tid; c < s.C; c += stride) accumulateChannel(x, out, order, partner, s, c);
}

}  // namespace

int32_t launchToMeMerge(ToMeLaunch const& p, cudaStream_t stream) noexcept {
    bool const dimsOk = p.B >= 0 && p.B <= 0x7fffffff && p.N >= 0 && p.C >= 0 && p.H >= 1 && p.D >= 1;
    bool const attrsOk = p.r >= 0 && p.numProtected >= 0 && p.r <= maxMerge(p.N, p.numProtected);
    if (!p.x || !p.keys || !p.out || !dimsOk || !attrsOk)
        return static_cast<int32_t>(cudaErrorInvalidValue);
    if (p.B == 0 || p.N == 0 || p.C == 0) return static_cast<int32_t>(cudaSuccess);
    if (p.r == 0) {  // the identity, as matching.py's r == 0 closures
        size_t const bytes = static_cast<size_t>(p.B * p.N * p.C) * sizeof(float);
        return static_cast<int32_t>(cudaMemcpyAsync(p.out, p.x, bytes, cudaMemcpyDeviceToDevice, stream));
    }
    KernelArgs args{};
    int64_t const need = workspaceBytes(p.B, p.N, p.D);
    if (!workspaceLayout(p.N, p.D, &args.layout) || need < 0 || !p.workspace ||
        p.workspaceSize < static_cast<size_t>(need))
        return static_cast<int32_t>(cudaErrorInvalidValue);
    args.x = p.x;
    args.keys = p.keys;
    args.out = p.out;
    args.workspace = static_cast<char*>(p.workspace);
    args.s = MergeShape{p.N, p.C, p.H, p.D, p.r, p.numProtected};
    tomeMergeKernel<<<static_cast<unsigned int>(p.B), kThreads, 0, stream>>>(args);
    return static_cast<int32_t>(cudaGetLastError());
}

}  // namespace trt
}  // namespace vitfold
