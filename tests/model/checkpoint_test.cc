// load_checkpoint on generated tiny checkpoints: both layouts and all dtypes agree, and broken
// checkpoints give errors naming the tensor, the shapes and the file.

#include "dserve/model/checkpoint.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>

#include "dserve/model/model_init.h"
#include "number_formats.h"
#include "param_specs.h"
#include "safetensors.h"

namespace dserve::model {
namespace {

namespace fs = std::filesystem;
using Layout = ModelInitOptions::Layout;
using Mode = ModelInitOptions::DType;

// A tiny checkpoint per (layout, dtype), written once for the whole binary.
class TinyCheckpoints : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = fs::temp_directory_path() / ("dserve-ckpt-" + std::to_string(::getpid()));
    fs::create_directories(root_);
    std::ofstream(root_ / "tokenizer.json") << "{}";
  }
  static void TearDownTestSuite() { fs::remove_all(root_); }

  static std::string dir(Layout layout, Mode dtype, int64_t shard_bytes = int64_t{2} << 30) {
    const std::string name = std::string(layout == Layout::kOfficial ? "official" : "hf") + "-" +
                             std::to_string(static_cast<int>(dtype)) + "-" +
                             std::to_string(shard_bytes);
    const fs::path d = root_ / name;
    if (!fs::exists(d / "config.json")) {
      ModelInitOptions o;
      o.preset = "tiny";
      o.seed = 7;
      o.out_dir = d.string();
      o.tokenizer_json = (root_ / "tokenizer.json").string();
      o.layout = layout;
      o.dtype = dtype;
      o.shard_bytes = shard_bytes;
      const Status s = write_random_checkpoint(o);
      EXPECT_TRUE(s.is_ok()) << s.to_string();
    }
    return d.string();
  }
  static ModelWeights load(const std::string& d) {
    auto config = load_model_config(d);
    EXPECT_TRUE(config.is_ok()) << config.status().to_string();
    auto w = load_checkpoint(d, *config);
    EXPECT_TRUE(w.is_ok()) << w.status().to_string();
    return std::move(w).value();
  }
  // Copies `d`'s single model.safetensors into a new checkpoint, with `edit` applied.
  static std::string edited(
      const std::string& d, const std::string& name,
      const std::function<void(std::vector<std::pair<TensorDecl, std::vector<uint8_t>>>&)>& edit) {
    const fs::path out = root_ / name;
    fs::create_directories(out);
    fs::copy_file(fs::path(d) / "config.json", out / "config.json",
                  fs::copy_options::overwrite_existing);
    auto f = SafetensorsFile::open((fs::path(d) / "model.safetensors").string());
    EXPECT_TRUE(f.is_ok());
    std::vector<std::pair<TensorDecl, std::vector<uint8_t>>> tensors;
    for (const TensorInfo& t : (*f)->header().tensors) {
      const auto b = (*f)->bytes(t);
      tensors.push_back({{t.name, t.dtype, t.shape}, {b.begin(), b.end()}});
    }
    edit(tensors);
    EXPECT_TRUE(write_safetensors((out / "model.safetensors").string(), tensors).is_ok());
    return out.string();
  }

  static fs::path root_;
};
fs::path TinyCheckpoints::root_;

// Visits every floating-point parameter of two weight sets side by side.
template <typename F>
void for_each_pair(const ModelConfig& c, ModelWeights& a, ModelWeights& b, int64_t mtp, F f) {
  const auto specs_a = model_param_specs(c, mtp, &a);
  const auto specs_b = model_param_specs(c, mtp, &b);
  ASSERT_EQ(specs_a.size(), specs_b.size());
  for (size_t i = 0; i < specs_a.size(); ++i) {
    if (specs_a[i].tensor == nullptr) {
      EXPECT_EQ(*specs_a[i].ids, *specs_b[i].ids) << specs_a[i].name;
      continue;
    }
    const Tensor& x = *specs_a[i].tensor;
    const Tensor& y = *specs_b[i].tensor;
    ASSERT_EQ(x.shape(), specs_a[i].shape) << specs_a[i].name;
    ASSERT_EQ(y.shape(), specs_a[i].shape) << specs_a[i].name;
    f(specs_a[i], x, y);
  }
}

TEST_F(TinyCheckpoints, PackedOfficialAgreesWithF32TransformersWithinQuantisationError) {
  ModelWeights f32 = load(dir(Layout::kTransformers, Mode::kF32));
  ModelWeights packed = load(dir(Layout::kOfficial, Mode::kPacked));
  EXPECT_TRUE(f32.mtp.empty());
  ASSERT_EQ(packed.mtp.size(), 1u);
  EXPECT_FALSE(packed.mtp[0].e_proj.empty());
  const ModelConfig c = *preset_config("tiny");
  for_each_pair(c, f32, packed, 0, [](const ParamSpec& s, const Tensor& x, const Tensor& y) {
    float amax = 0.0f, err = 0.0f;
    for (int64_t i = 0; i < x.numel(); ++i) {
      amax = std::max(amax, std::fabs(x.data()[i]));
      err = std::max(err, std::fabs(x.data()[i] - y.data()[i]));
    }
    // MXFP4 is the coarsest: a quarter of the group's magnitude; FP8 2^-4, BF16 2^-8.
    const float bound = s.packed == PackedFormat::kFp4    ? 0.25f
                        : s.packed == PackedFormat::kFp8  ? 0x1.0p-4f
                        : s.packed == PackedFormat::kBf16 ? 0x1.0p-8f
                                                          : 0.0f;
    EXPECT_LE(err, bound * amax) << s.name;
    EXPECT_GT(amax, 0.0f) << s.name;
  });
}

