// Host-side check of the built plugin library (libvitfold_trt_plugin.so: ToMeMerge and EViTPrune) without
// TensorRT's library and without a GPU: it dlopens the plugin, calls getCreators / setLoggerFinder as
// IPluginRegistry::loadLibrary would, creates plugins from the fields the ONNX parser builds (kINT32 r,
// num_protected; keep, num_protected, fuse; TensorRTPhase::kBUILD), and drives the build and runtime
// interfaces with fake
// dimension expressions. Nothing here launches a kernel (enqueue is only called with null tensors,
// which the plugin must refuse). tests/test_tensorrt_plugin.py compiles and runs it when nvcc and the
// TensorRT headers are there:
//
//     g++ -std=c++17 -I<TensorRT include> -I<CUDA include> plugin_host_check.cpp -ldl -o check
//     ./check /path/to/libvitfold_trt_plugin.so      # prints "ok ..." lines, exits 1 on any failure
//
// The fake IExprBuilder subclasses TensorRT's expression classes (which applications must not do);
// it is a test double for this check only. Part of vitfold's TensorRT plugins ToMeMerge (ToMe, Bolya
// et al., ICLR 2023, Sec. 3; mirrors ../openvino/tome_op.cpp) and EViTPrune (EViT, Liang et al., ICLR
// 2022, Sec. 3; mirrors ../openvino/prune_op.cpp).
#include "prune_plugin_core.h"
#include "tome_plugin_core.h"

#include <NvInferRuntime.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace {

using namespace nvinfer1;
namespace core = vitfold::trt;

int gFailures = 0;

void check(bool ok, std::string const& what, std::string const& detail = "") {
    if (ok) {
        std::printf("ok %s\n", what.c_str());
    } else {
        std::printf("FAIL %s %s\n", what.c_str(), detail.c_str());
        ++gFailures;
    }
}

class CapturingLogger : public ILogger {
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override {
        if (severity <= Severity::kWARNING) messages.emplace_back(msg);
    }
    std::vector<std::string> messages;
};

class Finder : public ILoggerFinder {
public:
    ILogger* findLogger() override { return &logger; }
    CapturingLogger logger;
};

// A dimension expression: a constant, a symbol (unknown at build time), or first - second.
class FakeExpr final : public apiv::VDimensionExpr {
public:
    FakeExpr(bool constant, int64_t value, std::string text)
        : mConstant(constant), mValue(value), text(std::move(text)) {}
    bool isConstant() const override { return mConstant; }
    int64_t getConstantValue() const override { return mConstant ? mValue : INT64_MIN; }
    bool isSizeTensor() const override { return false; }
    bool mConstant;
    int64_t mValue;
    std::string text;
};

class Expr final : public IDimensionExpr {
public:
    explicit Expr(FakeExpr* impl) { mImpl = impl; }
    FakeExpr const& fake() const { return *static_cast<FakeExpr*>(mImpl); }
};

class FakeBuilderImpl final : public apiv::VExprBuilder {
public:
    IDimensionExpr const* constant(int64_t value) override { return make(true, value, std::to_string(value)); }
    IDimensionExpr const* symbol(std::string const& name) { return make(false, 0, name); }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override {
        FakeExpr const& x = static_cast<Expr const&>(a).fake();
        FakeExpr const& y = static_cast<Expr const&>(b).fake();
        if (op != DimensionOperation::kSUB) return nullptr;  // the plugin only subtracts
        if (x.mConstant && y.mConstant) return make(true, x.mValue - y.mValue, std::to_string(x.mValue - y.mValue));
        return make(false, 0, "(" + x.text + " - " + y.text + ")");
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override {
        return nullptr;
    }

private:
    IDimensionExpr const* make(bool constant, int64_t value, std::string text) {
        mFakes.push_back(std::make_unique<FakeExpr>(constant, value, std::move(text)));
        mExprs.push_back(std::make_unique<Expr>(mFakes.back().get()));
        return mExprs.back().get();
    }
    std::vector<std::unique_ptr<FakeExpr>> mFakes;
    std::vector<std::unique_ptr<Expr>> mExprs;
};

class FakeBuilder final : public IExprBuilder {
public:
    FakeBuilder() { mImpl = &impl; }
    FakeBuilderImpl impl;
};

std::string text(IDimensionExpr const* e) { return e ? static_cast<Expr const*>(e)->fake().text : "null"; }

DimsExprs dimsExprs(FakeBuilder& b, std::vector<std::string> const& dims) {
    DimsExprs out{};
    out.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i) {
        char* end = nullptr;
        long long v = std::strtoll(dims[i].c_str(), &end, 10);
        out.d[i] = *end == '\0' ? b.impl.constant(v) : b.impl.symbol(dims[i]);
    }
    return out;
}

