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
// getCreators there lists evitPruneCreator(). Written without a GPU and without TensorRT's library: it
// compiles against the TensorRT headers and plugin_host_check.cpp drives it through TensorRT's
// interfaces on the host; TensorRT has never loaded it and its kernel has never run.
#include "plugin_common.h"
#include "prune_kernel.h"
#include "prune_plugin_core.h"

#include <NvInferRuntime.h>

#include <array>
#include <cstring>
#include <exception>
#include <new>
#include <string>

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
using prune::Attrs;
using prune::Shape;

int32_t fail(std::string const& who, std::string const& what) noexcept {
    return plugin::failOp(prune::kPluginName, who, what);
}

//! The core's Shape of (tokens, attention) dims; -1 dims stay unknown.
Status shapeOf(Attrs const& attrs, nvinfer1::Dims const& x, nvinfer1::Dims const& attn, Shape* out) noexcept {
    int64_t xd[nvinfer1::Dims::MAX_DIMS], ad[nvinfer1::Dims::MAX_DIMS];
    if (!copyDims(x, xd)) return kBAD_X_RANK;
    if (!copyDims(attn, ad)) return kBAD_ATTN_RANK;
    return prune::inferShape(attrs, xd, x.nbDims, ad, attn.nbDims, out);
}

class EViTPrunePlugin final : public nvinfer1::IPluginV3,
                              public nvinfer1::IPluginV3OneCore,
                              public nvinfer1::IPluginV3OneBuild,
                              public nvinfer1::IPluginV3OneRuntime {
public:
    EViTPrunePlugin(std::string name, Attrs attrs)
        : mName(std::move(name)), mAttrs(attrs),
          mCacheId("keep=" + std::to_string(attrs.keep) + ",num_protected=" + std::to_string(attrs.numProtected) +
                   ",fuse=" + std::to_string(attrs.fuse)) {}
    EViTPrunePlugin(EViTPrunePlugin const&) = default;  // mFields is rebuilt by getFieldsToSerialize
    EViTPrunePlugin& operator=(EViTPrunePlugin const&) = delete;
    ~EViTPrunePlugin() override = default;

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
            return new EViTPrunePlugin(*this);
        } catch (std::exception const& e) {
            fail(mName, std::string("clone failed: ") + e.what());
        }
        return nullptr;
    }

    // IPluginV3OneCore ------------------------------------------------------------------------------
    char const* getPluginName() const noexcept override { return prune::kPluginName; }
    char const* getPluginVersion() const noexcept override { return prune::kPluginVersion; }
    char const* getPluginNamespace() const noexcept override { return prune::kPluginNamespace; }

    // IPluginV3OneBuild -----------------------------------------------------------------------------
    int32_t getNbOutputs() const noexcept override { return 1; }

    int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                               int32_t nbInputs) const noexcept override {
        if (!outputTypes || !inputTypes || nbOutputs != 1 || nbInputs != 2)
            return fail(mName, "takes 2 inputs (tokens, class attention) and gives 1 output");
        if (inputTypes[0] != DataType::kFLOAT || inputTypes[1] != DataType::kFLOAT)
            return fail(mName, "takes float32 tokens and class attention");
        outputTypes[0] = DataType::kFLOAT;
        return 0;
    }

    // Output [B, P + keep + fuse, C]: B and C are the tokens' own expressions, the token count a constant
    // (it does not depend on N, so a dynamic N gives a static output N). Dims that are build-time
    // constants are validated here already (keep <= N - P - 1, B and N agree between the inputs).
    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
                            int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& exprBuilder) noexcept override {
        if (!inputs || !outputs || nbInputs != 2 || nbOutputs != 1 || nbShapeInputs != 0)
            return fail(mName, "takes 2 tensor inputs (tokens, class attention) and gives 1 output");
        int64_t known[2][nvinfer1::Dims::MAX_DIMS];
        for (int32_t k = 0; k < 2; ++k) {
            if (inputs[k].nbDims < 0 || inputs[k].nbDims > nvinfer1::Dims::MAX_DIMS)
                return fail(mName, "input rank out of range");
            for (int32_t i = 0; i < inputs[k].nbDims; ++i) {
                nvinfer1::IDimensionExpr const* e = inputs[k].d[i];
                known[k][i] = e && e->isConstant() ? e->getConstantValue() : -1;
            }
        }
        prune::DimExpr table[prune::kOutputRank];
        Status const s =
            prune::outputDimExprs(mAttrs, known[0], inputs[0].nbDims, known[1], inputs[1].nbDims, table);
        if (s != kOK) return fail(mName, statusMessage(s));
        outputs[0].nbDims = prune::kOutputRank;
        for (int32_t i = 0; i < prune::kOutputRank; ++i) {
            nvinfer1::IDimensionExpr const* e = table[i].input < 0 ? exprBuilder.constant(table[i].value)
                                                                   : inputs[table[i].input].d[table[i].axis];
            if (!e) return fail(mName, "could not build the output shape expression");
            outputs[0].d[i] = e;
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
    // must still leave a token out (keep <= N - P - 1).
    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out,
                            int32_t nbOutputs) noexcept override {
        if (!in || !out || nbInputs != 2 || nbOutputs != 1)
            return fail(mName, "takes 2 inputs (tokens, class attention) and gives 1 output");
        Shape shape;
        for (Status s : {shapeOf(mAttrs, in[0].desc.dims, in[1].desc.dims, &shape),
                         shapeOf(mAttrs, in[0].min, in[1].min, &shape), shapeOf(mAttrs, in[0].max, in[1].max, &shape)})
            if (s != kOK) return fail(mName, statusMessage(s));
        return 0;
    }

    // Scratch for the largest shape of the profile (the core's layout grows with B and N).
    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                            DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept override {
        if (!inputs || nbInputs != 2) return 0;
        nvinfer1::Dims const& x = inputs[0].max;
        if (x.nbDims != 3) return 0;
        int64_t const bytes = prune::workspaceBytes(x.d[0], x.d[1], mAttrs.numProtected);
        return bytes < 0 ? 0 : static_cast<size_t>(bytes);
    }

    // The attributes decide the kernel beyond the I/O shapes, so they key the timing cache.
    char const* getTimingCacheID() noexcept override { return mCacheId.c_str(); }
    char const* getMetadataString() noexcept override { return mCacheId.c_str(); }

    // IPluginV3OneRuntime ---------------------------------------------------------------------------
    int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out,
                          int32_t nbOutputs) noexcept override {
        if (!in || !out || nbInputs != 2 || nbOutputs != 1)
            return fail(mName, "takes 2 inputs (tokens, class attention) and gives 1 output");
        Shape shape;
        Status const s = shapeOf(mAttrs, in[0].dims, in[1].dims, &shape);
        if (s != kOK) return fail(mName, statusMessage(s));
        if (!isLinearFloat(in[0]) || !isLinearFloat(in[1]) || !isLinearFloat(out[0]))
            return fail(mName, "runs on float32 linear tensors only");
        if (out[0].dims.nbDims != prune::kOutputRank || out[0].dims.d[0] != shape.B ||
            out[0].dims.d[1] != prune::outputTokens(mAttrs) || out[0].dims.d[2] != shape.C)
            return fail(mName, "output dims are not [B, num_protected + keep + fuse, C]");
        return 0;
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc, void const* const* inputs,
                    void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
        if (!inputDesc || !outputDesc || !inputs || !outputs) return fail(mName, "enqueue without tensors");
        Shape s;
        Status const status = shapeOf(mAttrs, inputDesc[0].dims, inputDesc[1].dims, &s);
        if (status != kOK) return fail(mName, statusMessage(status));
        if (s.B < 0 || s.N < 0 || s.C < 0) return fail(mName, "enqueue with unknown dims");
        int64_t const need = prune::workspaceBytes(s.B, s.N, mAttrs.numProtected);
        if (need < 0) return fail(mName, statusMessage(kOVERFLOW));
        PruneLaunch launch{};
        launch.x = static_cast<float const*>(inputs[0]);
        launch.attn = static_cast<float const*>(inputs[1]);
        launch.out = static_cast<float*>(outputs[0]);
        launch.workspace = workspace;
        launch.workspaceSize = static_cast<size_t>(need);  // getWorkspaceSize gave at least this (max dims)
        launch.B = s.B;
        launch.N = s.N;
        launch.C = s.C;
        launch.keep = mAttrs.keep;
        launch.numProtected = mAttrs.numProtected;
        launch.fuse = mAttrs.fuse;
        int32_t const cudaStatus = launchEViTPrune(launch, stream);
        if (cudaStatus != 0) return fail(mName, "kernel launch failed, cudaError_t " + std::to_string(cudaStatus));
        return 0;
    }

    // No per-context resources: the clone is the plugin.
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept override {
        return clone();
    }

    // keep, num_protected and fuse as kINT32 fields (the fields the ONNX parser gives), plus the core's
    // versioned byte record ("VEVP"), so that a later plugin can refuse an engine it cannot read.
    PluginFieldCollection const* getFieldsToSerialize() noexcept override {
        size_t written = 0;
        if (prune::serialize(mAttrs, mState.data(), mState.size(), &written) != kOK) {
            fail(mName, "could not serialise the attributes");
            return nullptr;
        }
        mFields[0] = PluginField(prune::kFieldKeep, &mAttrs.keep, PluginFieldType::kINT32, 1);
        mFields[1] = PluginField(prune::kFieldProtected, &mAttrs.numProtected, PluginFieldType::kINT32, 1);
        mFields[2] = PluginField(prune::kFieldFuse, &mAttrs.fuse, PluginFieldType::kINT32, 1);
        mFields[3] =
            PluginField(prune::kFieldState, mState.data(), PluginFieldType::kUNKNOWN, static_cast<int32_t>(written));
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
        return &mCollection;
    }

