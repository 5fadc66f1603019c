// EViT's attentive-token selection and inattentive-token fusion as one OpenVINO operation (vitfold.native
// builds it; build --fused-ops puts it in OpenVINO builds of --method evit and topk).
//
// EViTPrune(x [B, N, C], attn [B, N]; keep, num_protected, fuse) -> [B, P + keep + fuse, C]
// computes what vitfold.reduce.evit.PruneSite computes (Liang et al., ICLR 2022, Sec. 3; Top-K is the
// same without fusion, Haurum et al., ICCVW 2023): with P = num_protected and the scores
// s = attn[:, P:] (the class token's attention, averaged over heads, to the other tokens),
//   out[:P]        = x[:P]                                  (prefix tokens, untouched)
//   out[P + i]     = x[P + idx[i]], i < keep                (the keep highest scores, falling; ties keep
//                                                            the lower index first, a stable sort)
//   out[P + keep]  = sum_j x[P + j] * s[j] over j not kept  (fuse = 1 only; in rising j)
// The graph form (TopK, GatherElements, ScatterElements of a 0/1 mask, Mul, ReduceSum, Concat) weights
// every token, the kept ones by exactly 0, and sums them in rising order: adding those zeros changes
// nothing, so the fused token is the graph form's sum term for term. prune_op.cpp is compiled with
// -ffp-contract=off (CMakeLists.txt) so that x * s and the addition round separately, as the
// graph form's Mul and ReduceSum do. The ONNX frontend maps a node EViTPrune of domain "vitfold" onto it.
// float32. Images run in parallel on OpenVINO's thread pool; the work per image is a sort of N - P
// scores and P + keep + fuse row copies / one weighted row sum, a few microseconds.
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/core/parallel.hpp>
#include <openvino/frontend/onnx/extension/op.hpp>
#include <openvino/op/op.hpp>

#include "extension.hpp"
#include "prune_kernels.h"

class EViTPrune : public ov::op::Op {
public:
    OPENVINO_OP("EViTPrune");
    EViTPrune() = default;
    EViTPrune(const ov::Output<ov::Node>& x, const ov::Output<ov::Node>& attn, int64_t keep, int64_t num_protected,
              int64_t fuse)
        : Op({x, attn}), m_keep(keep), m_p(num_protected), m_fuse(fuse) {
        constructor_validate_and_infer_types();
    }
    void validate_and_infer_types() override {
        NODE_VALIDATION_CHECK(this, get_input_size() == 2, "EViTPrune takes tokens and class attention");
        auto shape = get_input_partial_shape(0);
        const auto& attn = get_input_partial_shape(1);
        NODE_VALIDATION_CHECK(this, get_input_element_type(0) == ov::element::f32 && get_input_element_type(1) == ov::element::f32 &&
                                        shape.is_static() && shape.rank().get_length() == 3 && attn.is_static() &&
                                        attn.rank().get_length() == 2 && attn[0] == shape[0] && attn[1] == shape[1],
                              "EViTPrune takes static float32 [B, N, C] tokens and [B, N] class attention");
        const int64_t n = shape[1].get_length();
        NODE_VALIDATION_CHECK(this, m_p >= 0 && m_keep >= 1 && m_keep < n - m_p && (m_fuse == 0 || m_fuse == 1),
                              "keep must be in 1 .. N - num_protected - 1 and fuse 0 or 1");
        shape[1] = m_p + m_keep + m_fuse;
        set_output_type(0, ov::element::f32, shape);
    }
    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
        return std::make_shared<EViTPrune>(args[0], args[1], m_keep, m_p, m_fuse);
    }
    bool visit_attributes(ov::AttributeVisitor& visitor) override {
        visitor.on_attribute("keep", m_keep);
        visitor.on_attribute("num_protected", m_p);
        visitor.on_attribute("fuse", m_fuse);
        return true;
    }
    bool has_evaluate() const override { return true; }
    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
        const auto& shape = inputs[0].get_shape();
        const PruneDims s{shape[1], shape[2], static_cast<size_t>(m_p), static_cast<size_t>(m_keep), m_fuse != 0};
        const size_t B = shape[0], M = s.out_tokens();
        outputs[0].set_shape({B, M, s.C});
        const float* x = inputs[0].data<const float>();
        const float* attn = inputs[1].data<const float>();
        float* out = outputs[0].data<float>();
        ov::parallel_for(B, [&](size_t b) {
            std::vector<int64_t> order(s.N - s.P);
            prune_image(x + b * s.N * s.C, attn + b * s.N, out + b * M * s.C, s, order);
        });
        return true;
    }

private:
    int64_t m_keep = 0, m_p = 0, m_fuse = 0;
};

std::vector<ov::Extension::Ptr> prune_extensions() {
    return {std::make_shared<ov::OpExtension<EViTPrune>>(),
            std::make_shared<ov::frontend::onnx::OpExtension<EViTPrune>>(
                "EViTPrune", "vitfold",
                std::map<std::string, std::string>{{"keep", "keep"}, {"num_protected", "num_protected"}, {"fuse", "fuse"}})};
}
