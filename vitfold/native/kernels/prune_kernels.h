// EViT's / Top-K's host kernel, shared by the OpenVINO op (openvino/prune_op.cpp) and the ONNX Runtime
// op (onnxruntime/ort_prune.cpp): one image's top-k of the class attention, row gather and fused token.
// What it computes, and why in this order, is described in openvino/prune_op.cpp; a translation unit
// that includes it is compiled with -ffp-contract=off, so that x * s and the sum round separately, as
// the graph form's Mul and ReduceSum do. Included by one translation unit per library.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

struct PruneDims {
    size_t N, C, P, keep;
    bool fuse;
    size_t out_tokens() const { return P + keep + (fuse ? 1 : 0); }
};

// One image: x [N, C], attn [N] -> out [P + keep + fuse, C]. `order` is scratch of N - P entries.
void prune_image(const float* x, const float* attn, float* out, const PruneDims& s, std::vector<int64_t>& order) {
    const size_t M = s.N - s.P, C = s.C;
    const float* score = attn + s.P;
    std::iota(order.begin(), order.end(), 0);
    // The keep largest scores, falling; equal scores in rising index (TopK's order in the graph form).
    std::partial_sort(order.begin(), order.begin() + s.keep, order.end(), [&](int64_t a, int64_t b) {
        return score[a] > score[b] || (score[a] == score[b] && a < b);
    });
    std::memcpy(out, x, s.P * C * sizeof(float));
    for (size_t i = 0; i < s.keep; ++i) std::memcpy(out + (s.P + i) * C, x + (s.P + order[i]) * C, C * sizeof(float));
    if (!s.fuse) return;
    std::vector<char> kept(M, 0);
    for (size_t i = 0; i < s.keep; ++i) kept[order[i]] = 1;
    float* fused = out + (s.P + s.keep) * C;
    std::fill(fused, fused + C, 0.f);
    for (size_t j = 0; j < M; ++j) {
        if (kept[j]) continue;  // weight exactly 0 in the graph form
        const float w = score[j];
        const float* row = x + (s.P + j) * C;
        for (size_t c = 0; c < C; ++c) fused[c] += row[c] * w;
    }
}

}  // namespace