private:
    std::string mName;  // the layer (ONNX node) name, for messages
    Attrs mAttrs;
    std::string mCacheId;
    std::array<uint8_t, prune::kSerializedBytes> mState{};
    std::array<PluginField, 4> mFields{};
    PluginFieldCollection mCollection{0, nullptr};
};

class EViTPruneCreator final : public nvinfer1::IPluginCreatorV3One {
public:
    EViTPruneCreator() {
        mFieldNames[0] = PluginField(prune::kFieldKeep, nullptr, PluginFieldType::kINT32, 1);
        mFieldNames[1] = PluginField(prune::kFieldProtected, nullptr, PluginFieldType::kINT32, 1);
        mFieldNames[2] = PluginField(prune::kFieldFuse, nullptr, PluginFieldType::kINT32, 1);
        mCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
        mCollection.fields = mFieldNames.data();
    }

    char const* getPluginName() const noexcept override { return prune::kPluginName; }
    char const* getPluginVersion() const noexcept override { return prune::kPluginVersion; }
    char const* getPluginNamespace() const noexcept override { return prune::kPluginNamespace; }

    // What the ONNX parser reads from the node (its attributes keep, num_protected, fuse; all required).
    PluginFieldCollection const* getFieldNames() noexcept override { return &mCollection; }