Dims dims(std::vector<int64_t> const& d) {
    Dims out{};
    out.nbDims = static_cast<int32_t>(d.size());
    for (size_t i = 0; i < d.size(); ++i) out.d[i] = d[i];
    return out;
}

DynamicPluginTensorDesc dynamicDesc(std::vector<int64_t> const& d, std::vector<int64_t> const& lo,
                                    std::vector<int64_t> const& hi, DataType type = DataType::kFLOAT) {
    DynamicPluginTensorDesc desc{};
    desc.desc.dims = dims(d);
    desc.desc.type = type;
    desc.desc.format = TensorFormat::kLINEAR;
    desc.min = dims(lo);
    desc.opt = dims(hi);
    desc.max = dims(hi);
    return desc;
}

PluginTensorDesc desc(std::vector<int64_t> const& d) {
    PluginTensorDesc out{};
    out.dims = dims(d);
    out.type = DataType::kFLOAT;
    out.format = TensorFormat::kLINEAR;
    out.scale = -1.f;
    return out;
}

// Fields as onnx-tensorrt's loadFields builds them from INT attributes: kINT32, length 1.
struct Fields {
    std::vector<int32_t> values;
    std::vector<PluginField> fields;
    PluginFieldCollection fc{};
    Fields(std::vector<std::pair<char const*, int32_t>> const& attrs) {
        values.reserve(attrs.size());
        for (auto const& a : attrs) {
            values.push_back(a.second);
            fields.emplace_back(a.first, &values.back(), PluginFieldType::kINT32, 1);
        }
        fc.nbFields = static_cast<int32_t>(fields.size());
        fc.fields = fields.data();
    }
};

int32_t fieldInt(PluginFieldCollection const* fc, char const* name) {
    for (int32_t i = 0; fc && i < fc->nbFields; ++i)
        if (std::strcmp(fc->fields[i].name, name) == 0 && fc->fields[i].type == PluginFieldType::kINT32)
            return *static_cast<int32_t const*>(fc->fields[i].data);
    return -12345;
}

//! The bytes of the vitfold_state field (the versioned record); empty when there is none.
std::vector<uint8_t> stateOf(PluginFieldCollection const* fc) {
    std::vector<uint8_t> state;
    for (int32_t i = 0; fc && i < fc->nbFields; ++i)
        if (std::strcmp(fc->fields[i].name, "vitfold_state") == 0) {
            auto const* bytes = static_cast<uint8_t const*>(fc->fields[i].data);
            state.assign(bytes, bytes + fc->fields[i].length);
        }
    return state;
}

//! createPlugin(kRUNTIME) from int fields next to a vitfold_state record.
IPluginV3* createWithState(IPluginCreatorV3One* creator, Fields const& ints, std::vector<uint8_t>& state) {
    std::vector<PluginField> mixed(ints.fields);
    mixed.emplace_back("vitfold_state", state.data(), PluginFieldType::kUNKNOWN, static_cast<int32_t>(state.size()));
    PluginFieldCollection fc{static_cast<int32_t>(mixed.size()), mixed.data()};
    return creator->createPlugin("x", &fc, TensorRTPhase::kRUNTIME);
}

IPluginV3OneRuntime* runtimeOf(IPluginV3* plugin) {
    return plugin ? static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME))
                  : nullptr;
}

