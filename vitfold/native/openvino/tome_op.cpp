// ToMe's bipartite soft matching and sum merge as one OpenVINO operation (vitfold.native builds it;
// build --fused-ops puts it in OpenVINO builds, benchmarks/fused_ops.py times it).
//
// ToMeMerge(x [B, N, C], metric [B, N, D]; r, num_protected) -> [B, N - r, C] computes what
// vitfold.reduce.matching.bipartite_soft_matching(metric, r, num_protected) followed by
// merge(x, mode="sum") computes (Bolya et al., ICLR 2023, Sec. 3): A = even tokens, B = odd tokens,
// each A token's best cosine partner in B, the r strongest edges merged (A summed into B), output
// cat([unmerged A, B]) with the unmerged A tokens by position when there are prefix tokens, else by
// falling edge score, and with two or more prefix tokens each prefix token back at its own position
// (matching._prefix_order). Ties keep the lower index, as the graph form's ONNX TopK / ArgMax do.
// The scores are summed in another order than a MatMul kernel sums them, so an edge within float
// rounding of the r-th can rank differently: the build compares this op with the graph form and
// stops where they differ. The ONNX frontend maps a node ToMeMerge of domain "vitfold" onto it.
// float32; images in parallel on OpenVINO's thread pool.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/core/parallel.hpp>
#include <openvino/frontend/onnx/extension/op.hpp>
#include <openvino/op/op.hpp>

namespace {

struct Dims {
    size_t N, C, D, r, P;
};

// One image: cosine matching on its metric [N, D], merge of its tokens x [N, C] into out [N - r, C].
void merge_image(const float* x, const float* metric, float* out, const Dims& s) {
    const size_t Na = (s.N + 1) / 2, Nb = s.N / 2, Nu = Na - s.r, C = s.C, D = s.D;
    std::vector<float> unit(s.N * D), best(Na);
    std::vector<int64_t> partner(Na), order(Na);
    for (size_t i = 0; i < s.N; ++i) {
        float sq = 0.f;
        for (size_t d = 0; d < D; ++d) sq += metric[i * D + d] * metric[i * D + d];
        const float norm = std::sqrt(sq);  // divided, as the graph form's metric / norm
        for (size_t d = 0; d < D; ++d) unit[i * D + d] = metric[i * D + d] / norm;
    }
    for (size_t i = 0; i < Na; ++i) {  // A token i sits at 2i, B token j at 2j + 1
        float top = -INFINITY;
        int64_t arg = 0;
        if (2 * i >= s.P) {
            const float* a = &unit[2 * i * D];
            for (size_t j = s.P / 2; j < Nb; ++j) {  // 2j + 1 >= P from j = P / 2 on
                const float* b = &unit[(2 * j + 1) * D];
                float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                size_t d = 0;
                for (; d + 8 <= D; d += 8)
                    for (int l = 0; l < 8; ++l) acc[l] += a[d + l] * b[d + l];
                float dot = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
                for (; d < D; ++d) dot += a[d] * b[d];
                if (dot > top) {
                    top = dot;
                    arg = static_cast<int64_t>(j);
                }
            }
        }
        best[i] = top;
        partner[i] = arg;
    }
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t u, int64_t v) { return best[u] > best[v]; });
    std::vector<int64_t> unmerged(order.begin() + s.r, order.end());
    if (s.P) std::sort(unmerged.begin(), unmerged.end());  // prefix tokens back in front, as the reference
    // Output slots of cat([unmerged A, B]): prefix token p (A when even, B when odd) at slot p, then the
    // other unmerged A tokens, then the other B tokens; with P <= 1 the concatenation itself.
    const size_t in_a = (s.P + 1) / 2, in_b = s.P / 2;
    auto slot_a = [&](size_t k) { return k < in_a ? 2 * k : s.P + (k - in_a); };
    auto slot_b = [&](size_t j) { return j < in_b ? 2 * j + 1 : s.P + (Nu - in_a) + (j - in_b); };
    for (size_t k = 0; k < Nu; ++k) std::copy_n(x + 2 * unmerged[k] * C, C, out + slot_a(k) * C);
    for (size_t j = 0; j < Nb; ++j) std::copy_n(x + (2 * j + 1) * C, C, out + slot_b(j) * C);
    for (size_t k = 0; k < s.r; ++k) {
        const float* src = x + 2 * order[k] * C;
        float* dst = out + slot_b(partner[order[k]]) * C;
        for (size_t c = 0; c < C; ++c) dst[c] += src[c];
    }
}

}  // namespace

class ToMeMerge : public ov::op::Op {
public:
    OPENVINO_OP("ToMeMerge");
    ToMeMerge() = default;
    ToMeMerge(const ov::Output<ov::Node>& x, const ov::Output<ov::Node>& metric, int64_t r, int64_t num_protected)
        : Op({x, metric}), m_r(r), m_p(num_protected) {
        constructor_validate_and_infer_types();
    }
    void validate_and_infer_types() override {
        const auto& metric = get_input_partial_shape(1);
        auto shape = get_input_partial_shape(0);
        NODE_VALIDATION_CHECK(this, get_input_element_type(0) == ov::element::f32 && get_input_element_type(1) == ov::element::f32,
                              "ToMeMerge takes float32 tokens and metric");
        NODE_VALIDATION_CHECK(this, shape.rank().is_static() && shape.rank().get_length() == 3 && shape.is_static() &&
                                        metric.is_static() && metric.rank().get_length() == 3,
                              "ToMeMerge takes static [B, N, C] tokens and [B, N, D] metric");
        const int64_t n = shape[1].get_length();
        NODE_VALIDATION_CHECK(this, metric[0] == shape[0] && metric[1] == shape[1], "tokens and metric differ in B or N");
        NODE_VALIDATION_CHECK(this, m_p >= 0 && m_r > 0 && m_r <= (n - m_p) / 2,
                              "r must be in 1 .. (N - num_protected) / 2 (matching.max_merge)");
        shape[1] = shape[1] - m_r;
        set_output_type(0, get_input_element_type(0), shape);
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
        const Dims s{shape[1], shape[2], inputs[1].get_shape()[2], static_cast<size_t>(m_r), static_cast<size_t>(m_p)};
        const size_t B = shape[0];
        outputs[0].set_shape({B, s.N - s.r, s.C});
        const float* x = inputs[0].data<const float>();
        const float* metric = inputs[1].data<const float>();
        float* out = outputs[0].data<float>();
        ov::parallel_for(B, [&](size_t b) {  // OpenVINO's own thread pool (TBB), as its CPU kernels use
            merge_image(x + b * s.N * s.C, metric + b * s.N * s.D, out + b * (s.N - s.r) * s.C, s);
        });
        return true;
    }

private:
    int64_t m_r = 0, m_p = 0;
};

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>(
    {std::make_shared<ov::OpExtension<ToMeMerge>>(),
     std::make_shared<ov::frontend::onnx::OpExtension<ToMeMerge>>(
         "ToMeMerge", "vitfold", std::map<std::string, std::string>{{"r", "r"}, {"num_protected", "num_protected"}})}));
