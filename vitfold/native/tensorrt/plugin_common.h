// What vitfold's two TensorRT plugins (ToMeMerge: tome_plugin.cpp, EViTPrune: prune_plugin.cpp) share:
// logging through the ILoggerFinder TensorRT hands to setLoggerFinder, the error helper, dims and
// field readers, the creator accessor that getCreators (tome_plugin.cpp) lists, and the IPluginV3
// plumbing itself: Plugin<Op> and Creator<Op> below implement TensorRT's interfaces once, and each
// plugin's .cpp supplies an Op (a traits struct) with what is its own: the core's attributes, fields,
// shapes and record, its output dims, workspace and kernel launch. Needs the TensorRT headers
// (NvInferRuntime.h); used by the plugin library only, not by the GPU-free cores.
#ifndef VITFOLD_TRT_PLUGIN_COMMON_H
#define VITFOLD_TRT_PLUGIN_COMMON_H

#include "tome_plugin_core.h"  // Status, statusMessage (shared by both cores)

#include <NvInferRuntime.h>

#include <array>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstring>
#include <exception>
#include <iterator>
#include <new>
#include <string>
#include <utility>

namespace vitfold {
namespace trt {
namespace plugin {

//! Set by setLoggerFinder (one for the whole library; C++17 inline variable).
inline std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

//! Logs to TensorRT's logger (found through setLoggerFinder); silent before TensorRT set it.
inline void logMessage(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept {
    try {
        nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
        nvinfer1::ILogger* logger = finder ? finder->findLogger() : nullptr;
        if (logger) logger->log(severity, message.c_str());
    } catch (...) {
    }
}

//! Logs an error "<op> (<layer>): <what>" and returns TensorRT's "failed" (non-zero).
inline int32_t failOp(char const* op, std::string const& who, std::string const& what) noexcept {
    try {
        logMessage(nvinfer1::ILogger::Severity::kERROR, std::string(op) + " (" + who + "): " + what);
    } catch (...) {
    }
    return 1;
}

//! Dims as int64 (copied, at most Dims::MAX_DIMS); false when the rank does not fit.
inline bool copyDims(nvinfer1::Dims const& dims, int64_t* out) noexcept {
    if (dims.nbDims < 0 || dims.nbDims > nvinfer1::Dims::MAX_DIMS) return false;
    for (int32_t i = 0; i < dims.nbDims; ++i) out[i] = dims.d[i];
    return true;
}

inline bool isLinearFloat(nvinfer1::PluginTensorDesc const& desc) noexcept {
    return desc.type == nvinfer1::DataType::kFLOAT && desc.format == nvinfer1::TensorFormat::kLINEAR;
}

//! One int attribute: kINT32 (what the ONNX parser produces) or kINT64 that fits in int32, length 1.
inline bool readInt(nvinfer1::PluginField const& field, int32_t* out) noexcept {
    if (!field.data || field.length != 1) return false;
    if (field.type == nvinfer1::PluginFieldType::kINT32) {
        std::memcpy(out, field.data, sizeof(int32_t));
        return true;
    }
    if (field.type == nvinfer1::PluginFieldType::kINT64) {
        int64_t v = 0;
        std::memcpy(&v, field.data, sizeof v);
        if (v < INT32_MIN || v > INT32_MAX) return false;
        *out = static_cast<int32_t>(v);
        return true;
    }
    return false;
}

//! The EViTPrune creator (prune_plugin.cpp), a function-local static.
nvinfer1::IPluginCreatorInterface* evitPruneCreator() noexcept;

// --------------------------------------------------------------------------- the shared IPluginV3 plumbing
//! One INT attribute of an op: its PluginField name (= the ONNX attribute's) and its place in Attrs.
template <class Attrs>
struct IntField {
    char const* name;
    int32_t Attrs::*member;
};

//! The names of Op's int fields joined, e.g. "keep, num_protected and fuse" (sep ", ", last " and ").
template <class Op>
std::string fieldNames(char const* sep, char const* last) {
    std::string out;
    size_t const n = std::size(Op::kIntFields);
    for (size_t i = 0; i < n; ++i) {
        if (i > 0) out += i + 1 == n ? last : sep;
        out += Op::kIntFields[i].name;
    }
    return out;
}

//! What an Op (a struct in tome_plugin.cpp / prune_plugin.cpp) supplies to Plugin<Op> and Creator<Op>:
//!   Attrs, Shape, DimExpr                     the core's types
//!   kName, kVersion, kNamespace               the plugin's identity (the core's kPlugin* constants)
//!   kIntFields[]                              the node's INT attributes, all required, in field order;
//!                                             also serialised as kINT32 fields, before kFieldState
//!   kFieldState, kSerializedBytes             the versioned byte record's field name and size
//!   validateAttrs, serialize, deserialize     the core's functions
//!   inferShape, kBadSecondRank                the core's shape inference, and its Status for a second
//!                                             input of a rank beyond Dims::MAX_DIMS
//!   outputDimExprs, kOutputRank               the core's output table (build time, IExprBuilder)
//!   kSecondInput                              the second input in messages ("keys", "class attention")
//!   kOutputText                               the output dims in messages ("[B, N - r, C]")
//!   dimExpr(table entry, inputs, builder)     one output dim as an IDimensionExpr (nullptr: failed)
//!   expectedOutput(attrs, shape, dims)        the output dims onShapeChange accepts
//!   maxWorkspace(attrs, x max, second max)    getWorkspaceSize for the profile's max dims (-1: none)
//!   dimsKnown(shape), workspaceFor(attrs, shape)  enqueue: all dims known; the scratch launch needs
//!   launch(attrs, shape, in, out, ws, wsSize, stream)  the kernel; returns a cudaError_t
//! The plugin takes two float32 inputs (tokens and the second) and gives one float32 output, all linear.
template <class Op>
class Plugin final : public nvinfer1::IPluginV3,
                     public nvinfer1::IPluginV3OneCore,
                     public nvinfer1::IPluginV3OneBuild,
                     public nvinfer1::IPluginV3OneRuntime {
public:
    using Attrs = typename Op::Attrs;
    using Shape = typename Op::Shape;
    static constexpr size_t kNbIntFields = std::size(Op::kIntFields);

    Plugin(std::string name, Attrs attrs) : mName(std::move(name)), mAttrs(attrs), mCacheId(cacheId(attrs)) {}
    Plugin(Plugin const&) = default;  // mFields is rebuilt by getFieldsToSerialize
    Plugin& operator=(Plugin const&) = delete;
    ~Plugin() override = default;

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
            return new Plugin(*this);
        } catch (std::exception const& e) {
            fail(std::string("clone failed: ") + e.what());
        }
        return nullptr;
    }

