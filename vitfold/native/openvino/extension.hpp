// vitfold's OpenVINO extension: each op file returns its op and ONNX frontend mapping; extension.cpp
// registers them all from one library.
#pragma once

#include <vector>

#include <openvino/core/extension.hpp>

std::vector<ov::Extension::Ptr> tome_extensions();   // tome_op.cpp: vitfold.ToMeMerge, vitfold.ToMeMergeWavg
std::vector<ov::Extension::Ptr> prune_extensions();  // prune_op.cpp: vitfold.EViTPrune
