// CUDA kernel of vitfold's TensorRT plugin EViTPrune: EViT's attentive-token selection and
// inattentive-token fusion (Liang et al., ICLR 2022, Sec. 3; Top-K with fuse = 0, Haurum et al.,
// ICCVW 2023), the same kept tokens, order and fused sums as vitfold/native/openvino/prune_op.cpp and
// vitfold.reduce.evit._prune (rules: prune_plugin_core.h).
//
// NEVER RUN: written on a machine without a GPU; it compiles (nvcc 13.0) but has not run. Its
// arithmetic is the core header's step functions, which the host reference runs and
// tests/test_tensorrt_plugin.py checks against numpy and evit._prune; what is new here is only the
// launch and the block-stride loops. Compare the plugin's output with the host reference (C ABI:
// vitfold_trt_prune_reference) and the graph form on a device before relying on it.
//
// One block per image, kThreads threads:
//   1 the place of each candidate in the falling, stable order (thread per candidate) -> rank [M],
//     and the candidate at each of the first keep places                              -> order [keep]
//   __syncthreads()
//   2 the prefix and kept rows (thread per output element)                            -> out[:P + keep]
//   3 fuse = 1: the fused row (thread per channel, the not-kept candidates in rising j) -> out[P + keep]
// Step 1 is O(M^2) per image (M = N - P ~ 200 - 600 for ViTs): cheap next to the block's matmuls; a
// block-wide sort is future work once this is verified on a device. Steps 2 and 3 read only what step 1
// wrote, so they share a phase. The fused sum uses __fmul_rn / __fadd_rn (never contracted to an FMA).
#include "prune_kernel.h"
#include "prune_plugin_core.h"

#include <cuda_runtime.h>

namespace vitfold {
namespace trt {
namespace {

constexpr int kThreads = 256;

struct KernelArgs {
    float const* x;
    float const* attn;
    float* out;
    char* workspace;
    prune::WorkspaceLayout layout;
    prune::PruneShape s;
};

__global__ void __launch_bounds__(kThreads) evitPruneKernel(KernelArgs a) {
    prune::PruneShape const& s = a.s;
    int64_t const image = blockIdx.x;
    float const* x = a.x + image * s.N * s.C;
    float const* scores = a.attn + image * s.N + s.P;
    float* out = a.out + image * s.outTokens() * s.C;
    char* ws = a.workspace + image * static_cast<int64_t>(a.layout.perImage);
    int32_t* rank = reinterpret_cast<int32_t*>(ws + a.layout.rank);
    int32_t* order = reinterpret_cast<int32_t*>(ws + a.layout.order);
    int64_t const tid = threadIdx.x, stride = blockDim.x;

    for (int64_t j = tid; j < s.M(); j += stride) {
        int32_t const k = prune::candidateRank(scores, s, j);
        rank[j] = k;
        if (k < s.K) order[k] = static_cast<int32_t>(j);
    }
    __syncthreads();
    for (int64_t item = tid; item < (s.P + s.K) * s.C; item += stride) prune::copyElement(x, out, order, s, item);
    if (s.fuse)
        for (int64_t c = tid; c < s.C; c += stride) prune::fuseChannel(x, scores, rank, out, s, c);
}

}  // namespace

int32_t launchEViTPrune(PruneLaunch const& p, cudaStream_t stream) noexcept {
    prune::Attrs const attrs{p.keep, p.numProtected, p.fuse};
    bool const dimsOk = p.B >= 0 && p.B <= 0x7fffffff && p.N >= 0 && p.C >= 0 &&
        p.N - p.numProtected <= 0x7fffffff;
    bool const attrsOk = prune::validateAttrs(attrs) == kOK && p.keep <= p.N - p.numProtected - 1;
    if (!p.x || !p.attn || !p.out || !dimsOk || !attrsOk) return static_cast<int32_t>(cudaErrorInvalidValue);
    if (p.B == 0 || p.C == 0) return static_cast<int32_t>(cudaSuccess);
    KernelArgs args{};
    int64_t const need = prune::workspaceBytes(p.B, p.N, p.numProtected);
    if (!prune::workspaceLayout(p.N, p.numProtected, &args.layout) || need < 0 || !p.workspace ||
        p.workspaceSize < static_cast<size_t>(need))
        return static_cast<int32_t>(cudaErrorInvalidValue);
    args.x = p.x;
    args.attn = p.attn;
    args.out = p.out;
    args.workspace = static_cast<char*>(p.workspace);
    args.s = prune::PruneShape{p.N, p.C, p.numProtected, p.keep, p.fuse};
    evitPruneKernel<<<static_cast<unsigned int>(p.B), kThreads, 0, stream>>>(args);
    return static_cast<int32_t>(cudaGetLastError());
}

}  // namespace trt
}  // namespace vitfold
