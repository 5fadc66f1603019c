// GPU-free core of vitfold's TensorRT plugin ToMeMerge: attributes, validation, shape inference,
// serialisation, workspace layout, and the per-item merge steps that the CUDA kernel and a host
// reference both run. Pure C++17: no TensorRT and no CUDA include, so it compiles (and is tested)
// on any machine; tome_plugin.cpp, tome_kernel.cu and tome_plugin_core_capi.cpp all include it. Its
// Status codes, VITFOLD_HD, little-endian record helpers and kAlign also serve the second plugin's core,
// prune_plugin_core.h (EViTPrune).
//
// ToMeMerge(x [B, N, C], keys [B, H, N, D] or metric [B, N, D]; r, num_protected) -> [B, N - r, C]
// is ToMe's bipartite soft matching with a sum merge (Bolya et al., "Token Merging: Your ViT But
// Faster", ICLR 2023, Sec. 3), exactly as vitfold/native/openvino/tome_op.cpp computes it and as
// vitfold.reduce.matching.bipartite_soft_matching(metric, r, num_protected) + merge(x, "sum") define it:
//   * metric = keys averaged over heads (summed in head order, divided by H), rows divided by their
//     L2 norm;
//   * A = even tokens (2i), B = odd tokens (2j + 1); the first num_protected tokens (prefix tokens)
//     never merge: their scores are -inf, as matching.py's mask;
//   * each A token's best B partner by cosine score (ties: the lower j);
//   * the r A tokens with the strongest edges (stable order by falling score: ties keep the lower i)
//     are summed into their B partners, each B row plus its A rows in edge order;
//   * output = cat([unmerged A, B]): the unmerged A tokens by position when there are prefix
//     tokens, else by falling edge score; with two or more prefix tokens, each prefix token goes
//     back to its own position (matching._prefix_order, tome_op.cpp's slot_a / slot_b);
//   * r == 0 is the identity (matching.py returns identity closures; the tokens keep their order).
// The size weighting around the site (x * size, / size) stays in the graph, as for OpenVINO.
//
// Floating point: the dot products and the sum of squares are sequential fmaf chains over d; the
// head mean, the norm (sqrtf) and the division are IEEE single precision. The host reference below
// and the CUDA kernel run the same functions, so they agree bit for bit when nvcc keeps IEEE division
// and square root (no --use_fast_math; CMakeLists.txt sets that). Against the graph form or OpenVINO
// the scores are summed in another order, so an edge within float rounding of the r-th may rank
// differently: a build must compare the fused op with the graph form, as it does for OpenVINO.
//
// What could not be done where this was written: there was no GPU and no TensorRT library (only
// TensorRT's public headers, from github.com/NVIDIA/TensorRT, and a CUDA 13.0 toolkit). This header,
// its C ABI and the host reference were compiled and run (tests/test_tensorrt_plugin.py);
// tome_plugin.cpp and tome_kernel.cu were compiled (g++ against the TensorRT 10.3 / 10.16 / 11.1
// headers, nvcc 13.0) and the linked plugin was driven through TensorRT's interfaces by
// plugin_host_check.cpp; but the kernel has never run on a GPU and TensorRT has never loaded the plugin.
#ifndef VITFOLD_TRT_TOME_PLUGIN_CORE_H
#define VITFOLD_TRT_TOME_PLUGIN_CORE_H

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

// Functions the CUDA kernel shares with the host reference: __host__ __device__ under nvcc.
#if defined(__CUDACC__)
#define VITFOLD_HD __host__ __device__ inline
#else
#define VITFOLD_HD inline
#endif