    // IPluginV3OneCore ------------------------------------------------------------------------------
    char const* getPluginName() const noexcept override { return Op::kName; }
    char const* getPluginVersion() const noexcept override { return Op::kVersion; }
    char const* getPluginNamespace() const noexcept override { return Op::kNamespace; }

    // IPluginV3OneBuild -----------------------------------------------------------------------------
    int32_t getNbOutputs() const noexcept override { return 1; }

    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes,
                               int32_t nbInputs) const noexcept override {
        if (!outputTypes || !inputTypes || nbOutputs != 1 || nbInputs != 2) return failInputs("inputs");
        if (inputTypes[0] != nvinfer1::DataType::kFLOAT || inputTypes[1] != nvinfer1::DataType::kFLOAT)
            return fail(std::string("takes float32 tokens and ") + Op::kSecondInput);
        outputTypes[0] = nvinfer1::DataType::kFLOAT;
        return 0;
    }

    // The output as expressions of the inputs, from the core's outputDimExprs table (Op::dimExpr turns an
    // entry into an IDimensionExpr). Dims that are build-time constants are validated here already.
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                            nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t nbShapeInputs,
                            nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& exprBuilder) noexcept override {
        if (!inputs || !outputs || nbInputs != 2 || nbOutputs != 1 || nbShapeInputs != 0)
            return failInputs("tensor inputs");
        int64_t known[2][nvinfer1::Dims::MAX_DIMS];
        for (int32_t k = 0; k < 2; ++k) {
            if (inputs[k].nbDims < 0 || inputs[k].nbDims > nvinfer1::Dims::MAX_DIMS)
                return fail("input rank out of range");
            for (int32_t i = 0; i < inputs[k].nbDims; ++i) {
                nvinfer1::IDimensionExpr const* e = inputs[k].d[i];
                known[k][i] = e && e->isConstant() ? e->getConstantValue() : -1;
            }
        }
        typename Op::DimExpr table[Op::kOutputRank];
        Status const s = Op::outputDimExprs(mAttrs, known[0], inputs[0].nbDims, known[1], inputs[1].nbDims, table);
        if (s != kOK) return fail(statusMessage(s));
        outputs[0].nbDims = Op::kOutputRank;
        for (int32_t i = 0; i < Op::kOutputRank; ++i) {
            nvinfer1::IDimensionExpr const* e = Op::dimExpr(table[i], inputs, exprBuilder);
            if (!e) return fail("could not build the output shape expression");
            outputs[0].d[i] = e;
        }
        return 0;
    }