    // kBUILD: fields keep, num_protected, fuse from the ONNX node (or a network built by hand).
    // kRUNTIME: what getFieldsToSerialize wrote; the versioned record must be there and agree with the
    // int fields.
    nvinfer1::IPluginV3* createPlugin(char const* name, PluginFieldCollection const* fc,
                                      nvinfer1::TensorRTPhase phase) noexcept override {
        std::string const who = name ? name : "";
        try {
            if (!fc || (fc->nbFields > 0 && !fc->fields))
                return failNull(who, "createPlugin without a field collection");
            bool hasKeep = false, hasP = false, hasFuse = false, hasState = false;
            Attrs fromInts, fromState;
            for (int32_t i = 0; i < fc->nbFields; ++i) {
                PluginField const& f = fc->fields[i];
                if (!f.name) continue;
                if (std::strcmp(f.name, prune::kFieldKeep) == 0) {
                    if (!readInt(f, &fromInts.keep)) return failNull(who, "attribute keep must be one integer");
                    hasKeep = true;
                } else if (std::strcmp(f.name, prune::kFieldProtected) == 0) {
                    if (!readInt(f, &fromInts.numProtected))
                        return failNull(who, "attribute num_protected must be one integer");
                    hasP = true;
                } else if (std::strcmp(f.name, prune::kFieldFuse) == 0) {
                    if (!readInt(f, &fromInts.fuse)) return failNull(who, "attribute fuse must be one integer");
                    hasFuse = true;
                } else if (std::strcmp(f.name, prune::kFieldState) == 0) {
                    if (f.length < 0) return failNull(who, "bad vitfold_state field");
                    Status const s = prune::deserialize(static_cast<uint8_t const*>(f.data),
                                                        static_cast<size_t>(f.length), &fromState);
                    if (s != kOK) return failNull(who, std::string("serialised attributes: ") + statusMessage(s));
                    hasState = true;
                }  // other fields: ignored (none are written or advertised)
            }
            Attrs attrs;
            if (hasState) {
                if ((hasKeep && fromInts.keep != fromState.keep) ||
                    (hasP && fromInts.numProtected != fromState.numProtected) ||
                    (hasFuse && fromInts.fuse != fromState.fuse))
                    return failNull(who, "serialised attributes disagree with the keep / num_protected / fuse fields");
                attrs = fromState;
            } else if (phase == nvinfer1::TensorRTPhase::kRUNTIME) {
                return failNull(who, "the engine has no vitfold_state field: it was not serialised by this plugin; "
                                     "rebuild the engine");
            } else if (hasKeep && hasP && hasFuse) {
                attrs = fromInts;
            } else {
                return failNull(who, "the node needs integer attributes keep, num_protected and fuse");
            }
            if (Status const s = prune::validateAttrs(attrs); s != kOK) return failNull(who, statusMessage(s));
            return new EViTPrunePlugin(who, attrs);
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

    std::array<PluginField, 3> mFieldNames{};
    PluginFieldCollection mCollection{0, nullptr};
};

}  // namespace

nvinfer1::IPluginCreatorInterface* plugin::evitPruneCreator() noexcept {
    static EViTPruneCreator creator;
    return &creator;
}

}  // namespace trt
}  // namespace vitfold