TEST_F(TinyCheckpoints, Bf16IsF32RoundedExactlyAcrossLayouts) {
  ModelWeights f32 = load(dir(Layout::kTransformers, Mode::kF32));
  ModelWeights bf16 = load(dir(Layout::kOfficial, Mode::kBf16));
  const ModelConfig c = *preset_config("tiny");
  for_each_pair(c, f32, bf16, 0, [](const ParamSpec& s, const Tensor& x, const Tensor& y) {
    for (int64_t i = 0; i < x.numel(); ++i) {
      ASSERT_EQ(bf16_to_f32(f32_to_bf16(x.data()[i])), y.data()[i]) << s.name << "[" << i << "]";
    }
  });
}

TEST_F(TinyCheckpoints, ShardedEqualsSingleFile) {
  const std::string sharded = dir(Layout::kOfficial, Mode::kPacked, 4 << 20);
  EXPECT_TRUE(fs::exists(fs::path(sharded) / "model.safetensors.index.json"));
  int shards = 0;
  for (const auto& e : fs::directory_iterator(sharded)) {
    shards += e.path().filename().string().rfind("model-0000", 0) == 0;
  }
  EXPECT_GE(shards, 3);
  EXPECT_FALSE(fs::exists(fs::path(sharded) / "model.safetensors"));
  ModelWeights a = load(sharded);
  ModelWeights b = load(dir(Layout::kOfficial, Mode::kPacked));
  for_each_pair(*preset_config("tiny"), a, b, 1,
                [](const ParamSpec& s, const Tensor& x, const Tensor& y) {
                  EXPECT_TRUE(std::ranges::equal(x.span(), y.span())) << s.name;
                });
}

TEST_F(TinyCheckpoints, MissingAndMisShapedTensorsAreNamed) {
  const std::string base = dir(Layout::kOfficial, Mode::kPacked);
  const std::string broken = edited(base, "broken", [](auto& tensors) {
    std::erase_if(tensors,
                  [](const auto& t) { return t.first.name == "layers.2.attn.compressor.ape"; });
    for (auto& [decl, bytes] : tensors) {
      if (decl.name == "layers.0.attn.wq_a.weight") {
        decl.shape = {32, 65};
        bytes.resize(32 * 65);
      }
      if (decl.name == "layers.1.ffn.gate.bias") decl.dtype = DType::kI32;
    }
  });
  const auto config = load_model_config(broken);
  ASSERT_TRUE(config.is_ok());
  const auto w = load_checkpoint(broken, *config);
  ASSERT_FALSE(w.is_ok());
  const std::string& msg = w.status().message();
  const std::string file = broken + "/model.safetensors";
  EXPECT_NE(
      msg.find("`layers.2.attn.compressor.ape` is missing (expected F32, F16 or BF16 [16, 64]); "
               "looked in " +
               file),
      std::string::npos)
      << msg;
  EXPECT_NE(msg.find("`layers.0.attn.wq_a.weight` in " + file +
                     ": F8_E4M3 [32, 65], expected F8_E4M3 [32, 64]"),
            std::string::npos)
      << msg;
  EXPECT_NE(
      msg.find("`layers.1.ffn.gate.bias` in " + file + ": I32 [8], expected F32, F16 or BF16 [8]"),
      std::string::npos)
      << msg;
  EXPECT_EQ(w.status().code(), StatusCode::kInvalidArgument);
}

TEST_F(TinyCheckpoints, ErrorListIsCapped) {
  const std::string base = dir(Layout::kOfficial, Mode::kBf16);
  const std::string broken = edited(base, "no-experts", [](auto& tensors) {
    std::erase_if(
        tensors, [](const auto& t) { return t.first.name.find(".experts.") != std::string::npos; });
  });
  const auto w = load_checkpoint(broken, *load_model_config(broken));
  EXPECT_EQ(w.status().code(), StatusCode::kNotFound);
  EXPECT_NE(w.status().message().find("and 100 more"), std::string::npos) << w.status().message();
}

TEST_F(TinyCheckpoints, TiedHeadAndOutOfRangeExpertIds) {
  const std::string base = dir(Layout::kOfficial, Mode::kBf16);
  const std::string tied = edited(base, "tied", [](auto& tensors) {
    std::erase_if(tensors, [](const auto& t) { return t.first.name == "head.weight"; });
  });
  ModelConfig c = *load_model_config(tied);
  EXPECT_FALSE(load_checkpoint(tied, c).is_ok());
  c.tie_word_embeddings = true;
  const auto w = load_checkpoint(tied, c);
  ASSERT_TRUE(w.is_ok()) << w.status().to_string();
  EXPECT_TRUE(std::ranges::equal(w->head.span(), w->embed.span()));

  const std::string bad_ids = edited(base, "bad-ids", [](auto& tensors) {
    for (auto& [decl, bytes] : tensors) {
      if (decl.name == "layers.0.ffn.gate.tid2eid") bytes[8] = 99;
    }
  });
  const auto e = load_checkpoint(bad_ids, *load_model_config(bad_ids));
  ASSERT_FALSE(e.is_ok());
  EXPECT_NE(e.status().message().find("1 expert ids outside [0, 8)"), std::string::npos)
      << e.status().message();
}

}  // namespace
}  // namespace dserve::model
