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
// / size) stays in the graph: OpenVINO's own elementwise arithmetic is not IEEE-sequential, and under
// INT8 a last-bit difference before a FakeQuantize flips a rounding. The scores are summed in another
// order than a MatMul kernel sums them, so an edge within float rounding of the r-th can rank
// differently: the build compares this op with the graph form and stops where they differ.
// The ONNX frontend maps a node ToMeMerge of domain "vitfold" onto it (extension.cpp registers both).
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
        auto shape = get_input_partial_shape(0);
        const auto& keys = get_input_partial_shape(1);
        NODE_VALIDATION_CHECK(this, get_input_element_type(0) == ov::element::f32 && get_input_element_type(1) == ov::element::f32 &&
                                        shape.is_static() && shape.rank().get_length() == 3 && keys.is_static() &&
                                        (keys.rank().get_length() == 3 || keys.rank().get_length() == 4),
                              "ToMeMerge takes static float32 [B, N, C] tokens and [B, H, N, D] keys or a [B, N, D] metric");
        const int64_t n = shape[1].get_length();
        NODE_VALIDATION_CHECK(this, keys[0] == shape[0] && keys[keys.rank().get_length() - 2] == shape[1],
                              "tokens and keys differ in B or N");
        NODE_VALIDATION_CHECK(this, keys.rank().get_length() == 3 || keys[1].get_length() >= 1, "keys need H >= 1 heads");
        NODE_VALIDATION_CHECK(this, m_p >= 0 && m_r > 0 && m_r <= (n - m_p) / 2,
                              "r must be in 1 .. (N - num_protected) / 2 (matching.max_merge)");
        shape[1] = shape[1] - m_r;
        set_output_type(0, ov::element::f32, shape);
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
        const auto& shape = inputs[0].get_shape();
        const auto& keys = inputs[1].get_shape();  // [B, H, N, D] or [B, N, D]
        const size_t H = keys.size() == 4 ? keys[1] : 1;
        const Dims s{shape[1], shape[2], keys.back(), static_cast<size_t>(m_r), static_cast<size_t>(m_p), H};
        const size_t B = shape[0];
        const size_t M = s.N - s.r;
        outputs[0].set_shape({B, M, s.C});
        const float* x = inputs[0].data<const float>();
        const float* keys_data = inputs[1].data<const float>();
        float* out = outputs[0].data<float>();
        static const Kernels kernels = Kernels::pick();
        const bool one = B == 1;  // one image: split it across the threads; else one image per thread
        ov::parallel_for(B, [&](size_t b) {
            merge_image(kernels, x + b * s.N * s.C, keys_data + b * s.H * s.N * s.D, out + b * M * s.C, s,
                        [one](size_t n, size_t grain, const auto& fn) { split(n, grain, one, fn); });
        });
        return true;
    }

private:
    int64_t m_r = 0, m_p = 0;
};

std::vector<ov::Extension::Ptr> tome_extensions() {
    return {std::make_shared<ov::OpExtension<ToMeMerge>>(),
            std::make_shared<ov::frontend::onnx::OpExtension<ToMeMerge>>(
                "ToMeMerge", "vitfold", std::map<std::string, std::string>{{"r", "r"}, {"num_protected", "num_protected"}})};
}
