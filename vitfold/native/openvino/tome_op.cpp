// ToMe's bipartite soft matching and sum merge as one OpenVINO operation (vitfold.native builds it;
// build --fused-ops puts it in OpenVINO builds, benchmarks/fused_ops.py times it).
//
// ToMeMerge(x [B, N, C], keys [B, H, N, D] or metric [B, N, D]; r, num_protected) -> [B, N - r, C]
// computes what vitfold.reduce.tome.ToMeSite computes: metric = keys.mean(1), then
// vitfold.reduce.matching.bipartite_soft_matching(metric, r, num_protected) followed by
// merge(x, mode="sum") (Bolya et al., ICLR 2023, Sec. 3): A = even tokens, B = odd tokens,
// each A token's best cosine partner in B, the r strongest edges merged (A summed into B),
// output cat([unmerged A, B]) with the unmerged A tokens by position when there are prefix tokens, else
// by falling edge score, and with two or more prefix tokens each prefix token back at its own position
// (matching._prefix_order). Ties keep the lower index, as the graph form's ONNX TopK / ArgMax do.
// The merged rows are the graph form's sums in its order (each B row plus its A rows in edge order),
// so with the same token choices the outputs are identical. The size weighting around it (x * size,
// / size) stays in the graph (TensorRT's plugin takes this form). The scores are summed in another
// order than a MatMul kernel sums them, so an edge within float rounding of the r-th can rank
// differently: the build compares this op with the graph form and stops where they differ.
//
// ToMeMergeWavg(x [B, N, C], keys, size [B, N, 1]; r, num_protected) -> (x [B, N - r, C], size [B, N - r, 1])
// is the same matching with the size weighting inside (ToMe's merge_wavg: sum x * size and size over
// each output token's members, then divide): what the graph form computes around a ToMeMerge site
// (Mul, Concat, the site, two Slices, Div), in its order and rounding, without those five nodes. Its
// division is a multiply by the reciprocal (1 / size, rounded, then the product), because OpenVINO's
// ConvertDivide turns the graph form's float Divide into exactly that; so the outputs equal the graph
// form's bit for bit (DeiT-S, DINOv2: max abs 0; a true division measured 1.5e-6). INT8 needs that: a
// last-bit difference before a FakeQuantize flips its rounding (an earlier weighted op: 0.08 on DINOv2).
// OpenVINO builds use it at f32 and int8 (NNCF quantizes the same graph: DINOv2, 73 FakeQuantize nodes
// in both, outputs identical on the 7 photos).
// The ONNX frontend maps nodes ToMeMerge / ToMeMergeWavg of domain "vitfold" onto them (extension.cpp
// registers both).
// float32. Images run in parallel on OpenVINO's thread pool, and a batch of one splits its image's
// normalisation, matching and row copies across the threads instead; the kernels are vectorised for
// the widest of AVX-512, AVX2 and the generic vectors (SSE, NEON) that the CPU runs, picked at run time.
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/core/parallel.hpp>
#include <openvino/frontend/onnx/extension/op.hpp>
#include <openvino/op/op.hpp>

#include "extension.hpp"
#include "tome_kernels.h"

namespace {

// Runs fn(begin, end) over [0, n) in chunks of `grain`: on OpenVINO's threads (TBB, as its CPU kernels)
// when `threads` says so, else here.
template <typename F>
void split(size_t n, size_t grain, bool threads, const F& fn) {
    if (!threads || n <= grain) return fn(size_t{0}, n);
    const size_t chunks = (n + grain - 1) / grain;
    ov::parallel_nt(0, [&](int ithr, int nthr) {
        size_t first = 0, last = 0;
        ov::splitter(chunks, static_cast<size_t>(nthr), static_cast<size_t>(ithr), first, last);
        if (first < last) fn(first * grain, std::min(n, last * grain));
    });
}

// Validates ToMeMerge's / ToMeMergeWavg's tokens and keys (inputs 0 and 1) and returns the merged
// tokens' shape [B, N - r, C].
ov::PartialShape merged_shape(const ov::Node* node, int64_t r, int64_t p) {
    auto shape = node->get_input_partial_shape(0);
    const auto& keys = node->get_input_partial_shape(1);
    NODE_VALIDATION_CHECK(node, node->get_input_element_type(0) == ov::element::f32 && node->get_input_element_type(1) == ov::element::f32 &&
                                    shape.is_static() && shape.rank().get_length() == 3 && keys.is_static() &&
                                    (keys.rank().get_length() == 3 || keys.rank().get_length() == 4),
                          "ToMe's op takes static float32 [B, N, C] tokens and [B, H, N, D] keys or a [B, N, D] metric");
    const int64_t n = shape[1].get_length();
    NODE_VALIDATION_CHECK(node, keys[0] == shape[0] && keys[keys.rank().get_length() - 2] == shape[1],
                          "tokens and keys differ in B or N");
    NODE_VALIDATION_CHECK(node, keys.rank().get_length() == 3 || keys[1].get_length() >= 1, "keys need H >= 1 heads");
    NODE_VALIDATION_CHECK(node, p >= 0 && r > 0 && r <= (n - p) / 2,
                          "r must be in 1 .. (N - num_protected) / 2 (matching.max_merge)");
    shape[1] = shape[1] - r;
    return shape;
}

// The dims of one image, from tokens [B, N, C] and keys [B, H, N, D] / [B, N, D].
Dims image_dims(const ov::Shape& shape, const ov::Shape& keys, int64_t r, int64_t p) {
    const size_t H = keys.size() == 4 ? keys[1] : 1;
    return Dims{shape[1], shape[2], keys.back(), static_cast<size_t>(r), static_cast<size_t>(p), H};
}

// Runs image(b, split) for every image of a batch of B: one image per thread, or with B == 1 the one
// image split across the threads.
template <typename Image>
void each_image(size_t B, const Image& image) {
    const bool one = B == 1;
    ov::parallel_for(B, [&](size_t b) {
        image(b, [one](size_t n, size_t grain, const auto& fn) { split(n, grain, one, fn); });
    });
}

}  // namespace

