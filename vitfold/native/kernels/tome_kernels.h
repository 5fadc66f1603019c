// ToMe's host kernels, shared by the OpenVINO op (openvino/tome_op.cpp) and the ONNX Runtime op
// (onnxruntime/ort_ops.cpp): the metric's normalisation, the bipartite matching and the merge of one
// image, vectorised per instruction set. What they compute, and why in this order, is described in
// openvino/tome_op.cpp. The caller supplies the threads: merge_image takes a `split(n, grain, fn)` that
// runs fn(begin, end) over [0, n) in chunks of `grain`, on the backend's thread pool or inline.
// Included by one translation unit per library (its functions have internal linkage).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

struct Dims {
    size_t N, C, D, r, P, H;  // H: heads the metric is averaged over (1: the metric itself)
    size_t Na() const { return (N + 1) / 2; }  // A tokens: 2i
    size_t Nb() const { return N / 2; }        // B tokens: 2j + 1
};

// One output row of the merge: out[slot] = x[src].
struct Row {
    size_t src, slot;
};

typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));
constexpr size_t kPad = 64;  // bt's row stride: a multiple of every tile width below

// The kernels below are templates over a GCC / Clang vector type V, so one source serves SSE, AVX2,
// AVX-512 and NEON; each is instantiated per instruction set and Kernels::pick takes the widest this
// CPU runs. Each works on a range of its items, so that one image can be split across threads.

// Tokens [begin, end): the metric row (the mean over heads of keys [H, N, D]: the sum in head order,
// divided by H, as the graph form's ReduceMean), divided by its L2 norm into unit [N, D]; B tokens'
// rows also transposed into bt [D, Nbp].
template <typename V>
__attribute__((always_inline)) inline void normalize(const float* keys, float* unit, float* bt, size_t Nbp, const Dims& s,
                                                     size_t begin, size_t end) {
    constexpr size_t kLanes = sizeof(V) / sizeof(float);
    const size_t D = s.D;
    const float heads = static_cast<float>(s.H);
    for (size_t i = begin; i < end; ++i) {
        float* row = unit + i * D;
        std::memcpy(row, keys + i * D, D * sizeof(float));
        if (s.H > 1) {
            for (size_t h = 1; h < s.H; ++h) {
                const float* head = keys + (h * s.N + i) * D;
                for (size_t d = 0; d < D; ++d) row[d] += head[d];
            }
            for (size_t d = 0; d < D; ++d) row[d] /= heads;
        }
        V acc = {};  // the sum of squares in kLanes partial sums (a MatMul kernel's order is no more sequential)
        size_t d = 0;
        for (; d + kLanes <= D; d += kLanes) {
            V m;
            std::memcpy(&m, row + d, sizeof m);
            acc += m * m;
        }
        float lanes[kLanes], sq = 0.f;
        std::memcpy(lanes, &acc, sizeof acc);
        for (size_t l = 0; l < kLanes; ++l) sq += lanes[l];
        for (; d < D; ++d) sq += row[d] * row[d];
        const float norm = std::sqrt(sq);  // divided, as the graph form's metric / norm
        for (d = 0; d < D; ++d) row[d] /= norm;
        if (i % 2)
            for (d = 0; d < D; ++d) bt[d * Nbp + i / 2] = row[d];
    }
}

