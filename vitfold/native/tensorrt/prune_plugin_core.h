// GPU-free core of vitfold's TensorRT plugin EViTPrune: attributes, validation, shape inference,
// serialisation, workspace layout, and the per-item steps that the CUDA kernel (prune_kernel.cu) and
// the host reference both run. Pure C++17 like tome_plugin_core.h, whose Status codes, VITFOLD_HD and
// little-endian helpers it shares; prune_plugin.cpp, prune_kernel.cu and tome_plugin_core_capi.cpp
// include it.
//
// EViTPrune(x [B, N, C], attn [B, N]; keep, num_protected, fuse) -> [B, P + keep + fuse, C] is EViT's
// attentive-token selection and inattentive-token fusion (Liang et al., "Not All Patches are What You
// Need", ICLR 2022, Sec. 3; Top-K is the same with fuse = 0, Haurum et al., ICCVW 2023), exactly as
// vitfold/native/openvino/prune_op.cpp computes it and vitfold.reduce.evit._prune defines it. With
// P = num_protected and the scores s = attn[:, P:] (class-token attention averaged over heads):
//   out[:P]       = x[:P]                               the prefix tokens, untouched
//   out[P + i]    = x[P + idx[i]], i < keep             idx: the keep largest s, falling; equal scores
//                                                       in rising index (a stable descending sort)
//   out[P + keep] = sum over j not kept, rising j, of x[P + j] * s[j]      (fuse = 1 only)
// The fused sum starts from 0 and adds, per channel, one rounded product at a time (no FMA): the
// graph form's Mul then ReduceSum over a 0/1 mask in rising order (the kept tokens weigh exactly 0
// there, which adds nothing for finite x), and prune_op.cpp's loop. torch's CPU sum (evit._prune)
// sums in blocks of 16 rows (cascade summation), so it can differ from this in the last bits; the
// kept rows and the prefix rows are copies and always equal.
//
// Ranking: rank[j] = how many scores come before s[j] = #{k : s[k] > s[j] or (s[k] == s[j], k < j)};
// token j is kept iff rank[j] < keep, at output row P + rank[j]. NaN scores (which softmax attention
// never gives) rank above every number, as torch.topk treats them, and among themselves by index, so
// the ranks are always a permutation of [0, N - P) and every output row is written exactly once.
//
// Like the rest of this folder, written without a GPU and without TensorRT's library: the core and its
// host reference are compiled and tested (tests/test_tensorrt_plugin.py); the kernel only compiled.
#ifndef VITFOLD_TRT_PRUNE_PLUGIN_CORE_H
#define VITFOLD_TRT_PRUNE_PLUGIN_CORE_H

#include "tome_plugin_core.h"

