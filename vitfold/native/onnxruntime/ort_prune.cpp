// vitfold.EViTPrune on ONNX Runtime: the function of openvino/prune_op.cpp (see there), from the same
// host kernel (kernels/prune_kernels.h; this file is compiled with -ffp-contract=off as that one).
// EViTPrune(x [B, N, C], attn [B, N]; keep, num_protected, fuse) -> [B, P + keep + fuse, C].
// Images run in parallel on ONNX Runtime's intra-op threads.
#include "ort_common.h"
#include "prune_kernels.h"

namespace vitfold_ort {

struct PruneKernel {
    static constexpr const char* kName = "EViTPrune";
    static constexpr size_t kInputs = 2, kOutputs = 1;
    const OrtApi* api;
    int64_t keep = 0, p = 0, fuse = 0;

    static OrtStatus* create(const OrtApi* api, const OrtKernelInfo* info, PruneKernel** out) {
        int64_t keep = 0, p = 0, fuse = 0;
        VITFOLD_ORT_TRY(int_attribute(api, info, "keep", &keep));
        VITFOLD_ORT_TRY(int_attribute(api, info, "num_protected", &p));
        VITFOLD_ORT_TRY(int_attribute(api, info, "fuse", &fuse));
        if (keep < 1 || p < 0 || (fuse != 0 && fuse != 1))
            return invalid(api, "EViTPrune needs keep >= 1, num_protected >= 0 and fuse 0 or 1");
        *out = new PruneKernel{api, keep, p, fuse};
        return nullptr;
    }

    OrtStatus* compute(OrtKernelContext* context) const {
        Input x, attn;
        VITFOLD_ORT_TRY(read_input(api, context, 0, &x));
        VITFOLD_ORT_TRY(read_input(api, context, 1, &attn));
        if (x.dims.size() != 3 || attn.dims.size() != 2 || attn.dims[0] != x.dims[0] || attn.dims[1] != x.dims[1])
            return invalid(api, "EViTPrune takes [B, N, C] tokens and [B, N] class attention");
        if (keep >= x.dims[1] - p) return invalid(api, "EViTPrune: keep must be in 1 .. N - num_protected - 1");
        const PruneDims s{static_cast<size_t>(x.dims[1]), static_cast<size_t>(x.dims[2]), static_cast<size_t>(p),
                          static_cast<size_t>(keep), fuse != 0};
        const size_t M = s.out_tokens();
        float* out = nullptr;
        VITFOLD_ORT_TRY(make_output(api, context, 0, {x.dims[0], static_cast<int64_t>(M), x.dims[2]}, &out));
        return parallel_for(api, context, static_cast<size_t>(x.dims[0]), [&](size_t b) {
            std::vector<int64_t> order(s.N - s.P);
            prune_image(x.data + b * s.N * s.C, attn.data + b * s.N, out + b * M * s.C, s, order);
        });
    }
};

const OrtCustomOp* prune_op() {
    static const CustomOp<PruneKernel> op;
    return &op;
}

}  // namespace vitfold_ort
