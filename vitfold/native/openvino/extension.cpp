// The library's one entry point (OpenVINO's Core.add_extension reads it): every vitfold op.
#include <openvino/core/extension.hpp>

#include "extension.hpp"

namespace {

std::vector<ov::Extension::Ptr> all_extensions() {
    std::vector<ov::Extension::Ptr> out = tome_extensions();
    for (auto& extension : prune_extensions()) out.push_back(extension);
    return out;
}

}  // namespace

OPENVINO_CREATE_EXTENSIONS(all_extensions());
