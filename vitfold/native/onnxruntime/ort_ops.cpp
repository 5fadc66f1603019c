// The library's entry point for ONNX Runtime (SessionOptions.register_custom_ops_library, or
// RegisterCustomOpsLibrary_V2 in C): the domain "vitfold" with ToMeMerge, ToMeMergeWavg and EViTPrune.
#include "ort_common.h"

namespace vitfold_ort {
const OrtCustomOp* tome_op();
const OrtCustomOp* tome_wavg_op();
const OrtCustomOp* prune_op();
}  // namespace vitfold_ort

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                            const OrtApiBase* base) {
    using namespace vitfold_ort;
    const OrtApi* api = base->GetApi(kApiVersion);
    if (api == nullptr) {  // older than 1.17: the first API version has CreateStatus
        const OrtApi* first = base->GetApi(1);
        const std::string message = std::string("vitfold's ops need ONNX Runtime 1.17 or newer; this is ") + base->GetVersionString();
        return first->CreateStatus(ORT_FAIL, message.c_str());
    }
    // One domain per registration, kept for the process's life: ONNX Runtime holds on to it for every
    // session made from these options, and releasing it at exit could outlive ONNX Runtime itself.
    OrtCustomOpDomain* domain = nullptr;
    VITFOLD_ORT_TRY(api->CreateCustomOpDomain("vitfold", &domain));
    OrtStatus* status = api->CustomOpDomain_Add(domain, tome_op());
    if (!status) status = api->CustomOpDomain_Add(domain, tome_wavg_op());
    if (!status) status = api->CustomOpDomain_Add(domain, prune_op());
    if (!status) status = api->AddCustomOpDomain(options, domain);
    if (status) api->ReleaseCustomOpDomain(domain);  // not handed to ONNX Runtime
    return status;
}