// A tokens [begin, end) (from (P + 1) / 2 on: 2i >= P): each one's best B partner by cosine score,
// from unit rows and the transposed B rows, in kRows x (kCols vectors) tiles of independent
// accumulators, each score summed over d in order. Ties keep the lower j (strict >, j ascending);
// protected B tokens (2j + 1 < P) are never chosen, as the graph form's -inf scores. best starts -inf.
template <typename V, size_t kRows, size_t kCols>
__attribute__((always_inline)) inline void match(const float* unit, const float* bt, size_t Nbp, const Dims& s,
                                                 float* best, int64_t* partner, size_t begin, size_t end) {
    constexpr size_t kTile = sizeof(V) / sizeof(float) * kCols;
    const size_t Nb = s.Nb(), D = s.D, j0 = s.P / 2;  // 2j + 1 >= P from j = P / 2 on
    for (size_t ib = begin; ib < end; ib += kRows) {
        const size_t rows = std::min(kRows, end - ib);
        const float* a[kRows];
        for (size_t q = 0; q < kRows; ++q) a[q] = unit + 2 * (ib + std::min(q, rows - 1)) * D;
        for (size_t jb = j0 / kTile * kTile; jb < Nb; jb += kTile) {
            V acc[kRows][kCols] = {};
            for (size_t d = 0; d < D; ++d) {
                V row[kCols];
                std::memcpy(row, bt + d * Nbp + jb, sizeof row);
                for (size_t q = 0; q < kRows; ++q) {
                    const float ad = a[q][d];
                    for (size_t c = 0; c < kCols; ++c) acc[q][c] += ad * row[c];
                }
            }
            const size_t last = std::min(kTile, Nb - jb);
            for (size_t q = 0; q < rows; ++q) {
                float score[kTile];
                std::memcpy(score, acc[q], sizeof score);
                for (size_t l = jb < j0 ? j0 - jb : 0; l < last; ++l)
                    if (score[l] > best[ib + q]) {
                        best[ib + q] = score[l];
                        partner[ib + q] = static_cast<int64_t>(jb + l);
                    }
            }
        }
    }
}

// Output rows [begin, end) of the merge: copies of their source rows.
__attribute__((always_inline)) inline void copy_rows(const Row* rows, const float* x, float* out, size_t C, size_t begin,
                                                     size_t end) {
    for (size_t k = begin; k < end; ++k) std::memcpy(out + rows[k].slot * C, x + rows[k].src * C, C * sizeof(float));
}

// The three kernels of one instruction set (target: the functions' target attribute, or nothing).
#define VITFOLD_KERNELS(name, target, V, kRows, kCols)                                                                \
    target                                                                                                             \
    void name##_normalize(const float* keys, float* unit, float* bt, size_t Nbp, const Dims& s, size_t b, size_t e) { \
        normalize<V>(keys, unit, bt, Nbp, s, b, e);                                                                    \
    }                                                                                                                  \
    target                                                                                                             \
    void name##_match(const float* unit, const float* bt, size_t Nbp, const Dims& s, float* best, int64_t* partner,   \
                      size_t b, size_t e) {                                                                            \
        match<V, kRows, kCols>(unit, bt, Nbp, s, best, partner, b, e);                                                 \
    }                                                                                                                  \
    target                                                                                                             \
    void name##_copy(const Row* rows, const float* x, float* out, size_t C, size_t b, size_t e) {                      \
        copy_rows(rows, x, out, C, b, e);                                                                              \
    }

#if defined(__x86_64__) && defined(__GNUC__)
VITFOLD_KERNELS(avx512, __attribute__((target("avx512f"))), f32x16, 8, 1)
VITFOLD_KERNELS(avx2, __attribute__((target("avx2,fma"))), f32x8, 6, 2)
#endif
VITFOLD_KERNELS(generic, , f32x4, 4, 2)

struct Kernels {
    void (*normalize)(const float*, float*, float*, size_t, const Dims&, size_t, size_t);
    void (*match)(const float*, const float*, size_t, const Dims&, float*, int64_t*, size_t, size_t);
    void (*copy)(const Row*, const float*, float*, size_t, size_t, size_t);
    size_t rows;  // the match tile's A rows: thread ranges are cut at multiples of it

    // The widest this CPU runs: AVX-512, AVX2 + FMA, else the generic vectors (SSE on x86, NEON on
    // ARM). VITFOLD_NATIVE_ISA=avx2 or generic caps it (the tests run every path on one machine).
    static Kernels pick() {
        int isa = 0;
#if defined(__x86_64__) && defined(__GNUC__)
        isa = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
        const char* cap = std::getenv("VITFOLD_NATIVE_ISA");
        if (cap && std::strcmp(cap, "avx2") == 0) isa = std::min(isa, 1);
        if (cap && std::strcmp(cap, "generic") == 0) isa = 0;
        if (isa == 2) return {avx512_normalize, avx512_match, avx512_copy, 8};
        if (isa == 1) return {avx2_normalize, avx2_match, avx2_copy, 6};
#endif
        return {generic_normalize, generic_match, generic_copy, 4};
    }
};