class ToMeMerge : public ov::op::Op {
public:
    OPENVINO_OP("ToMeMerge");
    ToMeMerge() = default;
    ToMeMerge(const ov::Output<ov::Node>& x, const ov::Output<ov::Node>& keys, int64_t r, int64_t num_protected)
        : Op({x, keys}), m_r(r), m_p(num_protected) {
        constructor_validate_and_infer_types();
    }
    void validate_and_infer_types() override {
        NODE_VALIDATION_CHECK(this, get_input_size() == 2, "ToMeMerge takes tokens and keys");
        set_output_type(0, ov::element::f32, merged_shape(this, m_r, m_p));
    }
    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
        return std::make_shared<ToMeMerge>(args[0], args[1], m_r, m_p);
    }
    bool visit_attributes(ov::AttributeVisitor& visitor) override {
        visitor.on_attribute("r", m_r);
        visitor.on_attribute("num_protected", m_p);
        return true;
    }
    bool has_evaluate() const override { return true; }
    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
        const Dims s = image_dims(inputs[0].get_shape(), inputs[1].get_shape(), m_r, m_p);
        const size_t B = inputs[0].get_shape()[0], M = s.N - s.r;
        outputs[0].set_shape({B, M, s.C});
        const float* x = inputs[0].data<const float>();
        const float* keys = inputs[1].data<const float>();
        float* out = outputs[0].data<float>();
        const Kernels& kernels = picked_kernels();
        each_image(B, [&](size_t b, const auto& split) {
            merge_image(kernels, x + b * s.N * s.C, keys + b * s.H * s.N * s.D, out + b * M * s.C, s, split);
        });
        return true;
    }

private:
    int64_t m_r = 0, m_p = 0;
};

class ToMeMergeWavg : public ov::op::Op {
public:
    OPENVINO_OP("ToMeMergeWavg");
    ToMeMergeWavg() = default;
    ToMeMergeWavg(const ov::Output<ov::Node>& x, const ov::Output<ov::Node>& keys, const ov::Output<ov::Node>& size,
                  int64_t r, int64_t num_protected)
        : Op({x, keys, size}), m_r(r), m_p(num_protected) {
        constructor_validate_and_infer_types();
    }
    void validate_and_infer_types() override {
        NODE_VALIDATION_CHECK(this, get_input_size() == 3, "ToMeMergeWavg takes tokens, keys and sizes");
        const auto shape = merged_shape(this, m_r, m_p);
        const auto& tokens = get_input_partial_shape(0);
        const auto& size = get_input_partial_shape(2);
        NODE_VALIDATION_CHECK(this, get_input_element_type(2) == ov::element::f32 && size.is_static() &&
                                        size.rank().get_length() == 3 && size[0] == tokens[0] && size[1] == tokens[1] && size[2] == 1,
                              "ToMeMergeWavg takes float32 [B, N, 1] sizes for [B, N, C] tokens");
        auto merged_size = shape;
        merged_size[2] = 1;
        set_output_type(0, ov::element::f32, shape);
        set_output_type(1, ov::element::f32, merged_size);
    }
    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
        return std::make_shared<ToMeMergeWavg>(args[0], args[1], args[2], m_r, m_p);
    }
    bool visit_attributes(ov::AttributeVisitor& visitor) override {
        visitor.on_attribute("r", m_r);
        visitor.on_attribute("num_protected", m_p);
        return true;
    }
    bool has_evaluate() const override { return true; }
    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
        const Dims s = image_dims(inputs[0].get_shape(), inputs[1].get_shape(), m_r, m_p);
        const size_t B = inputs[0].get_shape()[0], M = s.N - s.r;
        outputs[0].set_shape({B, M, s.C});
        outputs[1].set_shape({B, M, 1});
        const float* x = inputs[0].data<const float>();
        const float* keys = inputs[1].data<const float>();
        const float* size = inputs[2].data<const float>();
        float* out = outputs[0].data<float>();
        float* out_size = outputs[1].data<float>();
        const Kernels& kernels = picked_kernels();
        each_image(B, [&](size_t b, const auto& split) {
            merge_wavg_image(kernels, x + b * s.N * s.C, size + b * s.N, keys + b * s.H * s.N * s.D, out + b * M * s.C,
                             out_size + b * M, s, /*reciprocal=*/true, split);
        });
        return true;
    }

private:
    int64_t m_r = 0, m_p = 0;
};

std::vector<ov::Extension::Ptr> tome_extensions() {
    const std::map<std::string, std::string> attributes{{"r", "r"}, {"num_protected", "num_protected"}};
    return {std::make_shared<ov::OpExtension<ToMeMerge>>(),
            std::make_shared<ov::frontend::onnx::OpExtension<ToMeMerge>>("ToMeMerge", "vitfold", attributes),
            std::make_shared<ov::OpExtension<ToMeMergeWavg>>(),
            std::make_shared<ov::frontend::onnx::OpExtension<ToMeMergeWavg>>("ToMeMergeWavg", "vitfold", attributes)};
}