namespace vitfold {
namespace trt {
namespace prune {

//! Plugin identity: the ONNX node's op_type (vitfold.native.PRUNE_OP), the parser's default version
//! and namespace, as for ToMeMerge.
constexpr char const* kPluginName = "EViTPrune";
constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "";
//! The PluginField names: the ONNX node's INT attributes, and the versioned byte record.
constexpr char const* kFieldKeep = "keep";
constexpr char const* kFieldProtected = "num_protected";
constexpr char const* kFieldFuse = "fuse";
constexpr char const* kFieldState = "vitfold_state";

struct Attrs {
    int32_t keep = 1;
    int32_t numProtected = 0;
    int32_t fuse = 0;
};

//! The attributes on their own: keep >= 1, num_protected >= 0, fuse 0 or 1 (keep < N - P needs N).
inline Status validateAttrs(Attrs const& a) noexcept {
    if (a.keep < 1) return kBAD_KEEP;
    if (a.numProtected < 0) return kNEGATIVE_PROTECTED;
    if (a.fuse != 0 && a.fuse != 1) return kBAD_FUSE;
    return kOK;
}

//! Output tokens P + keep + fuse: fixed by the attributes, whatever N is.
inline int64_t outputTokens(Attrs const& a) noexcept {
    return static_cast<int64_t>(a.numProtected) + a.keep + a.fuse;
}

//! Every dimension of one call; -1 where not known yet (build time, dynamic shapes).
struct Shape {
    int64_t B = -1, N = -1, C = -1;
    Attrs attrs;
};

//! Checks the attributes and the input dims and fills *out. xDims [B, N, C], attnDims [B, N]; -1 is
//! unknown (checked once known); B and N unknown in x are taken from attn when it knows them.
inline Status inferShape(Attrs const& a, int64_t const* xDims, int32_t xRank, int64_t const* attnDims,
                         int32_t attnRank, Shape* out) noexcept {
    if (Status s = validateAttrs(a); s != kOK) return s;
    if (xRank != 3) return kBAD_X_RANK;
    if (attnRank != 2) return kBAD_ATTN_RANK;
    if (!xDims || !attnDims || !out) return kNULL_ARGUMENT;
    for (int32_t i = 0; i < 3; ++i)
        if (xDims[i] < -1) return kBAD_DIM;
    for (int32_t i = 0; i < 2; ++i)
        if (attnDims[i] < -1) return kBAD_DIM;
    auto differ = [](int64_t u, int64_t v) { return u >= 0 && v >= 0 && u != v; };
    if (differ(xDims[0], attnDims[0])) return kBATCH_MISMATCH;
    if (differ(xDims[1], attnDims[1])) return kTOKEN_MISMATCH;
    Shape s;
    s.B = xDims[0] >= 0 ? xDims[0] : attnDims[0];
    s.N = xDims[1] >= 0 ? xDims[1] : attnDims[1];
    s.C = xDims[2];
    s.attrs = a;
    // keep in 1 .. N - P - 1: at least one token is not kept (and fused, with fuse = 1)
    if (s.N >= 0 && static_cast<int64_t>(a.keep) > s.N - a.numProtected - 1) return kBAD_KEEP;
    if (s.N - a.numProtected > std::numeric_limits<int32_t>::max()) return kOVERFLOW;  // int32 ranks
    *out = s;
    return kOK;
}

inline Status validate(Attrs const& a, int64_t const* xDims, int32_t xRank, int64_t const* attnDims,
                       int32_t attnRank) noexcept {
    Shape unused;
    return inferShape(a, xDims, xRank, attnDims, attnRank, &unused);
}

//! One output dimension: inputs[input].d[axis], or the constant `value` when input < 0. The plugin
//! builds its IExprBuilder expressions from this table: out N = P + keep + fuse is a constant even when
//! N is symbolic.
struct DimExpr {
    int32_t input, axis;
    int64_t value;
};
constexpr int32_t kOutputRank = 3;

//! The output [B, P + keep + fuse, C] as expressions of the inputs, after validating what is known.
inline Status outputDimExprs(Attrs const& a, int64_t const* xDims, int32_t xRank, int64_t const* attnDims,
                             int32_t attnRank, DimExpr out[kOutputRank]) noexcept {
    if (Status s = validate(a, xDims, xRank, attnDims, attnRank); s != kOK) return s;
    out[0] = {0, 0, 0};
    out[1] = {-1, 0, outputTokens(a)};
    out[2] = {0, 2, 0};
    return kOK;
}

//! The output dims as numbers: [B, P + keep + fuse, C], B = -1 (C = -1) when unknown.
inline Status outputDims(Attrs const& a, int64_t const* xDims, int32_t xRank, int64_t const* attnDims,
                         int32_t attnRank, int64_t out[kOutputRank]) noexcept {
    Shape s;
    if (Status st = inferShape(a, xDims, xRank, attnDims, attnRank, &s); st != kOK) return st;
    out[0] = s.B;
    out[1] = outputTokens(a);
    out[2] = s.C;
    return kOK;
}

// ------------------------------------------------------------------------------------- serialisation
// Little-endian, 24 bytes in format version 1:
//   [0, 4) magic "VEVP" | [4, 8) uint32 version = 1 | [8, 12) uint32 payload bytes = 12
//   [12, 16) int32 keep | [16, 20) int32 num_protected | [20, 24) int32 fuse
constexpr uint8_t kMagic[4] = {'V', 'E', 'V', 'P'};
constexpr uint32_t kFormatVersion = 1;
constexpr size_t kHeaderBytes = 12;
constexpr size_t kPayloadBytesV1 = 12;
constexpr size_t kSerializedBytes = kHeaderBytes + kPayloadBytesV1;

//! Writes the attributes into buffer (capacity bytes); *written = kSerializedBytes on success.
inline Status serialize(Attrs const& a, uint8_t* buffer, size_t capacity, size_t* written) noexcept {
    if (!buffer || !written) return kNULL_ARGUMENT;
    if (Status s = validateAttrs(a); s != kOK) return s;
    int32_t const values[] = {a.keep, a.numProtected, a.fuse};
    static_assert(sizeof values == kPayloadBytesV1, "the record's payload is keep, num_protected, fuse");
    return detail::writeRecord(buffer, capacity, written, kMagic, kFormatVersion, values);
}

//! Reads what serialize() wrote; refuses short, foreign (a ToMeMerge record included), other-version
//! or oversized records and attributes that fail validateAttrs. *out is only written on success.
inline Status deserialize(uint8_t const* buffer, size_t size, Attrs* out) noexcept {
    if (!out) return kNULL_ARGUMENT;
    int32_t values[kPayloadBytesV1 / sizeof(int32_t)];
    if (Status s = detail::readRecord(buffer, size, kMagic, kFormatVersion, values); s != kOK) return s;
    Attrs const a{values[0], values[1], values[2]};
    if (Status s = validateAttrs(a); s != kOK) return s;
    *out = a;
    return kOK;
}

// ------------------------------------------------------------------------------ workspace (per image)
//! The kernel's scratch for one image of M = N - P candidate tokens, byte offsets from the image's
//! slice, each array on a kAlign boundary: rank [M] int32 (each candidate's place in the falling
//! order), order [M] int32 (the candidate at each place; only the first keep are written).
struct WorkspaceLayout {
    uint64_t rank, order, perImage;
};

inline bool workspaceLayout(int64_t N, int64_t P, WorkspaceLayout* out) noexcept {
    if (N < 0 || P < 0 || !out) return false;
    uint64_t const m = static_cast<uint64_t>(N > P ? N - P : 0);
    if (m > std::numeric_limits<uint64_t>::max() / 16) return false;
    auto up = [](uint64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; };
    WorkspaceLayout w{};
    w.rank = 0;
    w.order = w.rank + up(m * sizeof(int32_t));
    w.perImage = w.order + up(m * sizeof(int32_t));
    *out = w;
    return true;
}

//! Workspace bytes for B images of N tokens with P protected: B * perImage, or -1 when a dim is
//! unknown or negative or the size overflows. Monotonic in B and N, so the profile's max dims cover
//! every smaller shape.
inline int64_t workspaceBytes(int64_t B, int64_t N, int64_t P) noexcept {
    WorkspaceLayout w;
    if (B < 0 || !workspaceLayout(N, P, &w)) return -1;
    uint64_t const limit = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
    if (w.perImage > limit || (B && w.perImage > limit / static_cast<uint64_t>(B))) return -1;
    return static_cast<int64_t>(w.perImage * static_cast<uint64_t>(B));
}

// ------------------------------------------------------------------ the pruning, one item at a time
// Each function computes one item (a candidate token, an output element, a channel) of one image; the
// kernel runs them in block-stride loops (ranks, __syncthreads(), then copies and fused sums), the host
// reference in plain loops. Same code, same arithmetic, same results.

//! One image's sizes (all known, validated): M = N - P candidates, K = keep of them kept.
struct PruneShape {
    int64_t N, C, P, K;
    int32_t fuse;
    VITFOLD_HD int64_t M() const { return N - P; }
    VITFOLD_HD int64_t outTokens() const { return P + K + fuse; }
};

inline PruneShape pruneShape(Shape const& s) noexcept {
    return PruneShape{s.N, s.C, s.attrs.numProtected, s.attrs.keep, s.attrs.fuse};
}

//! Whether candidate k (score u) comes before candidate j (score v) in the falling, stable order:
//! u > v, or equal scores and k < j. NaN counts as above every number and equal to NaN (a strict
//! total order on (score, index) pairs, so the ranks are a permutation).
VITFOLD_HD bool comesBefore(float u, int64_t k, float v, int64_t j) {
    bool const uNan = u != u, vNan = v != v;
    if (uNan || vNan) return uNan && (!vNan || k < j);
    return u > v || (u == v && k < j);
}

//! Step 1, candidate j: its place in the falling order (how many candidates come before it).
VITFOLD_HD int32_t candidateRank(float const* scores, PruneShape const& s, int64_t j) {
    float const mine = scores[j];
    int32_t before = 0;
    for (int64_t k = 0; k < s.M(); ++k) before += comesBefore(scores[k], k, mine, j) ? 1 : 0;
    return before;
}

//! Step 2, element item of the first (P + keep) output rows: a prefix row is x's own row, row P + i
//! is candidate order[i]'s row.
VITFOLD_HD void copyElement(float const* x, float* out, int32_t const* order, PruneShape const& s, int64_t item) {
    int64_t const t = item / s.C, c = item % s.C;
    int64_t const source = t < s.P ? t : s.P + order[t - s.P];
    out[item] = x[source * s.C + c];
}

//! One rounded product and one rounded sum, never contracted into an FMA (device: the _rn intrinsics,
//! which nvcc never fuses; host: compiled with -ffp-contract=off, CMakeLists.txt).
VITFOLD_HD float addProduct(float acc, float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(acc, __fmul_rn(a, b));
#else
    float const product = a * b;
    return acc + product;
#endif
}

//! Step 3 (fuse = 1), channel c: the fused row, the not-kept candidates (rank >= keep) in rising j,
//! each x[P + j][c] * s[j] rounded, then added to the running sum that starts from 0.
VITFOLD_HD void fuseChannel(float const* x, float const* scores, int32_t const* rank, float* out,
                            PruneShape const& s, int64_t c) {
    float acc = 0.f;
    for (int64_t j = 0; j < s.M(); ++j)
        if (rank[j] >= s.K) acc = addProduct(acc, x[(s.P + j) * s.C + c], scores[j]);
    out[(s.P + s.K) * s.C + c] = acc;
}

//! The whole op on the host, through the steps above in the kernel's order: out [B, P + keep + fuse, C]
//! from x [B, N, C] and attn [B, N]. For tests and as the kernel's spec.
inline Status referencePrune(Shape const& shape, float const* x, float const* attn, float* out) {
    if (!x || !attn || !out) return kNULL_ARGUMENT;
    if (shape.B < 0 || shape.N < 0 || shape.C < 0) return kBAD_DIM;
    if (Status st = validateAttrs(shape.attrs); st != kOK) return st;
    if (shape.attrs.keep > shape.N - shape.attrs.numProtected - 1) return kBAD_KEEP;
    if (shape.N - shape.attrs.numProtected > std::numeric_limits<int32_t>::max()) return kOVERFLOW;
    PruneShape const s = pruneShape(shape);
    std::vector<int32_t> rank(static_cast<size_t>(s.M())), order(static_cast<size_t>(s.M()));
    for (int64_t b = 0; b < shape.B; ++b) {
        float const* xi = x + b * s.N * s.C;
        float const* scores = attn + b * s.N + s.P;
        float* oi = out + b * s.outTokens() * s.C;
        for (int64_t j = 0; j < s.M(); ++j) {
            rank[j] = candidateRank(scores, s, j);
            if (rank[j] < s.K) order[rank[j]] = static_cast<int32_t>(j);
        }
        for (int64_t item = 0; item < (s.P + s.K) * s.C; ++item) copyElement(xi, oi, order.data(), s, item);
        if (s.fuse)
            for (int64_t c = 0; c < s.C; ++c) fuseChannel(xi, scores, rank.data(), oi, s, c);
    }
    return kOK;
}

}  // namespace prune
}  // namespace trt
}  // namespace vitfold

#endif  // VITFOLD_TRT_PRUNE_PLUGIN_CORE_H
