// vitfold's TensorRT plugin EViTPrune (TensorRT 10 IPluginV3 API): the fused EViT / Top-K reduction site
//
//     vitfold.EViTPrune(x [B, N, C], attn [B, N]; keep, num_protected, fuse) -> [B, P + keep + fuse, C]
//
// that vitfold.passes.fuse_sites writes for --method evit and topk: the prefix tokens, the keep tokens
// with the highest class attention (falling; ties by rising index), and with fuse = 1 the others'
// attention-weighted sum (Liang et al., ICLR 2022, Sec. 3; Top-K: Haurum et al., ICCVW 2023), exactly as
// vitfold/native/openvino/prune_op.cpp and vitfold.reduce.evit._prune. Shape, validation, serialisation
// and workspace logic are prune_plugin_core.h (GPU-free, tested through its C ABI); the arithmetic is
// the core's step functions, run on the GPU by prune_kernel.cu.
//
// It lives in the same library as ToMeMerge (tome_plugin.cpp, whose header comment says how TensorRT
// loads the library and how the ONNX parser maps a node to a plugin: name = op_type "EViTPrune",
// version "1", namespace "", fields = the node's INT attributes keep, num_protected, fuse as kINT32);
// getCreators there lists evitPruneCreator(). The IPluginV3 plumbing both plugins share is
// plugin::Plugin / plugin::Creator in plugin_common.h; this file gives them EViTPruneOp, what is
// EViTPrune's own. Written without a GPU and without TensorRT's library: it compiles against the
// TensorRT headers and plugin_host_check.cpp drives it through TensorRT's interfaces on the host;
// TensorRT has never loaded it and its kernel has never run.
#include "plugin_common.h"
#include "prune_kernel.h"
#include "prune_plugin_core.h"

#include <NvInferRuntime.h>

#include <cstddef>
#include <cstdint>

namespace vitfold {
namespace trt {
namespace {

using nvinfer1::Dims;
using nvinfer1::DimsExprs;
using nvinfer1::IDimensionExpr;

//! What is EViTPrune's own; plugin::Plugin and plugin::Creator (plugin_common.h) do the rest.
struct EViTPruneOp {
    using Attrs = prune::Attrs;
    using Shape = prune::Shape;
    using DimExpr = prune::DimExpr;
    static constexpr char const* kName = prune::kPluginName;
    static constexpr char const* kVersion = prune::kPluginVersion;
    static constexpr char const* kNamespace = prune::kPluginNamespace;
    //! keep, num_protected and fuse: the node's INT attributes (all required), serialised as kINT32 fields
    //! too, next to the core's versioned byte record ("VEVP").
    static constexpr plugin::IntField<Attrs> kIntFields[] = {{prune::kFieldKeep, &Attrs::keep},
                                                             {prune::kFieldProtected, &Attrs::numProtected},
                                                             {prune::kFieldFuse, &Attrs::fuse}};
    static constexpr char const* kFieldState = prune::kFieldState;
    static constexpr size_t kSerializedBytes = prune::kSerializedBytes;
    static constexpr int32_t kOutputRank = prune::kOutputRank;
    static constexpr auto validateAttrs = &prune::validateAttrs;
    static constexpr auto serialize = &prune::serialize;
    static constexpr auto deserialize = &prune::deserialize;
    static constexpr auto outputDimExprs = &prune::outputDimExprs;
    static constexpr auto inferShape = &prune::inferShape;  //!< of (tokens, attention); -1 dims stay unknown
    static constexpr Status kBadSecondRank = kBAD_ATTN_RANK;
    static constexpr char const* kSecondInput = "class attention";
    static constexpr char const* kOutputText = "[B, num_protected + keep + fuse, C]";

    // Output [B, P + keep + fuse, C]: B and C are the tokens' own expressions, the token count a constant
    // (it does not depend on N, so a dynamic N gives a static output N). getOutputShapes also validates
    // keep <= N - P - 1 and that B and N agree between the inputs where they are build-time constants.
    static IDimensionExpr const* dimExpr(DimExpr const& e, DimsExprs const* inputs,
                                         nvinfer1::IExprBuilder& exprBuilder) noexcept {
        return e.input < 0 ? exprBuilder.constant(e.value) : inputs[e.input].d[e.axis];
    }

    static void expectedOutput(Attrs const& attrs, Shape const& s, int64_t out[kOutputRank]) noexcept {
        out[0] = s.B;
        out[1] = prune::outputTokens(attrs);
        out[2] = s.C;
    }

    // Scratch for the profile's largest shape (the core's layout grows with B and N); configurePlugin
    // checks that the profile's smallest N still leaves a token out (keep <= N - P - 1).
    static int64_t maxWorkspace(Attrs const& attrs, Dims const& x, Dims const& /*attn*/) noexcept {
        if (x.nbDims != 3) return -1;
        return prune::workspaceBytes(x.d[0], x.d[1], attrs.numProtected);
    }

    static bool dimsKnown(Shape const& s) noexcept { return s.B >= 0 && s.N >= 0 && s.C >= 0; }
    static int64_t workspaceFor(Attrs const& attrs, Shape const& s) noexcept {
        return prune::workspaceBytes(s.B, s.N, attrs.numProtected);
    }

    static int32_t launch(Attrs const& attrs, Shape const& s, void const* const* inputs, void* const* outputs,
                          void* workspace, size_t workspaceSize, cudaStream_t stream) noexcept {
        PruneLaunch p{};
        p.x = static_cast<float const*>(inputs[0]);
        p.attn = static_cast<float const*>(inputs[1]);
        p.out = static_cast<float*>(outputs[0]);
        p.workspace = workspace;
        p.workspaceSize = workspaceSize;
        p.B = s.B;
        p.N = s.N;
        p.C = s.C;
        p.keep = attrs.keep;
        p.numProtected = attrs.numProtected;
        p.fuse = attrs.fuse;
        return launchEViTPrune(p, stream);
    }
};

}  // namespace

nvinfer1::IPluginCreatorInterface* plugin::evitPruneCreator() noexcept {
    static plugin::Creator<EViTPruneOp> creator;
    return &creator;
}

}  // namespace trt
}  // namespace vitfold
