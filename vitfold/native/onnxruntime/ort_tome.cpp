// vitfold.ToMeMerge on ONNX Runtime: the function of openvino/tome_op.cpp (see there), from the same
// host kernels (kernels/tome_kernels.h), so that the two backends' fused sites agree bit for bit.
// ToMeMerge(x [B, N, C], keys [B, H, N, D] or metric [B, N, D]; r, num_protected) -> [B, N - r, C].
// Images run in parallel on ONNX Runtime's intra-op threads; a batch of one splits its image's
// normalisation, matching and row copies across them instead.
#include "ort_common.h"
#include "tome_kernels.h"

namespace vitfold_ort {

struct ToMeKernel {
    static constexpr const char* kName = "ToMeMerge";
    static constexpr size_t kInputs = 2;
    const OrtApi* api;
    int64_t r = 0, p = 0;

    static OrtStatus* create(const OrtApi* api, const OrtKernelInfo* info, ToMeKernel** out) {
        int64_t r = 0, p = 0;
        VITFOLD_ORT_TRY(int_attribute(api, info, "r", &r));
        VITFOLD_ORT_TRY(int_attribute(api, info, "num_protected", &p));
        if (r < 1 || p < 0) return invalid(api, "ToMeMerge needs r >= 1 and num_protected >= 0");
        *out = new ToMeKernel{api, r, p};
        return nullptr;
    }

    OrtStatus* compute(OrtKernelContext* context) const {
        Input x, keys;
        VITFOLD_ORT_TRY(read_input(api, context, 0, &x));
        VITFOLD_ORT_TRY(read_input(api, context, 1, &keys));
        const size_t kr = keys.dims.size();
        if (x.dims.size() != 3 || (kr != 3 && kr != 4) || keys.dims[0] != x.dims[0] || keys.dims[kr - 2] != x.dims[1] ||
            (kr == 4 && keys.dims[1] < 1))
            return invalid(api, "ToMeMerge takes [B, N, C] tokens and [B, H, N, D] keys (H >= 1) or a [B, N, D] metric of the same B and N");
        const int64_t n = x.dims[1];
        if (r > (n - p) / 2) return invalid(api, "ToMeMerge: r must be in 1 .. (N - num_protected) / 2 (matching.max_merge)");
        const size_t B = static_cast<size_t>(x.dims[0]);
        const Dims s{static_cast<size_t>(n), static_cast<size_t>(x.dims[2]), static_cast<size_t>(keys.dims[kr - 1]),
                     static_cast<size_t>(r), static_cast<size_t>(p), kr == 4 ? static_cast<size_t>(keys.dims[1]) : 1};
        const size_t M = s.N - s.r;
        float* out = nullptr;
        VITFOLD_ORT_TRY(make_output(api, context, 0, {x.dims[0], static_cast<int64_t>(M), x.dims[2]}, &out));
        static const Kernels kernels = Kernels::pick();
        auto image = [&](size_t b, const auto& split) {
            merge_image(kernels, x.data + b * s.N * s.C, keys.data + b * s.H * s.N * s.D, out + b * M * s.C, s, split);
        };
        auto here = [](size_t n, size_t, const auto& fn) { fn(size_t{0}, n); };
        if (B != 1) return parallel_for(api, context, B, [&](size_t b) { image(b, here); });  // B = 0: nothing
        OrtStatus* failed = nullptr;  // the first failure of a split (the kernels themselves cannot fail)
        image(0, [&](size_t n, size_t grain, const auto& fn) {
            if (failed) return;
            failed = parallel_for(api, context, (n + grain - 1) / grain,
                                  [&](size_t chunk) { fn(chunk * grain, std::min(n, (chunk + 1) * grain)); });
        });
        return failed;
    }
};

const OrtCustomOp* tome_op() {
    static const CustomOp<ToMeKernel> op;
    return &op;
}

}  // namespace vitfold_ort
