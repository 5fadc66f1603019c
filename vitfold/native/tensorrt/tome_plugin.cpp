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
// The library also holds the second fused op, EViTPrune (prune_plugin.cpp, same structure); both share
// plugin_common.h, and getCreators at the end of this file lists both creators.
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

#include <array>
#include <cstring>
#include <exception>
#include <new>
#include <string>

#define VITFOLD_PLUGIN_API extern "C" __attribute__((visibility("default")))

namespace vitfold {
namespace trt {
namespace {

using nvinfer1::DataType;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;

using plugin::copyDims;
using plugin::isLinearFloat;
using plugin::readInt;

//! Logs an error about layer `who` and returns TensorRT's "failed" (non-zero).
int32_t fail(std::string const& who, std::string const& what) noexcept {
    return plugin::failOp(kPluginName, who, what);
}

//! The core's Shape of (tokens, keys) dims; -1 dims stay unknown.
Status shapeOf(Attrs const& attrs, nvinfer1::Dims const& x, nvinfer1::Dims const& keys, Shape* out) noexcept {
    int64_t xd[nvinfer1::Dims::MAX_DIMS], kd[nvinfer1::Dims::MAX_DIMS];
    if (!copyDims(x, xd)) return kBAD_X_RANK;
    if (!copyDims(keys, kd)) return kBAD_KEYS_RANK;
    return inferShape(attrs, xd, x.nbDims, kd, keys.nbDims, out);
}

class ToMeMergePlugin final : public nvinfer1::IPluginV3,
                              public nvinfer1::IPluginV3OneCore,
                              public nvinfer1::IPluginV3OneBuild,
                              public nvinfer1::IPluginV3OneRuntime {
public:
    ToMeMergePlugin(std::string name, Attrs attrs)
        : mName(std::move(name)), mAttrs(attrs),
          mCacheId("r=" + std::to_string(attrs.r) + ",num_protected=" + std::to_string(attrs.numProtected)) {}
    ToMeMergePlugin(ToMeMergePlugin const&) = default;  // mFields is rebuilt by getFieldsToSerialize
    ToMeMergePlugin& operator=(ToMeMergePlugin const&) = delete;
    ~ToMeMergePlugin() override = default;

    // IPluginV3 ------------------------------------------------------------------------------------
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override {
        switch (type) {
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    nvinfer1::IPluginV3* clone() noexcept override {
        try {
            return new ToMeMergePlugin(*this);
        } catch (std::exception const& e) {
            fail(mName, std::string("clone failed: ") + e.what());
        }
        return nullptr;
    }

    // IPluginV3OneCore ------------------------------------------------------------------------------
    char const* getPluginName() const noexcept override { return kPluginName; }
    char const* getPluginVersion() const noexcept override { return kPluginVersion; }
    char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

    // IPluginV3OneBuild -----------------------------------------------------------------------------
    int32_t getNbOutputs() const noexcept override { return 1; }

    int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                               int32_t nbInputs) const noexcept override {
        if (!outputTypes || !inputTypes || nbOutputs != 1 || nbInputs != 2)
            return fail(mName, "takes 2 inputs (tokens, keys) and gives 1 output");
        if (inputTypes[0] != DataType::kFLOAT || inputTypes[1] != DataType::kFLOAT)
            return fail(mName, "takes float32 tokens and keys");
        outputTypes[0] = DataType::kFLOAT;
        return 0;
    }

    // Output [B, N - r, C] as expressions of the inputs (the core's outputDimExprs table): a dynamic N
    // stays symbolic, N - r through IExprBuilder's kSUB. Dims that are build-time constants are
    // validated here already (r <= (N - num_protected) / 2, B and N agree between tokens and keys).
    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
                            int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& exprBuilder) noexcept override {
        if (!inputs || !outputs || nbInputs != 2 || nbOutputs != 1 || nbShapeInputs != 0)
            return fail(mName, "takes 2 tensor inputs (tokens, keys) and gives 1 output");
        int64_t known[2][nvinfer1::Dims::MAX_DIMS];
        for (int32_t k = 0; k < 2; ++k) {
            if (inputs[k].nbDims < 0 || inputs[k].nbDims > nvinfer1::Dims::MAX_DIMS)
                return fail(mName, "input rank out of range");
            for (int32_t i = 0; i < inputs[k].nbDims; ++i) {
                nvinfer1::IDimensionExpr const* e = inputs[k].d[i];
                known[k][i] = e && e->isConstant() ? e->getConstantValue() : -1;
            }
        }
        DimExpr table[kOutputRank];
        Status const s = outputDimExprs(mAttrs, known[0], inputs[0].nbDims, known[1], inputs[1].nbDims, table);
        if (s != kOK) return fail(mName, statusMessage(s));
        outputs[0].nbDims = kOutputRank;
        for (int32_t i = 0; i < kOutputRank; ++i) {
            nvinfer1::IDimensionExpr const* source = inputs[table[i].input].d[table[i].axis];
            if (table[i].minus != 0) {
                nvinfer1::IDimensionExpr const* minus = exprBuilder.constant(table[i].minus);
                source = source && minus
                    ? exprBuilder.operation(nvinfer1::DimensionOperation::kSUB, *source, *minus)
                    : nullptr;
            }
            if (!source) return fail(mName, "could not build the output shape expression");
            outputs[0].d[i] = source;
        }
        return 0;
    }

    // float32, linear (row-major) layout for both inputs and the output; nothing else.
    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override {
        return inOut && nbInputs == 2 && nbOutputs == 1 && pos >= 0 && pos < nbInputs + nbOutputs &&
            isLinearFloat(inOut[pos].desc);
    }

    // Checks the network's dims (wildcards -1 allowed) and the profile's min and max: the smallest N
    // must still allow r merges.
    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out,
                            int32_t nbOutputs) noexcept override {
        if (!in || !out || nbInputs != 2 || nbOutputs != 1)
            return fail(mName, "takes 2 inputs (tokens, keys) and gives 1 output");
        Shape shape;
        for (Status s : {shapeOf(mAttrs, in[0].desc.dims, in[1].desc.dims, &shape),
                         shapeOf(mAttrs, in[0].min, in[1].min, &shape), shapeOf(mAttrs, in[0].max, in[1].max, &shape)})
            if (s != kOK) return fail(mName, statusMessage(s));
        return 0;
    }