    // float32, linear (row-major) layout for both inputs and the output; nothing else.
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override {
        return inOut && nbInputs == 2 && nbOutputs == 1 && pos >= 0 && pos < nbInputs + nbOutputs &&
            isLinearFloat(inOut[pos].desc);
    }

    // Checks the network's dims (wildcards -1 allowed) and the profile's min and max.
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override {
        if (!in || !out || nbInputs != 2 || nbOutputs != 1) return failInputs("inputs");
        Shape shape;
        for (Status s : {shapeOf(mAttrs, in[0].desc.dims, in[1].desc.dims, &shape),
                         shapeOf(mAttrs, in[0].min, in[1].min, &shape),
                         shapeOf(mAttrs, in[0].max, in[1].max, &shape)})
            if (s != kOK) return fail(statusMessage(s));
        return 0;
    }

    // Scratch for the largest shape of the profile (the cores' layouts grow with the dims).
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* /*outputs*/,
                            int32_t /*nbOutputs*/) const noexcept override {
        if (!inputs || nbInputs != 2) return 0;
        int64_t const bytes = Op::maxWorkspace(mAttrs, inputs[0].max, inputs[1].max);
        return bytes < 0 ? 0 : static_cast<size_t>(bytes);
    }

    // The attributes decide the kernel beyond the I/O shapes, so they key the timing cache.
    char const* getTimingCacheID() noexcept override { return mCacheId.c_str(); }
    char const* getMetadataString() noexcept override { return mCacheId.c_str(); }

    // IPluginV3OneRuntime ---------------------------------------------------------------------------
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                          int32_t nbOutputs) noexcept override {
        if (!in || !out || nbInputs != 2 || nbOutputs != 1) return failInputs("inputs");
        Shape shape;
        Status const s = shapeOf(mAttrs, in[0].dims, in[1].dims, &shape);
        if (s != kOK) return fail(statusMessage(s));
        if (!isLinearFloat(in[0]) || !isLinearFloat(in[1]) || !isLinearFloat(out[0]))
            return fail("runs on float32 linear tensors only");
        int64_t expected[Op::kOutputRank];
        Op::expectedOutput(mAttrs, shape, expected);
        bool same = out[0].dims.nbDims == Op::kOutputRank;
        for (int32_t i = 0; same && i < Op::kOutputRank; ++i) same = out[0].dims.d[i] == expected[i];
        if (!same) return fail(std::string("output dims are not ") + Op::kOutputText);
        return 0;
    }

    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                    void const* const* inputs, void* const* outputs, void* workspace,
                    cudaStream_t stream) noexcept override {
        if (!inputDesc || !outputDesc || !inputs || !outputs) return fail("enqueue without tensors");
        Shape shape;
        Status const status = shapeOf(mAttrs, inputDesc[0].dims, inputDesc[1].dims, &shape);
        if (status != kOK) return fail(statusMessage(status));
        if (!Op::dimsKnown(shape)) return fail("enqueue with unknown dims");
        int64_t const need = Op::workspaceFor(mAttrs, shape);
        if (need < 0) return fail(statusMessage(kOVERFLOW));
        // getWorkspaceSize gave at least `need` (the profile's max dims)
        int32_t const cudaStatus =
            Op::launch(mAttrs, shape, inputs, outputs, workspace, static_cast<size_t>(need), stream);
        if (cudaStatus != 0) return fail("kernel launch failed, cudaError_t " + std::to_string(cudaStatus));
        return 0;
    }

    // No per-context resources: the clone is the plugin.
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept override {
        return clone();
    }

    // The int attributes as kINT32 fields (readable by tools, and the same fields the ONNX parser gives),
    // plus the core's versioned byte record (kFieldState), so that a later plugin can refuse an engine
    // whose attribute format it does not know instead of misreading it.
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override {
        size_t written = 0;
        if (Op::serialize(mAttrs, mState.data(), mState.size(), &written) != kOK) {
            fail("could not serialise the attributes");
            return nullptr;
        }
        for (size_t i = 0; i < kNbIntFields; ++i)
            mFields[i] = nvinfer1::PluginField(Op::kIntFields[i].name, &(mAttrs.*Op::kIntFields[i].member),
                                               nvinfer1::PluginFieldType::kINT32, 1);
        mFields[kNbIntFields] = nvinfer1::PluginField(Op::kFieldState, mState.data(),
                                                      nvinfer1::PluginFieldType::kUNKNOWN,
                                                      static_cast<int32_t>(written));
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
        return &mCollection;
    }