// This CPU's kernels, picked once per process.
const Kernels& picked_kernels() {
    static const Kernels kernels = Kernels::pick();
    return kernels;
}

// Where one image's output rows come from: rows (Nu + Nb): out[slot] = x[src]; edges (r, in edge order):
// out[slot] += x[src], each merged A row into its B partner's slot.
struct MergePlan {
    std::vector<Row> rows, edges;
};

// One image's matching: keys [H, N, D] -> its MergePlan.
// split(n, grain, fn): runs fn over [0, n), across the backend's threads (one image in the batch) or here.
template <typename Split>
MergePlan plan_image(const Kernels& k, const float* keys, const Dims& s, const Split& split) {
    const size_t Na = s.Na(), Nb = s.Nb(), Nu = Na - s.r, D = s.D;
    const size_t Nbp = (Nb + kPad - 1) / kPad * kPad;
    std::vector<float> unit(s.N * D), bt(D * Nbp, 0.f), best(Na, -INFINITY);
    std::vector<int64_t> partner(Na, 0), order(Na);
    split(s.N, 16, [&](size_t b, size_t e) { k.normalize(keys, unit.data(), bt.data(), Nbp, s, b, e); });
    const size_t i0 = (s.P + 1) / 2;  // protected A tokens keep best -inf and partner 0
    split(Na - i0, k.rows, [&](size_t b, size_t e) {
        k.match(unit.data(), bt.data(), Nbp, s, best.data(), partner.data(), i0 + b, i0 + e);
    });
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t u, int64_t v) { return best[u] > best[v]; });
    std::vector<int64_t> unmerged(order.begin() + s.r, order.end());
    if (s.P) std::sort(unmerged.begin(), unmerged.end());  // prefix tokens back in front, as the reference
    // Output slots of cat([unmerged A, B]): prefix token p (A when even, B when odd) at slot p, then the
    // other unmerged A tokens, then the other B tokens; with P <= 1 the concatenation itself.
    const size_t in_a = (s.P + 1) / 2, in_b = s.P / 2;
    auto slot_a = [&](size_t k) { return k < in_a ? 2 * k : s.P + (k - in_a); };
    auto slot_b = [&](size_t j) { return j < in_b ? 2 * j + 1 : s.P + (Nu - in_a) + (j - in_b); };
    MergePlan plan;
    plan.rows.reserve(Nu + Nb);
    for (size_t u = 0; u < Nu; ++u) plan.rows.push_back({static_cast<size_t>(2 * unmerged[u]), slot_a(u)});
    for (size_t j = 0; j < Nb; ++j) plan.rows.push_back({2 * j + 1, slot_b(j)});
    plan.edges.reserve(s.r);
    for (size_t e = 0; e < s.r; ++e)
        plan.edges.push_back({static_cast<size_t>(2 * order[e]), slot_b(static_cast<size_t>(partner[order[e]]))});
    return plan;
}

// One image: keys [H, N, D], tokens x [N, C] -> out [N - r, C], ToMe's sum merge (merge(x, mode="sum")).
template <typename Split>
void merge_image(const Kernels& k, const float* x, const float* keys, float* out, const Dims& s, const Split& split) {
    const MergePlan plan = plan_image(k, keys, s, split);
    const size_t C = s.C;
    split(plan.rows.size(), 16, [&](size_t b, size_t e) { k.copy(plan.rows.data(), x, out, C, b, e); });
    for (const Row& edge : plan.edges) {  // r rows, here: each B row plus its A rows in edge order
        const float* in = x + edge.src * C;
        float* o = out + edge.slot * C;
        for (size_t c = 0; c < C; ++c) o[c] += in[c];
    }
}