    // Scratch for the largest shape of the profile (the core's layout grows with B, N and D).
    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                            DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept override {
        if (!inputs || nbInputs != 2) return 0;
        nvinfer1::Dims const& x = inputs[0].max;
        nvinfer1::Dims const& keys = inputs[1].max;
        if (x.nbDims != 3 || keys.nbDims < 1) return 0;
        int64_t const bytes = workspaceBytes(x.d[0], x.d[1], keys.d[keys.nbDims - 1]);
        return bytes < 0 ? 0 : static_cast<size_t>(bytes);
    }

    // The attributes decide the kernel beyond the I/O shapes, so they key the timing cache.
    char const* getTimingCacheID() noexcept override { return mCacheId.c_str(); }
    char const* getMetadataString() noexcept override { return mCacheId.c_str(); }

    // IPluginV3OneRuntime ---------------------------------------------------------------------------
    int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out,
                          int32_t nbOutputs) noexcept override {
        if (!in || !out || nbInputs != 2 || nbOutputs != 1)
            return fail(mName, "takes 2 inputs (tokens, keys) and gives 1 output");
        Shape shape;
        Status const s = shapeOf(mAttrs, in[0].dims, in[1].dims, &shape);
        if (s != kOK) return fail(mName, statusMessage(s));
        if (!isLinearFloat(in[0]) || !isLinearFloat(in[1]) || !isLinearFloat(out[0]))
            return fail(mName, "runs on float32 linear tensors only");
        if (out[0].dims.nbDims != kOutputRank || out[0].dims.d[0] != shape.B || out[0].dims.d[1] != shape.N - shape.r ||
            out[0].dims.d[2] != shape.C)
            return fail(mName, "output dims are not [B, N - r, C]");
        return 0;
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc, void const* const* inputs,
                    void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
        if (!inputDesc || !outputDesc || !inputs || !outputs) return fail(mName, "enqueue without tensors");
        Shape s;
        Status const status = shapeOf(mAttrs, inputDesc[0].dims, inputDesc[1].dims, &s);
        if (status != kOK) return fail(mName, statusMessage(status));
        if (s.B < 0 || s.N < 0 || s.C < 0 || s.H < 1 || s.D < 1) return fail(mName, "enqueue with unknown dims");
        int64_t const need = workspaceBytes(s.B, s.N, s.D);
        if (need < 0) return fail(mName, statusMessage(kOVERFLOW));
        ToMeLaunch launch{};
        launch.x = static_cast<float const*>(inputs[0]);
        launch.keys = static_cast<float const*>(inputs[1]);
        launch.out = static_cast<float*>(outputs[0]);
        launch.workspace = workspace;
        launch.workspaceSize = static_cast<size_t>(need);  // getWorkspaceSize gave at least this (max dims)
        launch.B = s.B;
        launch.N = s.N;
        launch.C = s.C;
        launch.H = s.H;
        launch.D = s.D;
        launch.r = s.r;
        launch.numProtected = s.P;
        int32_t const cudaStatus = launchToMeMerge(launch, stream);
        if (cudaStatus != 0) return fail(mName, "kernel launch failed, cudaError_t " + std::to_string(cudaStatus));
        return 0;
    }

    // No per-context resources: the clone is the plugin.
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept override {
        return clone();
    }