namespace vitfold {
namespace trt {

//! Plugin identity, as the ONNX parser looks it up: name = the node's op_type; version and namespace
//! come from the optional node attributes plugin_version (default "1") and plugin_namespace (default
//! ""), which vitfold's fused node does not carry (see tome_plugin.cpp).
constexpr char const* kPluginName = "ToMeMerge";
constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "";
//! The PluginField names: the ONNX node's attribute names, and what the engine serialises.
constexpr char const* kFieldR = "r";
constexpr char const* kFieldProtected = "num_protected";
constexpr char const* kFieldState = "vitfold_state";  //!< the versioned byte form (serialize())

//! What a check returned. 0 is success; the C ABI returns these values as int32.
enum Status : int32_t {
    kOK = 0,
    kNEGATIVE_R = 1,          //!< r < 0
    kNEGATIVE_PROTECTED = 2,  //!< num_protected < 0
    kR_TOO_LARGE = 3,         //!< r > max_merge(N, num_protected) = (N - num_protected) / 2
    kBAD_X_RANK = 4,          //!< tokens not [B, N, C]
    kBAD_KEYS_RANK = 5,       //!< keys neither [B, H, N, D] nor [B, N, D]
    kBATCH_MISMATCH = 6,      //!< tokens and keys differ in B
    kTOKEN_MISMATCH = 7,      //!< tokens and keys differ in N
    kBAD_DIM = 8,             //!< a dimension below -1, or a known H or D of 0
    kNULL_ARGUMENT = 9,       //!< a required pointer is null
    kBUFFER_TOO_SMALL = 10,   //!< serialize(): the buffer cannot hold the serialised attributes
    kTRUNCATED = 11,          //!< deserialize(): fewer bytes than the header or its payload
    kBAD_MAGIC = 12,          //!< deserialize(): not this op's attribute record
    kBAD_VERSION = 13,        //!< deserialize(): a format version this build does not read
    kBAD_PAYLOAD_SIZE = 14,   //!< deserialize(): payload length or total size not the version's
    kOVERFLOW = 15,           //!< a size does not fit in 64 bits (EViTPrune: N - P not in 32 bits)
    // EViTPrune (prune_plugin_core.h) only:
    kBAD_KEEP = 16,           //!< keep not in 1 .. N - num_protected - 1
    kBAD_FUSE = 17,           //!< fuse neither 0 nor 1
    kBAD_ATTN_RANK = 18,      //!< the class attention not [B, N]
};

inline char const* statusMessage(int32_t status) noexcept {
    switch (status) {
    case kOK: return "ok";
    case kNEGATIVE_R: return "r must be >= 0";
    case kNEGATIVE_PROTECTED: return "num_protected must be >= 0";
    case kR_TOO_LARGE: return "r must be <= (N - num_protected) / 2 (matching.max_merge)";
    case kBAD_X_RANK: return "tokens must be [B, N, C] (rank 3)";
    case kBAD_KEYS_RANK: return "keys must be [B, H, N, D] (rank 4) or a metric [B, N, D] (rank 3)";
    case kBATCH_MISMATCH: return "tokens and keys (EViTPrune: attention) differ in B";
    case kTOKEN_MISMATCH: return "tokens and keys (EViTPrune: attention) differ in N";
    case kBAD_DIM: return "dimensions must be >= 0 (-1: unknown), H and D >= 1";
    case kNULL_ARGUMENT: return "a required pointer is null";
    case kBUFFER_TOO_SMALL: return "the buffer is too small for the serialised attributes";
    case kTRUNCATED: return "the serialised attributes are truncated";
    case kBAD_MAGIC: return "not a serialised attribute record of this op (ToMeMerge: VTMM, EViTPrune: VEVP)";
    case kBAD_VERSION: return "serialised by an unknown format version of this op";
    case kBAD_PAYLOAD_SIZE: return "the serialised attributes have the wrong size for their version";
    case kOVERFLOW: return "a size overflows 64 bits";
    case kBAD_KEEP: return "keep must be in 1 .. N - num_protected - 1";
    case kBAD_FUSE: return "fuse must be 0 or 1";
    case kBAD_ATTN_RANK: return "the class attention must be [B, N] (rank 2)";
    default: return "unknown status";
    }
}

//! The node's attributes (the ONNX parser hands ONNX INT attributes over as int32 PluginFields).
struct Attrs {
    int32_t r = 0;
    int32_t numProtected = 0;
};

//! r and num_protected on their own: both >= 0.
inline Status validateAttrs(Attrs const& a) noexcept {
    if (a.r < 0) return kNEGATIVE_R;
    if (a.numProtected < 0) return kNEGATIVE_PROTECTED;
    return kOK;
}

//! Largest r bipartite matching takes on n tokens with p protected ones (matching.max_merge). It
//! never exceeds the mergeable A tokens ((n + 1) / 2 - (p + 1) / 2), and r <= it leaves a B partner.
inline int64_t maxMerge(int64_t n, int64_t p) noexcept { return n > p ? (n - p) / 2 : 0; }

//! Every dimension of one call; -1 where a dimension is not known yet (build time, dynamic shapes).
struct Shape {
    int64_t B = -1, N = -1, C = -1, H = -1, D = -1;
    int32_t r = 0, P = 0;
};

//! Checks the attributes and the input dims (-1: unknown, checked once known) and fills *out.
//! xDims: [B, N, C]; keyDims: [B, H, N, D] or [B, N, D] (H = 1).
inline Status inferShape(Attrs const& a, int64_t const* xDims, int32_t xRank, int64_t const* keyDims, int32_t keyRank,
                         Shape* out) noexcept {
    if (Status s = validateAttrs(a); s != kOK) return s;
    if (xRank != 3) return kBAD_X_RANK;
    if (keyRank != 3 && keyRank != 4) return kBAD_KEYS_RANK;
    if (!xDims || !keyDims || !out) return kNULL_ARGUMENT;
    for (int32_t i = 0; i < xRank; ++i)
        if (xDims[i] < -1) return kBAD_DIM;
    for (int32_t i = 0; i < keyRank; ++i)
        if (keyDims[i] < -1) return kBAD_DIM;
    Shape s;
    s.B = xDims[0];
    s.N = xDims[1];
    s.C = xDims[2];
    s.H = keyRank == 4 ? keyDims[1] : 1;
    s.D = keyDims[keyRank - 1];
    s.r = a.r;
    s.P = a.numProtected;
    if (s.H == 0 || s.D == 0) return kBAD_DIM;
    auto differ = [](int64_t u, int64_t v) { return u >= 0 && v >= 0 && u != v; };
    if (differ(keyDims[0], s.B)) return kBATCH_MISMATCH;
    if (differ(keyDims[keyRank - 2], s.N)) return kTOKEN_MISMATCH;
    if (s.N < 0 && keyDims[keyRank - 2] >= 0) s.N = keyDims[keyRank - 2];
    if (s.B < 0 && keyDims[0] >= 0) s.B = keyDims[0];
    if (s.N >= 0 && a.r > maxMerge(s.N, a.numProtected)) return kR_TOO_LARGE;
    *out = s;
    return kOK;
}

inline Status validate(Attrs const& a, int64_t const* xDims, int32_t xRank, int64_t const* keyDims,
                       int32_t keyRank) noexcept {
    Shape unused;
    return inferShape(a, xDims, xRank, keyDims, keyRank, &unused);
}

//! One output dimension as an expression of the inputs: inputs[input].d[axis] - minus. The plugin
//! builds its IExprBuilder expressions from this table, so symbolic N stays symbolic: out N = N - r.
struct DimExpr {
    int32_t input, axis;
    int64_t minus;
};
constexpr int32_t kOutputRank = 3;

//! The output [B, N - r, C] as expressions of the inputs, after validating what is known.
inline Status outputDimExprs(Attrs const& a, int64_t const* xDims, int32_t xRank, int64_t const* keyDims,
                             int32_t keyRank, DimExpr out[kOutputRank]) noexcept {
    if (Status s = validate(a, xDims, xRank, keyDims, keyRank); s != kOK) return s;
    out[0] = {0, 0, 0};
    out[1] = {0, 1, a.r};
    out[2] = {0, 2, 0};
    return kOK;
}

//! The output dims as numbers (-1 where the input dim is unknown): [B, N - r, C].
inline Status outputDims(Attrs const& a, int64_t const* xDims, int32_t xRank, int64_t const* keyDims, int32_t keyRank,
                         int64_t out[kOutputRank]) noexcept {
    DimExpr e[kOutputRank];
    if (Status s = outputDimExprs(a, xDims, xRank, keyDims, keyRank, e); s != kOK) return s;
    for (int32_t i = 0; i < kOutputRank; ++i) {
        int64_t const v = xDims[e[i].axis];  // every output dim comes from the tokens (input 0)
        out[i] = v < 0 ? -1 : v - e[i].minus;
    }
    return kOK;
}

// ------------------------------------------------------------------------------------- serialisation
// Little-endian, 20 bytes in format version 1:
//   [0, 4) magic "VTMM" | [4, 8) uint32 version = 1 | [8, 12) uint32 payload bytes = 8
//   [12, 16) int32 r    | [16, 20) int32 num_protected
constexpr uint8_t kMagic[4] = {'V', 'T', 'M', 'M'};
constexpr uint32_t kFormatVersion = 1;
constexpr size_t kHeaderBytes = 12;
constexpr size_t kPayloadBytesV1 = 8;
constexpr size_t kSerializedBytes = kHeaderBytes + kPayloadBytesV1;

namespace detail {
inline void putU32(uint8_t* p, uint32_t v) noexcept {
    for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline uint32_t getU32(uint8_t const* p) noexcept {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
    return v;
}

//! Both cores' record: magic | uint32 version | uint32 payload bytes (4 N) | N int32 values, written into
//! buffer (non-null, capacity bytes); *written = kHeaderBytes + 4 N on success.
template <size_t N>
Status writeRecord(uint8_t* buffer, size_t capacity, size_t* written, uint8_t const (&magic)[4], uint32_t version,
                   int32_t const (&values)[N]) noexcept {
    if (capacity < kHeaderBytes + 4 * N) return kBUFFER_TOO_SMALL;
    std::memcpy(buffer, magic, 4);
    putU32(buffer + 4, version);
    putU32(buffer + 8, static_cast<uint32_t>(4 * N));
    for (size_t i = 0; i < N; ++i) putU32(buffer + kHeaderBytes + 4 * i, static_cast<uint32_t>(values[i]));
    *written = kHeaderBytes + 4 * N;
    return kOK;
}

//! The N values of a record writeRecord wrote; refuses short, foreign, other-version or oversized
//! records. values is only written on success.
template <size_t N>
Status readRecord(uint8_t const* buffer, size_t size, uint8_t const (&magic)[4], uint32_t version,
                  int32_t (&values)[N]) noexcept {
    if (!buffer && size) return kNULL_ARGUMENT;
    if (size < kHeaderBytes) return kTRUNCATED;
    if (std::memcmp(buffer, magic, 4) != 0) return kBAD_MAGIC;
    if (getU32(buffer + 4) != version) return kBAD_VERSION;
    uint32_t const payload = getU32(buffer + 8);
    if (payload != 4 * N) return kBAD_PAYLOAD_SIZE;
    if (size < kHeaderBytes + payload) return kTRUNCATED;
    if (size != kHeaderBytes + payload) return kBAD_PAYLOAD_SIZE;
    for (size_t i = 0; i < N; ++i) values[i] = static_cast<int32_t>(getU32(buffer + kHeaderBytes + 4 * i));
    return kOK;
}
}  // namespace detail

//! Writes the attributes into buffer (capacity bytes); *written = kSerializedBytes on success.
inline Status serialize(Attrs const& a, uint8_t* buffer, size_t capacity, size_t* written) noexcept {
    if (!buffer || !written) return kNULL_ARGUMENT;
    if (Status s = validateAttrs(a); s != kOK) return s;
    int32_t const values[] = {a.r, a.numProtected};
    static_assert(sizeof values == kPayloadBytesV1, "the record's payload is r, num_protected");
    return detail::writeRecord(buffer, capacity, written, kMagic, kFormatVersion, values);
}

//! Reads what serialize() wrote; rejects short, foreign, other-version or oversized records, and
//! attributes that fail validateAttrs. *out is only written on success.
inline Status deserialize(uint8_t const* buffer, size_t size, Attrs* out) noexcept {
    if (!out) return kNULL_ARGUMENT;
    int32_t values[kPayloadBytesV1 / sizeof(int32_t)];
    if (Status s = detail::readRecord(buffer, size, kMagic, kFormatVersion, values); s != kOK) return s;
    Attrs const a{values[0], values[1]};
    if (Status s = validateAttrs(a); s != kOK) return s;
    *out = a;
    return kOK;
}

// ------------------------------------------------------------------------------ workspace (per image)
//! The kernel's scratch for one image, byte offsets from the image's slice; every array starts on a
//! kAlign boundary. unit: normalised metric [N, D] float; best: each A token's best score [Na] float;
//! partner: its B partner [Na] int32; rank: its edge rank [Na] int32; order: A token at each rank
//! [Na] int32; aslot: output row of each A token, -1 when merged [Na] int64.
struct WorkspaceLayout {
    uint64_t unit, best, partner, rank, order, aslot, perImage;
};
constexpr uint64_t kAlign = 256;

inline bool workspaceLayout(int64_t N, int64_t D, WorkspaceLayout* out) noexcept {
    if (N < 0 || D < 1 || !out) return false;
    uint64_t const kMax = std::numeric_limits<uint64_t>::max() / 4;
    uint64_t const n = static_cast<uint64_t>(N), d = static_cast<uint64_t>(D), na = (n + 1) / 2;
    if (n > kMax || d > kMax / (n ? n : 1) / 8) return false;
    auto up = [](uint64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; };
    WorkspaceLayout w{};
    w.unit = 0;
    w.best = w.unit + up(n * d * sizeof(float));
    w.partner = w.best + up(na * sizeof(float));
    w.rank = w.partner + up(na * sizeof(int32_t));
    w.order = w.rank + up(na * sizeof(int32_t));
    w.aslot = w.order + up(na * sizeof(int32_t));
    w.perImage = w.aslot + up(na * sizeof(int64_t));
    *out = w;
    return true;
}

//! Workspace bytes for B images of N tokens with D-wide metrics: B * perImage, or -1 when a dim is
//! unknown / invalid or the size overflows. Monotonic in B, N and D, so the profile's max dims cover
//! every smaller shape (IPluginV3OneBuild::getWorkspaceSize asks for that).
inline int64_t workspaceBytes(int64_t B, int64_t N, int64_t D) noexcept {
    WorkspaceLayout w;
    if (B < 0 || !workspaceLayout(N, D, &w)) return -1;
    uint64_t const limit = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
    if (B && w.perImage > limit / static_cast<uint64_t>(B)) return -1;
    return static_cast<int64_t>(w.perImage * static_cast<uint64_t>(B));
}

// --------------------------------------------------------------- the merge, one item at a time
// Each function below computes one item (a token, an A token, an element, a channel) of one image;
// the CUDA kernel runs them in block-stride loops with a __syncthreads() between the steps, the host
// reference in plain loops. Same code, same arithmetic, same results.

//! One image's sizes (all known). inA / inB: prefix tokens in A / B; i0 / j0: the first unprotected
//! A / B token.
struct MergeShape {
    int64_t N, C, H, D, r, P;
    VITFOLD_HD int64_t Na() const { return (N + 1) / 2; }
    VITFOLD_HD int64_t Nb() const { return N / 2; }
    VITFOLD_HD int64_t Nu() const { return Na() - r; }
    VITFOLD_HD int64_t inA() const { return (P + 1) / 2; }
    VITFOLD_HD int64_t inB() const { return P / 2; }
};

inline MergeShape mergeShape(Shape const& s) noexcept { return MergeShape{s.N, s.C, s.H, s.D, s.r, s.P}; }

//! Output row of the u-th unmerged A token: prefix A tokens (u < inA: even positions) back at their
//! own position 2u, the others after the P prefix rows. With P <= 1 this is just u.
VITFOLD_HD int64_t slotA(MergeShape const& s, int64_t u) { return u < s.inA() ? 2 * u : s.P + (u - s.inA()); }

//! Output row of B token j: prefix B tokens at 2j + 1, the others after all unmerged A tokens.
VITFOLD_HD int64_t slotB(MergeShape const& s, int64_t j) {
    return j < s.inB() ? 2 * j + 1 : s.P + (s.Nu() - s.inA()) + (j - s.inB());
}

//! Step 1, token i: unit[i] = mean over heads of keys[:, i] (summed in head order, then / H), divided
//! by its L2 norm (a sequential fmaf sum of squares, then sqrtf).
VITFOLD_HD void normalizeToken(float const* keys, float* unit, MergeShape const& s, int64_t i) {
    float* row = unit + i * s.D;
    float const* head0 = keys + i * s.D;
    for (int64_t d = 0; d < s.D; ++d) row[d] = head0[d];
    if (s.H > 1) {
        for (int64_t h = 1; h < s.H; ++h) {
            float const* head = keys + (h * s.N + i) * s.D;
            for (int64_t d = 0; d < s.D; ++d) row[d] = row[d] + head[d];
        }
        float const heads = static_cast<float>(s.H);
        for (int64_t d = 0; d < s.D; ++d) row[d] = row[d] / heads;
    }
    float sq = 0.f;
    for (int64_t d = 0; d < s.D; ++d) sq = fmaf(row[d], row[d], sq);
    float const norm = sqrtf(sq);
    for (int64_t d = 0; d < s.D; ++d) row[d] = row[d] / norm;
}

//! Step 2, A token i: its best B partner. Scores are sequential fmaf dot products of unit rows; a
//! later j wins only with a strictly larger score, so ties keep the lower j. Protected A tokens
//! (2i < P) and protected B tokens (2j + 1 < P) take no part: a protected A token keeps best = -inf
//! and partner 0, as tome_op.cpp (matching.py's -inf mask gives the same ranks and choices).
VITFOLD_HD void matchToken(float const* unit, MergeShape const& s, int64_t i, float* best, int32_t* partner) {
    float top = -INFINITY;
    int32_t arg = 0;
    if (2 * i >= s.P) {
        float const* a = unit + 2 * i * s.D;
        for (int64_t j = s.P / 2; j < s.Nb(); ++j) {
            float const* b = unit + (2 * j + 1) * s.D;
            float score = 0.f;
            for (int64_t d = 0; d < s.D; ++d) score = fmaf(a[d], b[d], score);
            if (score > top) {
                top = score;
                arg = static_cast<int32_t>(j);
            }
        }
    }
    best[i] = top;
    partner[i] = arg;
}

//! Step 3, A token i: its position when the A tokens are sorted by falling best score, stably (ties:
//! lower i first) = how many A tokens come before it. Scores are never NaN (step 2 only takes scores
//! above -inf), so the ranks are a permutation of [0, Na).
VITFOLD_HD int32_t edgeRank(float const* best, MergeShape const& s, int64_t i) {
    float const mine = best[i];
    int32_t before = 0;
    for (int64_t k = 0; k < s.Na(); ++k)
        before += (best[k] > mine || (best[k] == mine && k < i)) ? 1 : 0;
    return before;
}

//! Step 4, A token i: its output row, or -1 when it is merged (rank < r). The unmerged A tokens come
//! by falling score (rank - r) without prefix tokens, else by position (how many unmerged A tokens
//! precede it), as matching.py sorts unm_idx when num_protected > 0.
VITFOLD_HD int64_t unmergedSlot(int32_t const* rank, MergeShape const& s, int64_t i) {
    if (rank[i] < s.r) return -1;
    if (s.P == 0) return slotA(s, rank[i] - s.r);
    int64_t u = 0;
    for (int64_t k = 0; k < i; ++k) u += rank[k] >= s.r ? 1 : 0;
    return slotA(s, u);
}

//! Step 5, element (token t, channel c) of x: copied to its output row unless t is a merged A token.
VITFOLD_HD void copyElement(float const* x, float* out, int64_t const* aslot, MergeShape const& s, int64_t item) {
    int64_t const t = item / s.C, c = item % s.C;
    int64_t const row = t % 2 ? slotB(s, t / 2) : aslot[t / 2];
    if (row >= 0) out[row * s.C + c] = x[item];
}

//! Step 6, channel c: each merged A token (in edge order: rank 0, 1, ..., r - 1) added to its B
//! partner's row, so each B row is (x_b + x_a1) + x_a2 ... as the graph form's ScatterElements add.
VITFOLD_HD void accumulateChannel(float const* x, float* out, int32_t const* order, int32_t const* partner,
                                  MergeShape const& s, int64_t c) {
    for (int64_t e = 0; e < s.r; ++e) {
        int64_t const i = order[e];
        float* o = out + slotB(s, partner[i]) * s.C + c;
        *o = *o + x[2 * i * s.C + c];
    }
}

//! The whole op on the host, through the steps above in the kernel's order: out [B, N - r, C] from
//! x [B, N, C] and keys [B, H, N, D] (H = 1 for a metric). For tests and as the kernel's spec.
inline Status referenceMerge(Shape const& shape, float const* x, float const* keys, float* out) {
    if (!x || !keys || !out) return kNULL_ARGUMENT;
    if (shape.B < 0 || shape.N < 0 || shape.C < 0 || shape.H < 1 || shape.D < 1) return kBAD_DIM;
    if (shape.r < 0) return kNEGATIVE_R;
    if (shape.P < 0) return kNEGATIVE_PROTECTED;
    if (shape.r > maxMerge(shape.N, shape.P)) return kR_TOO_LARGE;
    MergeShape const s = mergeShape(shape);
    int64_t const inImage = s.N * s.C, outImage = (s.N - s.r) * s.C, keyImage = s.H * s.N * s.D;
    if (s.r == 0) {
        std::memcpy(out, x, static_cast<size_t>(shape.B * inImage) * sizeof(float));
        return kOK;
    }
    std::vector<float> unit(static_cast<size_t>(s.N * s.D)), best(static_cast<size_t>(s.Na()));
    std::vector<int32_t> partner(best.size()), rank(best.size()), order(best.size());
    std::vector<int64_t> aslot(best.size());
    for (int64_t b = 0; b < shape.B; ++b) {
        float const* xi = x + b * inImage;
        float* oi = out + b * outImage;
        for (int64_t i = 0; i < s.N; ++i) normalizeToken(keys + b * keyImage, unit.data(), s, i);
        for (int64_t i = 0; i < s.Na(); ++i) matchToken(unit.data(), s, i, best.data(), partner.data());
        for (int64_t i = 0; i < s.Na(); ++i) {
            rank[i] = edgeRank(best.data(), s, i);
            order[rank[i]] = static_cast<int32_t>(i);
        }
        for (int64_t i = 0; i < s.Na(); ++i) aslot[i] = unmergedSlot(rank.data(), s, i);
        for (int64_t item = 0; item < inImage; ++item) copyElement(xi, oi, aslot.data(), s, item);
        for (int64_t c = 0; c < s.C; ++c) accumulateChannel(xi, oi, order.data(), partner.data(), s, c);
    }
    return kOK;
}

}  // namespace trt
}  // namespace vitfold

#endif  // VITFOLD_TRT_TOME_PLUGIN_CORE_H