//! A plugin's capability interfaces, checked: all three there, of TensorRT's kinds, named as the creator.
//! All null when one is missing. `prefix` starts each check's line ("EViTPrune: ").
struct Capabilities {
    IPluginV3OneCore* core = nullptr;
    IPluginV3OneBuild* build = nullptr;
    IPluginV3OneRuntime* runtime = nullptr;
};

Capabilities capabilities(IPluginV3& plugin, char const* name, std::string const& prefix) {
    Capabilities c;
    c.core = static_cast<IPluginV3OneCore*>(plugin.getCapabilityInterface(PluginCapabilityType::kCORE));
    c.build = static_cast<IPluginV3OneBuild*>(plugin.getCapabilityInterface(PluginCapabilityType::kBUILD));
    c.runtime = runtimeOf(&plugin);
    check(c.core && c.build && c.runtime, prefix + "core, build and runtime capabilities");
    if (!c.core || !c.build || !c.runtime) return Capabilities{};
    check(std::strcmp(c.core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0 &&
              std::strcmp(c.build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0 &&
              std::strcmp(c.runtime->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0,
          prefix + "capability kinds");
    check(std::strcmp(c.core->getPluginName(), name) == 0 && std::strcmp(c.core->getPluginVersion(), "1") == 0,
          prefix + "plugin name and version match the creator");
    return c;
}

//! float32 linear is supported at every position of io; a float16 input `half` and an output of another
//! format are refused.
void checkFormats(IPluginV3OneBuild* build, DynamicPluginTensorDesc const (&io)[3], int32_t half, TensorFormat format,
                  std::string const& prefix) {
    bool all = true;
    for (int32_t pos = 0; pos < 3; ++pos) all = all && build->supportsFormatCombination(pos, io, 2, 1);
    check(all, prefix + "float32 linear supported at every position");
    DynamicPluginTensorDesc halfIo[3] = {io[0], io[1], io[2]};
    halfIo[half].desc.type = DataType::kHALF;
    halfIo[2].desc.format = format;
    check(!build->supportsFormatCombination(half, halfIo, 2, 1) && !build->supportsFormatCombination(2, halfIo, 2, 1),
          prefix + "float16 and non-linear formats refused");
}

//! clone and attachToContext give plugins, and the clone keeps the int field `field` (= value).
void checkClone(IPluginV3& plugin, IPluginV3OneRuntime* runtime, char const* field, int32_t value,
                std::string const& prefix) {
    std::unique_ptr<IPluginV3> copy(plugin.clone());
    std::unique_ptr<IPluginV3> attached(runtime->attachToContext(nullptr));
    check(copy && attached, prefix + "clone and attachToContext");
    if (copy) check(fieldInt(runtimeOf(copy.get())->getFieldsToSerialize(), field) == value,
                    prefix + "the clone keeps " + field);
}

// ------------------------------------------------------------------------------------------- EViTPrune
// The second creator of the library: fields keep / num_protected / fuse, output [B, P + keep + fuse, C]
// (a constant token count, also for a symbolic N), refusals, formats, workspace, serialisation.
void checkPrune(IPluginCreatorV3One* creator, std::vector<std::string> const& messages) {
    namespace prune = vitfold::trt::prune;
    check(std::strcmp(creator->getPluginName(), "EViTPrune") == 0 &&
              std::strcmp(creator->getPluginVersion(), "1") == 0 && std::strcmp(creator->getPluginNamespace(), "") == 0,
          "EViTPrune: creator name EViTPrune, version 1, namespace empty");
    PluginFieldCollection const* names = creator->getFieldNames();
    bool namesOk = names && names->nbFields == 3;
    char const* expected[3] = {"keep", "num_protected", "fuse"};
    for (int32_t i = 0; namesOk && i < 3; ++i)
        namesOk = std::strcmp(names->fields[i].name, expected[i]) == 0 &&
            names->fields[i].type == PluginFieldType::kINT32;
    check(namesOk, "EViTPrune: field names keep, num_protected, fuse (kINT32)");

    Fields parser({{"keep", 5}, {"num_protected", 1}, {"fuse", 1}});
    std::unique_ptr<IPluginV3> plugin(creator->createPlugin("blocks.3/EViTPrune", &parser.fc, TensorRTPhase::kBUILD));
    check(plugin != nullptr, "EViTPrune: createPlugin(kBUILD) from parser fields");
    if (!plugin) return;
    for (auto bad : {std::vector<std::pair<char const*, int32_t>>{{"keep", 5}, {"num_protected", 1}},
                     std::vector<std::pair<char const*, int32_t>>{{"keep", 0}, {"num_protected", 1}, {"fuse", 1}},
                     std::vector<std::pair<char const*, int32_t>>{{"keep", 5}, {"num_protected", -1}, {"fuse", 0}},
                     std::vector<std::pair<char const*, int32_t>>{{"keep", 5}, {"num_protected", 1}, {"fuse", 2}}}) {
        Fields f(bad);
        size_t const before = messages.size();
        IPluginV3* p = creator->createPlugin("bad", &f.fc, TensorRTPhase::kBUILD);
        check(p == nullptr && messages.size() > before,
              "EViTPrune: createPlugin refuses missing fuse, keep 0, negative num_protected, fuse 2; logs why",
              messages.empty() ? "" : messages.back());
        delete p;
    }
    {
        int64_t k64 = 4, p64 = 5, f64 = 0;
        PluginField fields[3] = {PluginField("keep", &k64, PluginFieldType::kINT64, 1),
                                 PluginField("num_protected", &p64, PluginFieldType::kINT64, 1),
                                 PluginField("fuse", &f64, PluginFieldType::kINT64, 1)};
        PluginFieldCollection fc{3, fields};
        std::unique_ptr<IPluginV3> p(creator->createPlugin("int64", &fc, TensorRTPhase::kBUILD));
        check(p != nullptr, "EViTPrune: createPlugin takes kINT64 fields too");
    }

    Capabilities const caps = capabilities(*plugin, "EViTPrune", "EViTPrune: ");
    IPluginV3OneBuild* build = caps.build;
    IPluginV3OneRuntime* runtime = caps.runtime;
    if (!build || !runtime) return;

    check(build->getNbOutputs() == 1, "EViTPrune: one output");
    DataType in2[2] = {DataType::kFLOAT, DataType::kFLOAT}, outType = DataType::kHALF;
    check(build->getOutputDataTypes(&outType, 1, in2, 2) == 0 && outType == DataType::kFLOAT,
          "EViTPrune: float32 output");
    DataType half2[2] = {DataType::kFLOAT, DataType::kHALF};
    check(build->getOutputDataTypes(&outType, 1, half2, 2) != 0, "EViTPrune: refuses float16 attention");
    {
        FakeBuilder eb;
        DimsExprs out{};
        DimsExprs ins[2] = {dimsExprs(eb, {"B", "17", "8"}), dimsExprs(eb, {"B", "17"})};
        check(build->getOutputShapes(ins, 2, nullptr, 0, &out, 1, eb) == 0 && out.nbDims == 3 &&
                  out.d[0] == ins[0].d[0] && text(out.d[1]) == "7" && out.d[2] == ins[0].d[2],
              "EViTPrune: output shape [B, 1 + 5 + 1, C]",
              text(out.d[0]) + "," + text(out.d[1]) + "," + text(out.d[2]));
        DimsExprs sym[2] = {dimsExprs(eb, {"2", "N", "8"}), dimsExprs(eb, {"2", "N"})};
        check(build->getOutputShapes(sym, 2, nullptr, 0, &out, 1, eb) == 0 && text(out.d[1]) == "7" &&
                  out.d[1]->isConstant(),
              "EViTPrune: output N is the constant P + keep + fuse, also for a symbolic N", text(out.d[1]));
        DimsExprs least[2] = {dimsExprs(eb, {"2", "7", "8"}), dimsExprs(eb, {"2", "7"})};
        check(build->getOutputShapes(least, 2, nullptr, 0, &out, 1, eb) == 0,
              "EViTPrune: accepts keep 5 = 7 - 1 - 1 (one token left out)");
        DimsExprs small[2] = {dimsExprs(eb, {"2", "6", "8"}), dimsExprs(eb, {"2", "6"})};
        check(build->getOutputShapes(small, 2, nullptr, 0, &out, 1, eb) != 0,
              "EViTPrune: refuses keep 5 > 6 - 1 - 1 with constant N");
        DimsExprs otherN[2] = {dimsExprs(eb, {"2", "7", "8"}), dimsExprs(eb, {"2", "8"})};
        check(build->getOutputShapes(otherN, 2, nullptr, 0, &out, 1, eb) != 0,
              "EViTPrune: refuses tokens and attention of other N");
        DimsExprs rank3[2] = {dimsExprs(eb, {"2", "17", "8"}), dimsExprs(eb, {"2", "1", "17"})};
        check(build->getOutputShapes(rank3, 2, nullptr, 0, &out, 1, eb) != 0, "EViTPrune: refuses rank-3 attention");
        DimsExprs batch[2] = {dimsExprs(eb, {"2", "17", "8"}), dimsExprs(eb, {"3", "17"})};
        check(build->getOutputShapes(batch, 2, nullptr, 0, &out, 1, eb) != 0,
              "EViTPrune: refuses tokens and attention of other B");
    }
    {
        DynamicPluginTensorDesc io[3] = {dynamicDesc({-1, 17, 8}, {1, 17, 8}, {4, 17, 8}),
                                         dynamicDesc({-1, 17}, {1, 17}, {4, 17}),
                                         dynamicDesc({-1, 7, 8}, {1, 7, 8}, {4, 7, 8})};
        checkFormats(build, io, 1, TensorFormat::kCHW32, "EViTPrune: ");
        check(build->configurePlugin(io, 2, io + 2, 1) == 0, "EViTPrune: configurePlugin accepts a valid profile");
        DynamicPluginTensorDesc tight[3] = {dynamicDesc({2, -1, 8}, {2, 6, 8}, {2, 17, 8}),
                                            dynamicDesc({2, -1}, {2, 6}, {2, 17}), io[2]};
        check(build->configurePlugin(tight, 2, tight + 2, 1) != 0,
              "EViTPrune: configurePlugin refuses a profile whose min N leaves no token out");
        size_t const ws = build->getWorkspaceSize(io, 2, io + 2, 1);
        check(ws == static_cast<size_t>(prune::workspaceBytes(4, 17, 1)) && ws > 0,
              "EViTPrune: workspace for the profile's max dims", std::to_string(ws));
    }
    {
        PluginTensorDesc in[2] = {desc({2, 17, 8}), desc({2, 17})}, out[1] = {desc({2, 7, 8})};
        check(runtime->onShapeChange(in, 2, out, 1) == 0, "EViTPrune: onShapeChange accepts [2, 17, 8] -> [2, 7, 8]");
        PluginTensorDesc wrong[1] = {desc({2, 6, 8})};
        check(runtime->onShapeChange(in, 2, wrong, 1) != 0, "EViTPrune: onShapeChange refuses a wrong output shape");
        void const* nullIn[2] = {nullptr, nullptr};
        void* nullOut[1] = {nullptr};
        check(runtime->enqueue(in, out, nullIn, nullOut, nullptr, nullptr) != 0,
              "EViTPrune: enqueue refuses null tensors");
    }

    PluginFieldCollection const* saved = runtime->getFieldsToSerialize();
    check(saved && saved->nbFields == 4 && fieldInt(saved, "keep") == 5 && fieldInt(saved, "num_protected") == 1 &&
              fieldInt(saved, "fuse") == 1,
          "EViTPrune: serialises keep, num_protected and fuse as kINT32 fields");
    std::vector<uint8_t> state = stateOf(saved);
    prune::Attrs decoded;
    check(saved && prune::deserialize(state.data(), state.size(), &decoded) == vitfold::trt::kOK &&
              decoded.keep == 5 && decoded.numProtected == 1 && decoded.fuse == 1 &&
              std::memcmp(state.data(), "VEVP", 4) == 0,
          "EViTPrune: serialises the versioned record (vitfold_state, VEVP)");
    std::unique_ptr<IPluginV3> again(creator->createPlugin("blocks.3/EViTPrune", saved, TensorRTPhase::kRUNTIME));
    auto* rt = runtimeOf(again.get());
    PluginFieldCollection const* resaved = rt ? rt->getFieldsToSerialize() : nullptr;
    check(resaved && fieldInt(resaved, "keep") == 5 && fieldInt(resaved, "num_protected") == 1 &&
              fieldInt(resaved, "fuse") == 1,
          "EViTPrune: createPlugin(kRUNTIME) restores the serialised plugin");
    IPluginV3* noState = creator->createPlugin("x", &parser.fc, TensorRTPhase::kRUNTIME);
    check(noState == nullptr, "EViTPrune: kRUNTIME without vitfold_state refused");
    delete noState;
    uint8_t tome[vitfold::trt::kSerializedBytes];
    size_t written = 0;
    vitfold::trt::serialize(vitfold::trt::Attrs{5, 1}, tome, sizeof tome, &written);
    PluginField foreign[1] = {
        PluginField("vitfold_state", tome, PluginFieldType::kUNKNOWN, static_cast<int32_t>(written))};
    PluginFieldCollection fcForeign{1, foreign};
    IPluginV3* fromTome = creator->createPlugin("x", &fcForeign, TensorRTPhase::kRUNTIME);
    check(fromTome == nullptr, "EViTPrune: kRUNTIME refuses a ToMeMerge record (magic VTMM)");
    delete fromTome;
    IPluginV3* mismatch = createWithState(creator, Fields({{"keep", 5}, {"num_protected", 1}, {"fuse", 0}}), state);
    check(mismatch == nullptr, "EViTPrune: kRUNTIME refuses int fields that disagree with the record");
    delete mismatch;

    checkClone(*plugin, runtime, "keep", 5, "EViTPrune: ");
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s libvitfold_trt_plugin.so\n", argv[0]);
        return 2;
    }
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        std::printf("FAIL dlopen %s\n", dlerror());
        return 1;
    }
    using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(lib, "setLoggerFinder"));
    check(getCreators && setLoggerFinder, "exports getCreators and setLoggerFinder");
    if (!getCreators || !setLoggerFinder) return 1;
    static Finder finder;
    setLoggerFinder(&finder);
    auto& messages = finder.logger.messages;

    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    check(n == 2 && creators && creators[0] && creators[1], "two creators (ToMeMerge, EViTPrune)");
    if (n != 2 || !creators || !creators[0] || !creators[1]) return 1;
    check(std::strcmp(creators[0]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0 &&
              std::strcmp(creators[1]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0,
          "creator kinds are PLUGIN CREATOR_V3ONE (the parser's V3 path)");
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    check(std::strcmp(creator->getPluginName(), "ToMeMerge") == 0 &&
              std::strcmp(creator->getPluginVersion(), "1") == 0 && std::strcmp(creator->getPluginNamespace(), "") == 0,
          "creator name ToMeMerge, version 1, namespace empty (the parser's defaults)");
    PluginFieldCollection const* names = creator->getFieldNames();
    check(names && names->nbFields == 2 && std::strcmp(names->fields[0].name, "r") == 0 &&
              std::strcmp(names->fields[1].name, "num_protected") == 0 &&
              names->fields[0].type == PluginFieldType::kINT32 && names->fields[1].type == PluginFieldType::kINT32,
          "field names r, num_protected (kINT32)");

    // -------------------------------------------------------------------------- creation (build)
    Fields parser({{"r", 3}, {"num_protected", 1}});
    std::unique_ptr<IPluginV3> plugin(creator->createPlugin("blocks.0/ToMeMerge", &parser.fc, TensorRTPhase::kBUILD));
    check(plugin != nullptr, "createPlugin(kBUILD) from parser fields");
    if (!plugin) return 1;
    for (auto bad : {std::vector<std::pair<char const*, int32_t>>{{"r", 3}},
                     std::vector<std::pair<char const*, int32_t>>{{"r", -1}, {"num_protected", 0}},
                     std::vector<std::pair<char const*, int32_t>>{{"r", 1}, {"num_protected", -2}}}) {
        Fields f(bad);
        size_t const before = messages.size();
        IPluginV3* p = creator->createPlugin("bad", &f.fc, TensorRTPhase::kBUILD);
        check(p == nullptr && messages.size() > before, "createPlugin refuses missing / negative attributes, logs why",
              messages.empty() ? "" : messages.back());
        delete p;
    }
    {
        int64_t r64 = 2, p64 = 1;
        PluginField f64[2] = {PluginField("r", &r64, PluginFieldType::kINT64, 1),
                              PluginField("num_protected", &p64, PluginFieldType::kINT64, 1)};
        PluginFieldCollection fc{2, f64};
        std::unique_ptr<IPluginV3> p(creator->createPlugin("int64", &fc, TensorRTPhase::kBUILD));
        check(p != nullptr, "createPlugin takes kINT64 fields too");
        float rf = 2.f;
        PluginField ff[2] = {PluginField("r", &rf, PluginFieldType::kFLOAT32, 1),
                             PluginField("num_protected", &p64, PluginFieldType::kINT64, 1)};
        PluginFieldCollection fcf{2, ff};
        std::unique_ptr<IPluginV3> q(creator->createPlugin("float", &fcf, TensorRTPhase::kBUILD));
        check(q == nullptr, "createPlugin refuses a float r");
    }

    Capabilities const caps = capabilities(*plugin, "ToMeMerge", "");
    IPluginV3OneBuild* build = caps.build;
    IPluginV3OneRuntime* runtime = caps.runtime;
    if (!build || !runtime) return 1;

    // -------------------------------------------------------------------------------- build phase
    check(build->getNbOutputs() == 1, "one output");
    DataType in2[2] = {DataType::kFLOAT, DataType::kFLOAT}, outType = DataType::kHALF;
    check(build->getOutputDataTypes(&outType, 1, in2, 2) == 0 && outType == DataType::kFLOAT, "float32 output");
    DataType half2[2] = {DataType::kHALF, DataType::kFLOAT};
    check(build->getOutputDataTypes(&outType, 1, half2, 2) != 0, "refuses float16 inputs");

    {
        FakeBuilder eb;
        DimsExprs ins[2] = {dimsExprs(eb, {"B", "17", "8"}), dimsExprs(eb, {"B", "2", "17", "4"})};
        DimsExprs out{};
        int32_t const rc = build->getOutputShapes(ins, 2, nullptr, 0, &out, 1, eb);
        check(rc == 0 && out.nbDims == 3 && out.d[0] == ins[0].d[0] && text(out.d[1]) == "14" &&
                  out.d[2] == ins[0].d[2],
              "output shape [B, 17 - 3, C] with constant N",
              text(out.d[0]) + "," + text(out.d[1]) + "," + text(out.d[2]));
        DimsExprs sym[2] = {dimsExprs(eb, {"2", "N", "8"}), dimsExprs(eb, {"2", "N", "4"})};
        check(build->getOutputShapes(sym, 2, nullptr, 0, &out, 1, eb) == 0 && text(out.d[1]) == "(N - 3)",
              "output N stays symbolic: N - r", text(out.d[1]));
        DimsExprs small[2] = {dimsExprs(eb, {"2", "6", "8"}), dimsExprs(eb, {"2", "6", "4"})};
        check(build->getOutputShapes(small, 2, nullptr, 0, &out, 1, eb) != 0,
              "refuses r = 3 > (6 - 1) / 2 with constant N");
        DimsExprs rank2[2] = {dimsExprs(eb, {"17", "8"}), dimsExprs(eb, {"2", "17", "4"})};
        check(build->getOutputShapes(rank2, 2, nullptr, 0, &out, 1, eb) != 0, "refuses rank-2 tokens");
        DimsExprs otherN[2] = {dimsExprs(eb, {"2", "17", "8"}), dimsExprs(eb, {"2", "16", "4"})};
        check(build->getOutputShapes(otherN, 2, nullptr, 0, &out, 1, eb) != 0, "refuses tokens and keys of other N");
    }

    {
        DynamicPluginTensorDesc io[3] = {dynamicDesc({-1, 17, 8}, {1, 17, 8}, {4, 17, 8}),
                                         dynamicDesc({-1, 2, 17, 4}, {1, 2, 17, 4}, {4, 2, 17, 4}),
                                         dynamicDesc({-1, 14, 8}, {1, 14, 8}, {4, 14, 8})};
        checkFormats(build, io, 0, TensorFormat::kHWC8, "");
        check(build->configurePlugin(io, 2, io + 2, 1) == 0, "configurePlugin accepts a valid profile");
        DynamicPluginTensorDesc tight[3] = {dynamicDesc({2, -1, 8}, {2, 6, 8}, {2, 17, 8}),
                                            dynamicDesc({2, 2, -1, 4}, {2, 2, 6, 4}, {2, 2, 17, 4}), io[2]};
        check(build->configurePlugin(tight, 2, tight + 2, 1) != 0,
              "configurePlugin refuses a profile whose min N is too small");
        size_t const ws = build->getWorkspaceSize(io, 2, io + 2, 1);
        check(ws == static_cast<size_t>(core::workspaceBytes(4, 17, 4)) && ws > 0,
              "workspace for the profile's max dims", std::to_string(ws));
    }

    // ------------------------------------------------------------------------------ runtime phase
    {
        PluginTensorDesc in[2] = {desc({2, 17, 8}), desc({2, 2, 17, 4})}, out[1] = {desc({2, 14, 8})};
        check(runtime->onShapeChange(in, 2, out, 1) == 0, "onShapeChange accepts [2, 17, 8] -> [2, 14, 8]");
        PluginTensorDesc wrong[1] = {desc({2, 15, 8})};
        check(runtime->onShapeChange(in, 2, wrong, 1) != 0, "onShapeChange refuses a wrong output shape");
        void const* nullIn[2] = {nullptr, nullptr};
        void* nullOut[1] = {nullptr};
        check(runtime->enqueue(in, out, nullIn, nullOut, nullptr, nullptr) != 0, "enqueue refuses null tensors");
    }

    PluginFieldCollection const* saved = runtime->getFieldsToSerialize();
    check(saved && saved->nbFields == 3 && fieldInt(saved, "r") == 3 && fieldInt(saved, "num_protected") == 1,
          "serialises r and num_protected as kINT32 fields");
    std::vector<uint8_t> state = stateOf(saved);
    core::Attrs decoded;
    check(saved && core::deserialize(state.data(), state.size(), &decoded) == core::kOK && decoded.r == 3 &&
              decoded.numProtected == 1,
          "serialises the versioned record (vitfold_state)");
    {
        std::unique_ptr<IPluginV3> again(creator->createPlugin("blocks.0/ToMeMerge", saved, TensorRTPhase::kRUNTIME));
        auto* rt = runtimeOf(again.get());
        PluginFieldCollection const* resaved = rt ? rt->getFieldsToSerialize() : nullptr;
        check(resaved && fieldInt(resaved, "r") == 3 && fieldInt(resaved, "num_protected") == 1,
              "createPlugin(kRUNTIME) restores the serialised plugin");
        IPluginV3* noState = creator->createPlugin("x", &parser.fc, TensorRTPhase::kRUNTIME);
        check(noState == nullptr, "kRUNTIME without vitfold_state refused (not serialised by this plugin)");
        delete noState;
        std::vector<uint8_t> future = state;
        future[4] = 2;  // format version 2
        PluginField tampered[1] = {PluginField("vitfold_state", future.data(), PluginFieldType::kUNKNOWN,
                                               static_cast<int32_t>(future.size()))};
        PluginFieldCollection fc{1, tampered};
        IPluginV3* other = creator->createPlugin("x", &fc, TensorRTPhase::kRUNTIME);
        check(other == nullptr, "kRUNTIME refuses an unknown format version");
        delete other;
        IPluginV3* mismatch = createWithState(creator, Fields({{"r", 4}, {"num_protected", 1}}), state);
        check(mismatch == nullptr, "kRUNTIME refuses int fields that disagree with the record");
        delete mismatch;
    }

    checkClone(*plugin, runtime, "r", 3, "");
    plugin.reset();
    checkPrune(static_cast<IPluginCreatorV3One*>(creators[1]), messages);
    std::printf("%s (%d failures)\n", gFailures ? "FAILED" : "PASSED", gFailures);
    return gFailures ? 1 : 0;
}
