// load_checkpoint: resolve every parameter to its stored tensor(s), check them all, then
// dequantise into fp32 in parallel.

#include "dserve/model/checkpoint.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <thread>

#include "block_quant.h"
#include "param_specs.h"
#include "safetensors.h"

namespace dserve::model {
namespace {

constexpr size_t kMaxErrorLines = 20;

// Problems found while loading, from any thread; reported together.
class ErrorList {
 public:
  void add(std::string msg, bool missing = false) {
    std::lock_guard<std::mutex> lock(mu_);
    lines_.push_back(std::move(msg));
    all_missing_ = all_missing_ && missing;
  }
  bool empty() const { return lines_.empty(); }
  Status to_status(const std::string& dir) const {
    std::string msg = dir + ": cannot load the checkpoint (" + std::to_string(lines_.size()) +
                      (lines_.size() == 1 ? " problem):" : " problems):");
    for (size_t i = 0; i < lines_.size() && i < kMaxErrorLines; ++i)
      msg += "\n  " + lines_[i];
    if (lines_.size() > kMaxErrorLines) {
      msg += "\n  and " + std::to_string(lines_.size() - kMaxErrorLines) + " more";
    }
    return {all_missing_ ? StatusCode::kNotFound : StatusCode::kInvalidArgument, msg};
  }

 private:
  std::mutex mu_;
  std::vector<std::string> lines_;
  bool all_missing_ = true;
};

enum class Encoding { kPlain, kFp8, kFp4, kIds };

// One parameter and where its bytes are.
struct LoadItem {
  const ParamSpec* spec;
  SafetensorsSet::Entry src;
  std::optional<SafetensorsSet::Entry> scale;
  Encoding encoding = Encoding::kPlain;
  int64_t src_row = 0;  // first row inside src (fused transformers experts)
};

std::string at(const SafetensorsSet::Entry& e) {
  return "`" + e.info->name + "` in " + e.file->path();
}

std::string describe(const TensorInfo& t) {
  return std::string(dtype_name(t.dtype)) + " " + shape_to_string(t.shape);
}

// Resolves a quantised weight's scale tensor; checks its dtype and shape.
std::optional<SafetensorsSet::Entry> find_scale(const SafetensorsSet& set, const std::string& name,
                                                const std::vector<int64_t>& want, bool allow_f32,
                                                ErrorList& errors) {
  auto scale = set.find(official_scale_name(name));
  if (!scale && allow_f32) scale = set.find(name + "_scale_inv");
  if (!scale) {
    errors.add("`" + name + "` is quantised but its scales `" + official_scale_name(name) + "`" +
               (allow_f32 ? " / `" + name + "_scale_inv`" : std::string()) + " are missing");
    return std::nullopt;
  }
  const TensorInfo& t = *scale->info;
  const bool dtype_ok = t.dtype == DType::kF8E8M0 || (allow_f32 && t.dtype == DType::kF32);
  if (!dtype_ok || t.shape != want) {
    errors.add(at(*scale) + ": " + describe(t) + ", expected " +
               (allow_f32 ? "F8_E8M0 or F32 " : "F8_E8M0 ") + shape_to_string(want));
    return std::nullopt;
  }
  return scale;
}

// Checks the stored tensor(s) of one parameter; returns the load item or records errors.
std::optional<LoadItem> resolve(const SafetensorsSet& set, const ParamSpec& spec,
                                CheckpointLayout layout, ErrorList& errors) {
  const bool hf = layout == CheckpointLayout::kTransformers;
  const std::string& name = hf ? spec.hf_name : spec.name;
  const std::vector<int64_t>& want = hf ? spec.hf_shape : spec.shape;
  const bool fused = hf && want != spec.shape;
  const auto entry = set.find(name);
  // Only 2-D `.weight` matrices may be stored quantised.
  const bool quantisable = spec.shape.size() == 2 && !fused && name.ends_with(".weight");
  const std::string accepted = spec.ids != nullptr ? "I64 or I32"
                               : quantisable
                                   ? "F32, F16, BF16, F8_E4M3 (+scale) or I8 MXFP4 (+scale)"
                                   : "F32, F16 or BF16";
  if (!entry) {
    errors.add("`" + name + "` is missing (expected " + accepted + " " + shape_to_string(want) +
                   "); looked in " + set.source(),
               /*missing=*/true);
    return std::nullopt;
  }
  LoadItem item{&spec, *entry, std::nullopt, Encoding::kPlain, fused ? spec.hf_row : 0};
  const TensorInfo& t = *entry->info;
  const auto mismatch = [&](const std::string& expected) {
    errors.add(at(*entry) + ": " + describe(t) + ", expected " + expected);
    return std::nullopt;
  };
  if (spec.ids != nullptr) {
    if ((t.dtype != DType::kI64 && t.dtype != DType::kI32) || t.shape != want) {
      return mismatch(accepted + " " + shape_to_string(want));
    }
    item.encoding = Encoding::kIds;
    return item;
  }
  if (is_float_dtype(t.dtype)) {
    if (t.shape != want)
      return mismatch(std::string(dtype_name(t.dtype)) + " " + shape_to_string(want));
    return item;
  }
  if (!quantisable) return mismatch(accepted + " " + shape_to_string(want));
  const int64_t out = want[0];
  const int64_t in = want[1];
  if (t.dtype == DType::kF8E4M3) {
    if (t.shape != want) return mismatch("F8_E4M3 " + shape_to_string(want));
    item.encoding = Encoding::kFp8;
    item.scale = find_scale(set, name, {ceil_div(out, kFp8Block), ceil_div(in, kFp8Block)},
                            /*allow_f32=*/true, errors);
    return item.scale ? std::optional<LoadItem>(item) : std::nullopt;
  }
  if (t.dtype == DType::kI8 || t.dtype == DType::kU8) {
    const std::vector<int64_t> packed = {out, in / 2};
    if (in % kFp4Group != 0 || t.shape != packed) {
      return mismatch("MXFP4 " + shape_to_string(packed) + " (" + shape_to_string(want) +
                      " unpacked; in a multiple of 32)");
    }
    item.encoding = Encoding::kFp4;
    item.scale = find_scale(set, name, {out, in / kFp4Group}, /*allow_f32=*/false, errors);
    return item.scale ? std::optional<LoadItem>(item) : std::nullopt;
  }
  return mismatch(accepted + " " + shape_to_string(want));
}

// Converts `count` elements of a float-typed tensor starting at element `first` into `out`.
void convert_plain(std::span<const uint8_t> bytes, DType dtype, int64_t first, int64_t count,
                   float* out) {
  const uint8_t* p = bytes.data() + first * dtype_size(dtype);
  if (dtype == DType::kF32) {
    std::memcpy(out, p, static_cast<size_t>(count) * 4);
    return;
  }
  for (int64_t i = 0; i < count; ++i) {
    uint16_t v;
    std::memcpy(&v, p + 2 * i, 2);
    out[i] = dtype == DType::kBF16 ? bf16_to_f32(v) : f16_to_f32(v);
  }
}

void load_item(const LoadItem& item, const ModelConfig& config, ErrorList& errors) {
  const ParamSpec& spec = *item.spec;
  const TensorInfo& t = *item.src.info;
  const auto bytes = item.src.file->bytes(t);
  if (item.encoding == Encoding::kIds) {
    std::vector<int32_t>& ids = *spec.ids;
    ids.resize(static_cast<size_t>(t.numel()));
    int64_t bad = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
      int64_t v;
      if (t.dtype == DType::kI64) {
        std::memcpy(&v, bytes.data() + 8 * i, 8);
      } else {
        int32_t v32;
        std::memcpy(&v32, bytes.data() + 4 * i, 4);
        v = v32;
      }
      if (v < 0 || v >= config.n_routed_experts) ++bad;
      ids[i] = static_cast<int32_t>(std::clamp<int64_t>(v, 0, config.n_routed_experts - 1));
    }
    if (bad > 0) {
      errors.add(at(item.src) + ": " + std::to_string(bad) + " expert ids outside [0, " +
                 std::to_string(config.n_routed_experts) + ")");
    }
    return;
  }
  *spec.tensor = Tensor(spec.shape);
  float* out = spec.tensor->data();
  switch (item.encoding) {
    case Encoding::kPlain:
      convert_plain(bytes, t.dtype, item.src_row * spec.cols(), spec.numel(), out);
      break;
    case Encoding::kFp8: {
      const TensorInfo& s = *item.scale->info;
      dequantize_fp8(bytes.data(), item.scale->file->bytes(s).data(), s.dtype, 0, spec.rows(),
                     spec.cols(), out);
      break;
    }
    case Encoding::kFp4:
      dequantize_fp4(bytes.data(), item.scale->file->bytes(*item.scale->info).data(), spec.rows(),
                     spec.cols(), out);
      break;
    case Encoding::kIds:
      break;
  }
}

}  // namespace

