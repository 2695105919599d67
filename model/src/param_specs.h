#pragma once
// The list of every parameter of a DeepSeek-V4 model (internal to model/): its official name,
// where the `transformers` layout keeps it, its shape, how the generator initialises it and
// which dtype the official checkpoint stores it in. The loader and the generator both walk
// this one list, so the two layouts and the generated files cannot drift apart.

#include <cstdint>
#include <string>
#include <vector>

#include "dserve/model/config.h"
#include "dserve/model/weights.h"

namespace dserve::model {

enum class CheckpointLayout { kOfficial, kTransformers };

// Distribution of generated values (model_init_values.cc).
enum class ParamInit {
  kEmbed,         // N(0, 1)
  kLinear,        // N(0, 1/fan_in), fan_in = last dim
  kNorm,          // 1 + 0.1 N(0, 1)
  kSink,          // N(0, 1)
  kApe,           // N(0, 0.5^2)
  kHcFn,          // N(0, 0.25/fan_in): mHC logits of order 0.5 whatever the width
  kHcBase,        // N(0, 0.5^2)
  kHcScale,       // 0.5 + 0.1 N(0, 1)
  kGateBias,      // N(0, 0.1^2)
  kTokenExperts,  // tid2eid: each row k distinct experts in [0, n_routed_experts)
};

// Storage of the official packed checkpoint.
enum class PackedFormat { kFp8, kFp4, kBf16, kF32, kI64 };

struct ParamSpec {
  std::string name;            // official name; also the key of its random stream
  std::vector<int64_t> shape;  // as in ModelWeights
  ParamInit init = ParamInit::kLinear;
  PackedFormat packed = PackedFormat::kBf16;
  Tensor* tensor = nullptr;             // destination of a floating-point parameter
  std::vector<int32_t>* ids = nullptr;  // destination of tid2eid
  // transformers layout: this parameter is rows [hf_row, hf_row + rows()) of `hf_name`, a
  // tensor of shape hf_shape whose rows have the same width (experts are fused there).
  // Empty hf_name: not stored in that layout (the MTP block).
  std::string hf_name;
  std::vector<int64_t> hf_shape;
  int64_t hf_row = 0;

  int64_t numel() const;
  int64_t cols() const { return shape.empty() ? 1 : shape.back(); }
  int64_t rows() const { return numel() / cols(); }
};

// Every parameter of the main model, plus `mtp_layers` MTP blocks, bound to `weights`: its
// layer and MTP vectors are resized and the compressor/indexer members of CSA/HCA layers
// emplaced when absent (tensors already there are kept, new ones left empty). The result holds
// pointers into `weights`, which must outlive it and not be resized meanwhile. Order: as declared,
// not sorted.
std::vector<ParamSpec> model_param_specs(const ModelConfig& config, int64_t mtp_layers,
                                         ModelWeights* weights);

// `x.weight` -> `x.scale`: the official name of a quantised weight's scales.
std::string official_scale_name(const std::string& weight_name);

}  // namespace dserve::model
