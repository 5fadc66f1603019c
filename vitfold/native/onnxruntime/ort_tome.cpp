// vitfold.ToMeMerge and ToMeMergeWavg on ONNX Runtime: the functions of openvino/tome_op.cpp (see there),
// from the same host kernels (kernels/tome_kernels.h).
// ToMeMerge(x [B, N, C], keys [B, H, N, D] or metric [B, N, D]; r, num_protected) -> [B, N - r, C], and
// ToMeMergeWavg(x, keys, size [B, N, 1]; r, num_protected) -> (x [B, N - r, C], size [B, N - r, 1]), the
// size-weighted average with the weighting inside. That one divides, as ONNX Runtime's Div does (where
// OpenVINO's op multiplies by the reciprocal, as OpenVINO's graph form does), so that each equals its own
// backend's graph form bit for bit.
// Images run in parallel on ONNX Runtime's intra-op threads; a batch of one splits its image's
// normalisation, matching and row copies across them instead.
#include "ort_common.h"
#include "tome_kernels.h"

namespace vitfold_ort {

// The attributes and input checks of both ToMe ops; `name` names the op in their messages.
struct ToMeAttributes {
    int64_t r = 0, p = 0;

    static OrtStatus* read(const OrtApi* api, const OrtKernelInfo* info, const char* name, ToMeAttributes* out) {
        VITFOLD_ORT_TRY(int_attribute(api, info, "r", &out->r));
        VITFOLD_ORT_TRY(int_attribute(api, info, "num_protected", &out->p));
        if (out->r < 1 || out->p < 0) return invalid(api, std::string(name) + " needs r >= 1 and num_protected >= 0");
        return nullptr;
    }

    // Checks tokens [B, N, C] against keys [B, H, N, D] / [B, N, D] and r, and gives one image's dims.
    OrtStatus* dims(const OrtApi* api, const char* name, const Input& x, const Input& keys, Dims* out) const {
        const size_t kr = keys.dims.size();
        if (x.dims.size() != 3 || (kr != 3 && kr != 4) || keys.dims[0] != x.dims[0] || keys.dims[kr - 2] != x.dims[1] ||
            (kr == 4 && keys.dims[1] < 1))
            return invalid(api, std::string(name) + " takes [B, N, C] tokens and [B, H, N, D] keys (H >= 1) or a [B, N, D] metric of the same B and N");
        const int64_t n = x.dims[1];
        if (r > (n - p) / 2) return invalid(api, std::string(name) + ": r must be in 1 .. (N - num_protected) / 2 (matching.max_merge)");
        *out = Dims{static_cast<size_t>(n), static_cast<size_t>(x.dims[2]), static_cast<size_t>(keys.dims[kr - 1]),
                    static_cast<size_t>(r), static_cast<size_t>(p), kr == 4 ? static_cast<size_t>(keys.dims[1]) : 1};
        return nullptr;
    }
};

// Runs image(b, split) for each of B images: one image per intra-op thread, or with B == 1 the one image
// split across them.
template <typename Image>
OrtStatus* each_image(const OrtApi* api, OrtKernelContext* context, size_t B, const Image& image) {
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

struct ToMeKernel {
    static constexpr const char* kName = "ToMeMerge";
    static constexpr size_t kInputs = 2, kOutputs = 1;
    const OrtApi* api;
    ToMeAttributes a;

    static OrtStatus* create(const OrtApi* api, const OrtKernelInfo* info, ToMeKernel** out) {
        ToMeAttributes a;
        VITFOLD_ORT_TRY(ToMeAttributes::read(api, info, kName, &a));
        *out = new ToMeKernel{api, a};
        return nullptr;
    }

    OrtStatus* compute(OrtKernelContext* context) const {
        Input x, keys;
        VITFOLD_ORT_TRY(read_input(api, context, 0, &x));
        VITFOLD_ORT_TRY(read_input(api, context, 1, &keys));
        Dims s{};
        VITFOLD_ORT_TRY(a.dims(api, kName, x, keys, &s));
        const size_t B = static_cast<size_t>(x.dims[0]), M = s.N - s.r;
        float* out = nullptr;
        VITFOLD_ORT_TRY(make_output(api, context, 0, {x.dims[0], static_cast<int64_t>(M), x.dims[2]}, &out));
        const Kernels& kernels = picked_kernels();
        return each_image(api, context, B, [&](size_t b, const auto& split) {
            merge_image(kernels, x.data + b * s.N * s.C, keys.data + b * s.H * s.N * s.D, out + b * M * s.C, s, split);
        });
    }
};

struct ToMeWavgKernel {
    static constexpr const char* kName = "ToMeMergeWavg";
    static constexpr size_t kInputs = 3, kOutputs = 2;
    const OrtApi* api;
    ToMeAttributes a;

    static OrtStatus* create(const OrtApi* api, const OrtKernelInfo* info, ToMeWavgKernel** out) {
        ToMeAttributes a;
        VITFOLD_ORT_TRY(ToMeAttributes::read(api, info, kName, &a));
        *out = new ToMeWavgKernel{api, a};
        return nullptr;
    }

    OrtStatus* compute(OrtKernelContext* context) const {
        Input x, keys, size;
        VITFOLD_ORT_TRY(read_input(api, context, 0, &x));
        VITFOLD_ORT_TRY(read_input(api, context, 1, &keys));
        VITFOLD_ORT_TRY(read_input(api, context, 2, &size));
        Dims s{};
        VITFOLD_ORT_TRY(a.dims(api, kName, x, keys, &s));
        if (size.dims.size() != 3 || size.dims[0] != x.dims[0] || size.dims[1] != x.dims[1] || size.dims[2] != 1)
            return invalid(api, "ToMeMergeWavg takes [B, N, 1] sizes for [B, N, C] tokens");
        const size_t B = static_cast<size_t>(x.dims[0]), M = s.N - s.r;
        float *out = nullptr, *out_size = nullptr;
        VITFOLD_ORT_TRY(make_output(api, context, 0, {x.dims[0], static_cast<int64_t>(M), x.dims[2]}, &out));
        VITFOLD_ORT_TRY(make_output(api, context, 1, {x.dims[0], static_cast<int64_t>(M), 1}, &out_size));
        const Kernels& kernels = picked_kernels();
        return each_image(api, context, B, [&](size_t b, const auto& split) {
            merge_wavg_image(kernels, x.data + b * s.N * s.C, size.data + b * s.N, keys.data + b * s.H * s.N * s.D,
                             out + b * M * s.C, out_size + b * M, s, /*reciprocal=*/false, split);
        });
    }
};

const OrtCustomOp* tome_op() {
    static const CustomOp<ToMeKernel> op;
    return &op;
}

const OrtCustomOp* tome_wavg_op() {
    static const CustomOp<ToMeWavgKernel> op;
    return &op;
}

}  // namespace vitfold_ort