    // r and num_protected as kINT32 fields (readable by tools, and the same fields the ONNX parser
    // gives), plus the core's versioned byte record, so that a later plugin can refuse an engine
    // whose attribute format it does not know instead of misreading it.
    PluginFieldCollection const* getFieldsToSerialize() noexcept override {
        size_t written = 0;
        if (serialize(mAttrs, mState.data(), mState.size(), &written) != kOK) {
            fail(mName, "could not serialise the attributes");
            return nullptr;
        }
        mFields[0] = PluginField(kFieldR, &mAttrs.r, PluginFieldType::kINT32, 1);
        mFields[1] = PluginField(kFieldProtected, &mAttrs.numProtected, PluginFieldType::kINT32, 1);
        mFields[2] = PluginField(kFieldState, mState.data(), PluginFieldType::kUNKNOWN, static_cast<int32_t>(written));
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
        return &mCollection;
    }

private:
    std::string mName;  // the layer (ONNX node) name, for messages
    Attrs mAttrs;
    std::string mCacheId;
    std::array<uint8_t, kSerializedBytes> mState{};
    std::array<PluginField, 3> mFields{};
    PluginFieldCollection mCollection{0, nullptr};
};

class ToMeMergeCreator final : public nvinfer1::IPluginCreatorV3One {
public:
    ToMeMergeCreator() {
        mFieldNames[0] = PluginField(kFieldR, nullptr, PluginFieldType::kINT32, 1);
        mFieldNames[1] = PluginField(kFieldProtected, nullptr, PluginFieldType::kINT32, 1);
        mCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
        mCollection.fields = mFieldNames.data();
    }

    char const* getPluginName() const noexcept override { return kPluginName; }
    char const* getPluginVersion() const noexcept override { return kPluginVersion; }
    char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

    // What the ONNX parser reads from the node (its attributes r and num_protected, both required).
    PluginFieldCollection const* getFieldNames() noexcept override { return &mCollection; }

    // kBUILD: fields r and num_protected from the ONNX node (or a network built by hand). kRUNTIME: what
    // getFieldsToSerialize wrote; the versioned record must be there and agree with the int fields.
    nvinfer1::IPluginV3* createPlugin(char const* name, PluginFieldCollection const* fc,
                                      nvinfer1::TensorRTPhase phase) noexcept override {
        std::string const who = name ? name : "";
        try {
            if (!fc || (fc->nbFields > 0 && !fc->fields)) {
                fail(who, "createPlugin without a field collection");
                return nullptr;
            }
            bool hasR = false, hasP = false, hasState = false;
            Attrs fromInts, fromState;
            for (int32_t i = 0; i < fc->nbFields; ++i) {
                PluginField const& f = fc->fields[i];
                if (!f.name) continue;
                if (std::strcmp(f.name, kFieldR) == 0) {
                    if (!readInt(f, &fromInts.r)) return failNull(who, "attribute r must be one integer");
                    hasR = true;
                } else if (std::strcmp(f.name, kFieldProtected) == 0) {
                    if (!readInt(f, &fromInts.numProtected))
                        return failNull(who, "attribute num_protected must be one integer");
                    hasP = true;
                } else if (std::strcmp(f.name, kFieldState) == 0) {
                    if (f.length < 0) return failNull(who, "bad vitfold_state field");
                    Status const s =
                        deserialize(static_cast<uint8_t const*>(f.data), static_cast<size_t>(f.length), &fromState);
                    if (s != kOK) return failNull(who, std::string("serialised attributes: ") + statusMessage(s));
                    hasState = true;
                }  // other fields: ignored (none are written or advertised)
            }
            Attrs attrs;
            if (hasState) {
                if ((hasR && fromInts.r != fromState.r) || (hasP && fromInts.numProtected != fromState.numProtected))
                    return failNull(who, "serialised attributes disagree with the r / num_protected fields");
                attrs = fromState;
            } else if (phase == nvinfer1::TensorRTPhase::kRUNTIME) {
                return failNull(who, "the engine has no vitfold_state field: it was not serialised by this plugin; "
                                     "rebuild the engine");
            } else if (hasR && hasP) {
                attrs = fromInts;
            } else {
                return failNull(who, "the node needs integer attributes r and num_protected");
            }
            if (Status const s = validateAttrs(attrs); s != kOK) return failNull(who, statusMessage(s));
            return new ToMeMergePlugin(who, attrs);
        } catch (std::exception const& e) {
            fail(who, std::string("createPlugin failed: ") + e.what());
        }
        return nullptr;
    }

private:
    static nvinfer1::IPluginV3* failNull(std::string const& who, std::string const& what) noexcept {
        fail(who, what);
        return nullptr;
    }

    std::array<PluginField, 2> mFieldNames{};
    PluginFieldCollection mCollection{0, nullptr};
};

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