Result<ModelWeights> load_checkpoint(const std::string& model_dir, const ModelConfig& config) {
  DSERVE_RETURN_IF_ERROR(validate_model_config(config, model_dir + "/config.json"));
  DSERVE_ASSIGN_OR_RETURN(SafetensorsSet set, SafetensorsSet::open_dir(model_dir));
  CheckpointLayout layout;
  if (set.contains("model.embed_tokens.weight")) {
    layout = CheckpointLayout::kTransformers;
  } else if (set.contains("embed.weight")) {
    layout = CheckpointLayout::kOfficial;
  } else {
    return not_found(set.source() + ": neither `embed.weight` (official layout) nor " +
                     "`model.embed_tokens.weight` (transformers layout) is present");
  }
  const bool has_mtp = layout == CheckpointLayout::kOfficial && set.contains("mtp.0.e_proj.weight");
  ModelWeights weights;
  const std::vector<ParamSpec> specs =
      model_param_specs(config, has_mtp ? config.num_nextn_predict_layers : 0, &weights);

  ErrorList errors;
  std::vector<LoadItem> items;
  bool head_from_embed = false;
  for (const ParamSpec& spec : specs) {
    const std::string& name = layout == CheckpointLayout::kTransformers ? spec.hf_name : spec.name;
    if (spec.tensor == &weights.head && config.tie_word_embeddings && !set.contains(name)) {
      head_from_embed = true;
      continue;
    }
    if (auto item = resolve(set, spec, layout, errors)) items.push_back(*item);
  }
  if (!errors.empty()) return errors.to_status(model_dir);

  // Largest first, so that the threads finish together.
  std::sort(items.begin(), items.end(),
            [](const LoadItem& a, const LoadItem& b) { return a.spec->numel() > b.spec->numel(); });
  std::atomic<size_t> next{0};
  const auto work = [&] {
    for (size_t i = next++; i < items.size(); i = next++)
      load_item(items[i], config, errors);
  };
  const size_t n_threads =
      std::min<size_t>(items.size(), std::max(1u, std::thread::hardware_concurrency()));
  std::vector<std::thread> threads;
  for (size_t i = 1; i < n_threads; ++i)
    threads.emplace_back(work);
  work();
  for (auto& t : threads)
    t.join();
  if (!errors.empty()) return errors.to_status(model_dir);
  if (head_from_embed) weights.head = weights.embed;
  return weights;
}

}  // namespace dserve::model