private:
    //! The core's Shape of (tokens, second input) dims; -1 dims stay unknown.
    static Status shapeOf(Attrs const& attrs, nvinfer1::Dims const& x, nvinfer1::Dims const& second,
                          Shape* out) noexcept {
        int64_t xd[nvinfer1::Dims::MAX_DIMS], sd[nvinfer1::Dims::MAX_DIMS];
        if (!copyDims(x, xd)) return kBAD_X_RANK;
        if (!copyDims(second, sd)) return Op::kBadSecondRank;
        return Op::inferShape(attrs, xd, x.nbDims, sd, second.nbDims, out);
    }

    //! "name=value" of each int field, comma-separated (the timing cache ID and the metadata string).
    static std::string cacheId(Attrs const& attrs) {
        std::string out;
        for (auto const& field : Op::kIntFields)
            out += (out.empty() ? "" : ",") + std::string(field.name) + "=" + std::to_string(attrs.*field.member);
        return out;
    }

    //! Logs an error about this layer and returns TensorRT's "failed" (non-zero).
    int32_t fail(std::string const& what) const noexcept { return failOp(Op::kName, mName, what); }
    int32_t failInputs(char const* inputs) const noexcept {
        return fail(std::string("takes 2 ") + inputs + " (tokens, " + Op::kSecondInput + ") and gives 1 output");
    }

    std::string mName;  // the layer (ONNX node) name, for messages
    Attrs mAttrs;
    std::string mCacheId;
    std::array<uint8_t, Op::kSerializedBytes> mState{};
    std::array<nvinfer1::PluginField, kNbIntFields + 1> mFields{};
    nvinfer1::PluginFieldCollection mCollection{0, nullptr};
};

//! The creator of Plugin<Op>: what the ONNX parser looks up (name, version, namespace, field names) and
//! createPlugin for both phases.
template <class Op>
class Creator final : public nvinfer1::IPluginCreatorV3One {
public:
    using Attrs = typename Op::Attrs;
    static constexpr size_t kNbIntFields = std::size(Op::kIntFields);

