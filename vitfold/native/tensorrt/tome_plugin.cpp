// vitfold's TensorRT plugin ToMeMerge (TensorRT 10 IPluginV3 API): the fused ToMe reduction site
//
//     vitfold.ToMeMerge(x [B, N, C], keys [B, H, N, D] or metric [B, N, D]; r, num_protected) -> [B, N - r, C]
//
// that vitfold.passes.fuse_tome writes, i.e. ToMe's bipartite soft matching with a sum merge (Bolya et
// al., "Token Merging: Your ViT But Faster", ICLR 2023, Sec. 3), with the same token choices and sums as
// vitfold/native/openvino/tome_op.cpp (the OpenVINO extension) and vitfold.reduce.matching. All shape,
// validation, serialisation and workspace logic is tome_plugin_core.h (GPU-free, unit-tested through its
// C ABI); the arithmetic is the core's step functions, run on the GPU by tome_kernel.cu.
//
// Build: CMakeLists.txt (nvcc + TensorRT headers; nothing links against libnvinfer: the plugin only
// implements TensorRT's interfaces). Where this was written there was no GPU and no TensorRT library:
// this file compiles without warnings (g++ -std=c++17 -Wall -Wextra) against the TensorRT 10.3, 10.16
// and 11.1 headers (NVIDIA/TensorRT include/), the library links (with tome_kernel.cu, nvcc 13.0), and
// plugin_host_check.cpp drives it through TensorRT's interfaces on the host; TensorRT itself has never
// loaded it and its kernel has never run.
//
// The library also holds the second fused op, EViTPrune (prune_plugin.cpp, same structure). The IPluginV3
// plumbing both share (capabilities, identity, formats, the shape and profile checks, serialised fields,
// createPlugin's field parsing) is plugin::Plugin / plugin::Creator in plugin_common.h; this file gives
// them ToMeMergeOp, what is ToMeMerge's own. getCreators at the end of this file lists both creators.
//
// How TensorRT finds it. The library exports the TensorRT 10 plugin-library entry points
//     extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
//     extern "C" void setLoggerFinder(ILoggerFinder* finder);
// (signatures as NVIDIA/TensorRT plugin/common/vfcCommon.h, v10.3.0, declares them; neither is in the
// public include/ headers) and deliberately no REGISTER_TENSORRT_PLUGIN static registrar:
// IPluginRegistry::loadLibrary "will fail and return nullptr if any of the plugins are already
// registered" (include/NvInferRuntimeCommon.h, 10.3), and vitfold.runtimes.tensorrt.load_plugins both
// dlopens a library and, when it exports getCreators, calls trt.get_plugin_registry().load_library on
// it, so a static registrar would make that second step fail. (REGISTER_TENSORRT_PLUGIN would also call
// getPluginRegistry(), i.e. link against libnvinfer.)
//
// How the ONNX parser maps the node to this plugin (onnx/onnx-tensorrt, branch 10.1-GA; the same code
// in the later onnxOpImporters.cpp / importerUtils.cpp the search index holds):
//   * ModelImporter.cpp parseNode: dispatch is on node.op_type() alone; an op_type with no importer and
//     no local function goes to "FallbackPluginImporter". The node's domain ("vitfold") is not looked
//     at; importModel only records opset_import domains (addOpset). Newer parsers first try the plugin
//     registry when kENABLE_PLUGIN_OVERRIDE is set or the node has a plugin_namespace attribute.
//   * onnxOpImporters.cpp FallbackPluginImporter: plugin name = op_type ("ToMeMerge"); version = the
//     node's string attribute "plugin_version", default "1"; namespace = its string attribute
//     "plugin_namespace", default "" (vitfold's node has neither: version "1", namespace ""), looked up
//     with IPluginRegistry::getCreator(name, version, namespace) (importerUtils.cpp importPluginCreator).
//     A creator whose getInterfaceInfo().kind is not "PLUGIN CREATOR_V1" is used as IPluginCreatorV3One.
//   * onnxOpImporters.cpp loadFields: only the creator's getFieldNames() are read, each from the node
//     attribute of the same name (a missing one is skipped with a warning). An ONNX INT attribute
//     becomes one PluginField of PluginFieldType::kINT32, length 1, its int64 value narrowed to int32
//     (OnnxAttrs::get<int32_t>); INTS -> kINT32 (length n), FLOAT(S) -> kFLOAT32, STRING(S) -> kCHAR.
//   * importerUtils.cpp createPlugin: IPluginCreatorV3One::createPlugin(node name, fields,
//     TensorRTPhase::kBUILD), then INetworkDefinition::addPluginV3 with the node's inputs, in order.
// At deserialisation TensorRT calls createPlugin(name, getFieldsToSerialize() fields, kRUNTIME).
#include "plugin_common.h"
#include "tome_kernel.h"
#include "tome_plugin_core.h"

#include <NvInferRuntime.h>

#include <cstddef>
#include <cstdint>

#define VITFOLD_PLUGIN_API extern "C" __attribute__((visibility("default")))

