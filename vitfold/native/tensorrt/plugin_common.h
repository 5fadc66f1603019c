// What vitfold's two TensorRT plugins (ToMeMerge: tome_plugin.cpp, EViTPrune: prune_plugin.cpp) share:
// logging through the ILoggerFinder TensorRT hands to setLoggerFinder, the error helper, dims and
// field readers, and the creator accessor that getCreators (tome_plugin.cpp) lists. Needs the TensorRT
// headers (NvInferRuntime.h); used by the plugin library only, not by the GPU-free core.
#ifndef VITFOLD_TRT_PLUGIN_COMMON_H
#define VITFOLD_TRT_PLUGIN_COMMON_H

#include <NvInferRuntime.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <cstring>
#include <string>

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

}  // namespace plugin
}  // namespace trt
}  // namespace vitfold

#endif  // VITFOLD_TRT_PLUGIN_COMMON_H