    Creator() {
        for (size_t i = 0; i < kNbIntFields; ++i)
            mFieldNames[i] =
                nvinfer1::PluginField(Op::kIntFields[i].name, nullptr, nvinfer1::PluginFieldType::kINT32, 1);
        mCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
        mCollection.fields = mFieldNames.data();
    }

    char const* getPluginName() const noexcept override { return Op::kName; }
    char const* getPluginVersion() const noexcept override { return Op::kVersion; }
    char const* getPluginNamespace() const noexcept override { return Op::kNamespace; }

    // What the ONNX parser reads from the node: its INT attributes (Op::kIntFields, all required).
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mCollection; }

    // kBUILD: the int fields from the ONNX node (or a network built by hand). kRUNTIME: what
    // getFieldsToSerialize wrote; the versioned record must be there and agree with the int fields.
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                      nvinfer1::TensorRTPhase phase) noexcept override {
        std::string const who = name ? name : "";
        try {
            if (!fc || (fc->nbFields > 0 && !fc->fields))
                return failNull(who, "createPlugin without a field collection");
            std::array<bool, kNbIntFields> has{};
            bool hasState = false;
            Attrs fromInts, fromState;
            for (int32_t i = 0; i < fc->nbFields; ++i) {
                nvinfer1::PluginField const& f = fc->fields[i];
                if (!f.name) continue;
                size_t k = 0;
                while (k < kNbIntFields && std::strcmp(f.name, Op::kIntFields[k].name) != 0) ++k;
                if (k < kNbIntFields) {
                    if (!readInt(f, &(fromInts.*Op::kIntFields[k].member)))
                        return failNull(who, std::string("attribute ") + f.name + " must be one integer");
                    has[k] = true;
                } else if (std::strcmp(f.name, Op::kFieldState) == 0) {
                    if (f.length < 0) return failNull(who, "bad vitfold_state field");
                    Status const s =
                        Op::deserialize(static_cast<uint8_t const*>(f.data), static_cast<size_t>(f.length), &fromState);
                    if (s != kOK) return failNull(who, std::string("serialised attributes: ") + statusMessage(s));
                    hasState = true;
                }  // other fields: ignored (none are written or advertised)
            }
            Attrs attrs;
            bool hasAll = true, disagree = false;
            for (size_t k = 0; k < kNbIntFields; ++k) {
                int32_t Attrs::*member = Op::kIntFields[k].member;
                hasAll = hasAll && has[k];
                disagree = disagree || (has[k] && fromInts.*member != fromState.*member);
            }
            if (hasState) {
                if (disagree)
                    return failNull(who, "serialised attributes disagree with the " + fieldNames<Op>(" / ", " / ") +
                                             " fields");
                attrs = fromState;
            } else if (phase == nvinfer1::TensorRTPhase::kRUNTIME) {
                return failNull(who, "the engine has no vitfold_state field: it was not serialised by this plugin; "
                                     "rebuild the engine");
            } else if (hasAll) {
                attrs = fromInts;
            } else {
                return failNull(who, "the node needs integer attributes " + fieldNames<Op>(", ", " and "));
            }
            if (Status const s = Op::validateAttrs(attrs); s != kOK) return failNull(who, statusMessage(s));
            return new Plugin<Op>(who, attrs);
        } catch (std::exception const& e) {
            failOp(Op::kName, who, std::string("createPlugin failed: ") + e.what());
        }
        return nullptr;
    }

private:
    static nvinfer1::IPluginV3* failNull(std::string const& who, std::string const& what) noexcept {
        failOp(Op::kName, who, what);
        return nullptr;
    }

    std::array<nvinfer1::PluginField, kNbIntFields> mFieldNames{};
    nvinfer1::PluginFieldCollection mCollection{0, nullptr};
};

}  // namespace plugin
}  // namespace trt
}  // namespace vitfold

#endif  // VITFOLD_TRT_PLUGIN_COMMON_H