namespace vitfold {
namespace trt {
namespace {

using nvinfer1::Dims;
using nvinfer1::DimsExprs;
using nvinfer1::IDimensionExpr;

//! What is ToMeMerge's own; plugin::Plugin and plugin::Creator (plugin_common.h) do the rest.
struct ToMeMergeOp {
    using Attrs = trt::Attrs;
    using Shape = trt::Shape;
    using DimExpr = trt::DimExpr;
    static constexpr char const* kName = kPluginName;
    static constexpr char const* kVersion = kPluginVersion;
    static constexpr char const* kNamespace = kPluginNamespace;
    //! r and num_protected: the node's INT attributes (both required), serialised as kINT32 fields too.
    static constexpr plugin::IntField<Attrs> kIntFields[] = {{kFieldR, &Attrs::r},
                                                             {kFieldProtected, &Attrs::numProtected}};
    static constexpr char const* kFieldState = trt::kFieldState;
    static constexpr size_t kSerializedBytes = trt::kSerializedBytes;
    static constexpr int32_t kOutputRank = trt::kOutputRank;
    static constexpr auto validateAttrs = &trt::validateAttrs;
    static constexpr auto serialize = &trt::serialize;
    static constexpr auto deserialize = &trt::deserialize;
    static constexpr auto outputDimExprs = &trt::outputDimExprs;
    static constexpr auto inferShape = &trt::inferShape;  //!< of (tokens, keys) dims; -1 dims stay unknown
    static constexpr Status kBadSecondRank = kBAD_KEYS_RANK;
    static constexpr char const* kSecondInput = "keys";
    static constexpr char const* kOutputText = "[B, N - r, C]";

    // Output [B, N - r, C]: each dim is inputs[input].d[axis] - minus, so a dynamic N stays symbolic, N - r
    // through IExprBuilder's kSUB (getOutputShapes also validates r <= (N - num_protected) / 2 and that B
    // and N agree between tokens and keys where they are build-time constants).
    static IDimensionExpr const* dimExpr(DimExpr const& e, DimsExprs const* inputs,
                                         nvinfer1::IExprBuilder& exprBuilder) noexcept {
        IDimensionExpr const* source = inputs[e.input].d[e.axis];
        if (e.minus == 0) return source;
        IDimensionExpr const* minus = exprBuilder.constant(e.minus);
        return source && minus ? exprBuilder.operation(nvinfer1::DimensionOperation::kSUB, *source, *minus) : nullptr;
    }

    static void expectedOutput(Attrs const& /*attrs*/, Shape const& s, int64_t out[kOutputRank]) noexcept {
        out[0] = s.B;
        out[1] = s.N - s.r;
        out[2] = s.C;
    }

    // Scratch for the profile's largest shape (the core's layout grows with B, N and D); configurePlugin
    // checks that the profile's smallest N still allows r merges.
    static int64_t maxWorkspace(Attrs const& /*attrs*/, Dims const& x, Dims const& keys) noexcept {
        if (x.nbDims != 3 || keys.nbDims < 1) return -1;
        return trt::workspaceBytes(x.d[0], x.d[1], keys.d[keys.nbDims - 1]);
    }

    static bool dimsKnown(Shape const& s) noexcept { return s.B >= 0 && s.N >= 0 && s.C >= 0 && s.H >= 1 && s.D >= 1; }
    static int64_t workspaceFor(Attrs const& /*attrs*/, Shape const& s) noexcept {
        return trt::workspaceBytes(s.B, s.N, s.D);
    }

    static int32_t launch(Attrs const& /*attrs*/, Shape const& s, void const* const* inputs, void* const* outputs,
                          void* workspace, size_t workspaceSize, cudaStream_t stream) noexcept {
        ToMeLaunch p{};
        p.x = static_cast<float const*>(inputs[0]);
        p.keys = static_cast<float const*>(inputs[1]);
        p.out = static_cast<float*>(outputs[0]);
        p.workspace = workspace;
        p.workspaceSize = workspaceSize;
        p.B = s.B;
        p.N = s.N;
        p.C = s.C;
        p.H = s.H;
        p.D = s.D;
        p.r = s.r;
        p.numProtected = s.P;
        return launchToMeMerge(p, stream);
    }
};

using ToMeMergeCreator = plugin::Creator<ToMeMergeOp>;

}  // namespace
}  // namespace trt
}  // namespace vitfold

//! TensorRT 10 plugin-library entry point (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins,
//! trt.get_plugin_registry().load_library): the creators this library provides.
//! Both plugins of vitfold's fused sites: ToMeMerge (this file) and EViTPrune (prune_plugin.cpp).
VITFOLD_PLUGIN_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static vitfold::trt::ToMeMergeCreator tome;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&tome, vitfold::trt::plugin::evitPruneCreator()};
    nbCreators = 2;
    return creators;
}

//! Called by TensorRT before getCreators, so the plugin can log through the application's logger.
VITFOLD_PLUGIN_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
    if (finder) vitfold::trt::plugin::gLoggerFinder.store(finder);
}
