// What vitfold's ONNX Runtime ops share: the C API version they ask for, float32 inputs, integer
// attributes, ONNX Runtime's intra-op threads, and OrtCustomOp filled in for one kernel type.
// Written against ONNX Runtime's C API (onnxruntime_c_api.h) alone: the library links nothing of ONNX
// Runtime and gets its function table from RegisterCustomOps (ort_ops.cpp).
#pragma once

#include <atomic>
#include <climits>
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include <onnxruntime_c_api.h>

#if ORT_API_VERSION < 17
#error "vitfold's ONNX Runtime ops need the C API header of ONNX Runtime 1.17 or newer (KernelContext_ParallelFor)"
#endif

namespace vitfold_ort {

// The C API version the ops ask for: 17 (ONNX Runtime 1.17) brings KernelContext_ParallelFor.
constexpr uint32_t kApiVersion = 17;

// Returns its status from the enclosing function unless it is success (nullptr).
#define VITFOLD_ORT_TRY(expr)                    \
    do {                                         \
        if (OrtStatus* status_ = (expr)) return status_; \
    } while (0)

inline OrtStatus* invalid(const OrtApi* api, const std::string& message) {
    return api->CreateStatus(ORT_INVALID_ARGUMENT, message.c_str());
}

// A float32 input of the kernel's context: its data and dims.
struct Input {
    const float* data = nullptr;
    std::vector<int64_t> dims;
};

inline OrtStatus* read_input(const OrtApi* api, OrtKernelContext* context, size_t index, Input* out) {
    const OrtValue* value = nullptr;
    VITFOLD_ORT_TRY(api->KernelContext_GetInput(context, index, &value));
    OrtTensorTypeAndShapeInfo* info = nullptr;
    VITFOLD_ORT_TRY(api->GetTensorTypeAndShape(value, &info));
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    size_t rank = 0;
    OrtStatus* status = api->GetTensorElementType(info, &type);
    if (!status) status = api->GetDimensionsCount(info, &rank);
    if (!status) {
        out->dims.assign(rank, 0);
        status = api->GetDimensions(info, out->dims.data(), rank);
    }
    api->ReleaseTensorTypeAndShapeInfo(info);
    if (status) return status;
    if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return invalid(api, "vitfold's ops take float32 tensors");
    void* data = nullptr;
    VITFOLD_ORT_TRY(api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
    out->data = static_cast<const float*>(data);
    return nullptr;
}

// The output `index` of the context, allocated with `dims`.
inline OrtStatus* make_output(const OrtApi* api, OrtKernelContext* context, size_t index, const std::vector<int64_t>& dims,
                              float** out) {
    OrtValue* value = nullptr;
    VITFOLD_ORT_TRY(api->KernelContext_GetOutput(context, index, dims.data(), dims.size(), &value));
    void* data = nullptr;
    VITFOLD_ORT_TRY(api->GetTensorMutableData(value, &data));
    *out = static_cast<float*>(data);
    return nullptr;
}

inline OrtStatus* int_attribute(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t* out) {
    return api->KernelInfoGetAttribute_int64(info, name, out);
}

// Runs fn(i) for i in [0, total) on ONNX Runtime's intra-op threads (inline with one thread). An
// exception (an allocation failing) must not cross ONNX Runtime's C frames: it becomes a failed status.
template <typename F>
OrtStatus* parallel_for(const OrtApi* api, const OrtKernelContext* context, size_t total, const F& fn) {
    struct Call {
        const F& fn;
        std::atomic<bool> failed{false};
    } call{fn};
    auto run = [](void* data, size_t i) {
        Call& c = *static_cast<Call*>(data);
        try {
            c.fn(i);
        } catch (...) {
            c.failed = true;
        }
    };
    if (total <= 1) {
        for (size_t i = 0; i < total; ++i) run(&call, i);
    } else {
        VITFOLD_ORT_TRY(api->KernelContext_ParallelFor(context, run, total, 0, &call));
    }
    return call.failed ? api->CreateStatus(ORT_FAIL, "a vitfold op failed on a worker thread (out of memory)") : nullptr;
}

// Runs body() and turns an exception it throws into a failed status.
template <typename Body>
OrtStatus* guarded(const OrtApi* api, const Body& body) {
    try {
        return body();
    } catch (const std::exception& exc) {
        return api->CreateStatus(ORT_FAIL, exc.what());
    } catch (...) {
        return api->CreateStatus(ORT_FAIL, "a vitfold op failed");
    }
}

// OrtCustomOp for a kernel type K: a CPU op of domain "vitfold" named K::kName, with K::kInputs
// required float32 inputs and K::kOutputs float32 outputs. K provides
//   static OrtStatus* create(const OrtApi*, const OrtKernelInfo*, K** out)   (attributes, checks)
//   OrtStatus* compute(OrtKernelContext*)
// Kernels are created and run through the status-returning V2 entry points (API 16+).
template <typename K>
struct CustomOp : OrtCustomOp {
    CustomOp() : OrtCustomOp{} {
        version = kApiVersion;
        GetName = [](const OrtCustomOp*) { return K::kName; };
        GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return nullptr; };  // CPU
        GetInputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
        GetInputTypeCount = [](const OrtCustomOp*) { return K::kInputs; };
        GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
        GetOutputTypeCount = [](const OrtCustomOp*) { return K::kOutputs; };
        KernelDestroy = [](void* kernel) { delete static_cast<K*>(kernel); };
        GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
        GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
        GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
        GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
        GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
        GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
        GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
        CreateKernelV2 = [](const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** kernel) -> OrtStatus* {
            return guarded(api, [&]() -> OrtStatus* {
                K* made = nullptr;
                VITFOLD_ORT_TRY(K::create(api, info, &made));
                *kernel = made;
                return nullptr;
            });
        };
        KernelComputeV2 = [](void* kernel, OrtKernelContext* context) {
            const K& k = *static_cast<K*>(kernel);
            return guarded(k.api, [&] { return k.compute(context); });
        };
        GetStartVersion = [](const OrtCustomOp*) { return 1; };
        GetEndVersion = [](const OrtCustomOp*) { return INT_MAX; };
    }
};

}  // namespace vitfold_ort