// The size-weighted average's arithmetic (merge_wavg_image) is the graph form's own: each product
// x * size rounded on its own, then added. A fused multiply-add would round once and differ in the last
// bit, so these functions are compiled without contraction (GCC's -ffp-contract=fast would fuse across
// statements where the target has FMA, as AArch64 does).
#if defined(__clang__)
#define VITFOLD_NO_CONTRACT
#define VITFOLD_NO_CONTRACT_BODY _Pragma("clang fp contract(off)")
#elif defined(__GNUC__)
#define VITFOLD_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#define VITFOLD_NO_CONTRACT_BODY
#else
#define VITFOLD_NO_CONTRACT
#define VITFOLD_NO_CONTRACT_BODY
#endif

// Output rows [begin, end) of the weighted merge: rows that take no merge (merged[slot] == 0) get their
// average already, (x * size) / size; the others the product alone, averaged once their edges are in.
VITFOLD_NO_CONTRACT void weigh_rows(const Row* rows, const float* x, const float* size, const char* merged, bool reciprocal,
                                    float* out, float* out_size, size_t C, size_t begin, size_t end) {
    VITFOLD_NO_CONTRACT_BODY
    for (size_t k = begin; k < end; ++k) {
        const float* in = x + rows[k].src * C;
        float* o = out + rows[k].slot * C;
        const float w = size[rows[k].src];
        out_size[rows[k].slot] = w;
        if (merged[rows[k].slot]) {
            for (size_t c = 0; c < C; ++c) o[c] = in[c] * w;
        } else if (reciprocal) {
            const float inverse = 1.f / w;
            for (size_t c = 0; c < C; ++c) {
                const float product = in[c] * w;
                o[c] = product * inverse;
            }
        } else {
            for (size_t c = 0; c < C; ++c) {
                const float product = in[c] * w;
                o[c] = product / w;
            }
        }
    }
}

// The edges in order (each B row's products plus its A rows' products), then each merged row divided by
// its summed size.
VITFOLD_NO_CONTRACT void add_edges_and_average(const MergePlan& plan, const float* x, const float* size, const char* merged,
                                               bool reciprocal, float* out, float* out_size, size_t C, size_t M) {
    VITFOLD_NO_CONTRACT_BODY
    for (const Row& edge : plan.edges) {
        const float* in = x + edge.src * C;
        float* o = out + edge.slot * C;
        const float w = size[edge.src];
        out_size[edge.slot] += w;
        for (size_t c = 0; c < C; ++c) {
            const float product = in[c] * w;
            o[c] += product;
        }
    }
    for (size_t slot = 0; slot < M; ++slot) {
        if (!merged[slot]) continue;
        float* o = out + slot * C;
        const float total = out_size[slot];
        if (reciprocal) {
            const float inverse = 1.f / total;
            for (size_t c = 0; c < C; ++c) o[c] *= inverse;
        } else {
            for (size_t c = 0; c < C; ++c) o[c] /= total;
        }
    }
}

// One image: keys [H, N, D], tokens x [N, C], sizes [N] -> out [N - r, C], out_size [N - r]: ToMe's
// size-weighted average (merge_wavg: merge(cat([x * size, size]), "sum"), then x / size), computed as the
// graph form computes it, so that with the same token choices the outputs are identical bit for bit.
template <typename Split>
void merge_wavg_image(const Kernels& k, const float* x, const float* size, const float* keys, float* out, float* out_size,
                      const Dims& s, bool reciprocal, const Split& split) {
    const MergePlan plan = plan_image(k, keys, s, split);
    const size_t C = s.C, M = s.N - s.r;
    std::vector<char> merged(M, 0);
    for (const Row& edge : plan.edges) merged[edge.slot] = 1;
    split(plan.rows.size(), 16, [&](size_t b, size_t e) {
        weigh_rows(plan.rows.data(), x, size, merged.data(), reciprocal, out, out_size, C, b, e);
    });
    add_edges_and_average(plan, x, size, merged.data(), reciprocal, out, out_size, C, M);
}

}  // namespace
