// The deterministic checkpoint generator: same seed -> same bytes, sensible values, errors.

#include "dserve/model/model_init.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "generated_tensors.h"

namespace dserve::model {
namespace {

namespace fs = std::filesystem;

struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() /
           ("dserve-init-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::create_directories(path);
    std::ofstream(path / "tok.json") << R"({"model": {}})";
  }
  ~TempDir() { fs::remove_all(path); }
};

uint64_t fnv1a(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  uint64_t h = 0xCBF29CE484222325ULL;
  char buf[1 << 16];
  while (in.read(buf, sizeof(buf)) || in.gcount() > 0) {
    for (std::streamsize i = 0; i < in.gcount(); ++i) {
      h ^= static_cast<uint8_t>(buf[i]);
      h *= 0x100000001B3ULL;
    }
  }
  return h;
}

std::map<std::string, uint64_t> hash_dir(const fs::path& dir) {
  std::map<std::string, uint64_t> out;
  for (const auto& e : fs::directory_iterator(dir))
    out[e.path().filename().string()] = fnv1a(e.path());
  return out;
}

ModelInitOptions tiny(const TempDir& d, const std::string& sub, uint64_t seed) {
  ModelInitOptions o;
  o.preset = "tiny";
  o.seed = seed;
  o.out_dir = (d.path / sub).string();
  o.tokenizer_json = (d.path / "tok.json").string();
  return o;
}

TEST(ModelInit, SameSeedSameBytes) {
  TempDir d;
  ASSERT_TRUE(write_random_checkpoint(tiny(d, "a", 11)).is_ok());
  ASSERT_TRUE(write_random_checkpoint(tiny(d, "b", 11)).is_ok());
  ASSERT_TRUE(write_random_checkpoint(tiny(d, "c", 12)).is_ok());
  const auto a = hash_dir(d.path / "a");
  EXPECT_EQ(a, hash_dir(d.path / "b"));
  const auto c = hash_dir(d.path / "c");
  EXPECT_NE(a.at("model.safetensors"), c.at("model.safetensors"));
  EXPECT_EQ(a.at("config.json"), c.at("config.json"));
  for (const char* f :
       {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"}) {
    EXPECT_EQ(a.count(f), 1u) << f;
  }
  EXPECT_EQ(a.size(), 4u);
}

// The bytes are pinned: the oracle fixtures (tests/fixtures/oracle) hold reference logits for
// checkpoints regenerated from their seed, so a generator change must be deliberate (update
// this value and regenerate the fixtures).
TEST(ModelInit, TinySeedOneBytesArePinned) {
  TempDir d;
  ASSERT_TRUE(write_random_checkpoint(tiny(d, "a", 1)).is_ok());
  EXPECT_EQ(fnv1a(d.path / "a" / "model.safetensors"), 0xAD7CFF53DAF8F4B3ULL)
      << "the tiny seed-1 checkpoint changed";
}

TEST(ModelInit, RowsDoNotDependOnHowTheWorkIsSplit) {
  const ModelConfig c = *preset_config("tiny");
  ModelWeights w;
  const auto specs = model_param_specs(c, 1, &w);
  for (auto mode : {ModelInitOptions::DType::kPacked, ModelInitOptions::DType::kBf16}) {
    const auto plan = plan_output_tensors(specs, ModelInitOptions::Layout::kOfficial, mode);
    ASSERT_TRUE(plan.is_ok());
    for (const OutputTensor& t : *plan) {
      std::vector<uint8_t> whole(static_cast<size_t>(t.rows * t.row_bytes));
      std::vector<uint8_t> parts(whole.size());
      fill_output_rows(t, 5, c.n_routed_experts, 0, t.rows, whole.data());
      for (int64_t r = 0; r < t.rows; r += t.row_align * 3) {
        const int64_t e = std::min(t.rows, r + t.row_align * 3);
        fill_output_rows(t, 5, c.n_routed_experts, r, e, parts.data() + r * t.row_bytes);
      }
      ASSERT_EQ(whole, parts) << t.decl.name;
    }
  }
}

TEST(ModelInit, ValuesAreSpreadAndTid2eidRowsAreDistinct) {
  const ModelConfig c = *preset_config("tiny");
  ModelWeights w;
  for (const ParamSpec& s : model_param_specs(c, 1, &w)) {
    if (s.ids != nullptr) {
      std::vector<int64_t> ids(static_cast<size_t>(50 * s.cols()));
      generate_ids(s, 1, c.n_routed_experts, 1000, 50, ids.data());
      for (int64_t r = 0; r < 50; ++r) {
        std::set<int64_t> row(ids.begin() + r * s.cols(), ids.begin() + (r + 1) * s.cols());
        EXPECT_EQ(static_cast<int64_t>(row.size()), s.cols());
        EXPECT_GE(*row.begin(), 0);
        EXPECT_LT(*row.rbegin(), c.n_routed_experts);
      }
      continue;
    }
    const int64_t rows = std::min<int64_t>(s.rows(), 64);
    std::vector<float> v(static_cast<size_t>(rows * s.cols()));
    generate_values(s, 1, 0, rows, v.data());
    double sum = 0.0, sq = 0.0;
    for (float x : v) {
      ASSERT_TRUE(std::isfinite(x));
      sum += x;
      sq += static_cast<double>(x) * x;
    }
    const double n = static_cast<double>(v.size());
    const double sd = std::sqrt(std::max(0.0, sq / n - (sum / n) * (sum / n)));
    if (n > 1) {
      EXPECT_GT(sd, 0.0) << s.name;  // nothing constant, no zero sinks / ape / hc base
    }
    EXPECT_NE(v[0], 0.0f) << s.name;
    if (s.init == ParamInit::kHcScale) {
      EXPECT_NEAR(sum / n, 0.5, 0.3) << s.name;
    }
    if (s.init == ParamInit::kNorm && n > 30) {
      EXPECT_NEAR(sum / n, 1.0, 0.1) << s.name;
    }
    if (s.init == ParamInit::kLinear && n > 1000) {
      EXPECT_NEAR(sd * std::sqrt(static_cast<double>(s.cols())), 1.0, 0.1) << s.name;
    }
  }
}

TEST(ModelInit, Errors) {
  TempDir d;
  auto o = tiny(d, "x", 1);
  o.tokenizer_json = (d.path / "missing.json").string();
  EXPECT_EQ(write_random_checkpoint(o).code(), StatusCode::kNotFound);
  EXPECT_FALSE(fs::exists(d.path / "x"));
  o = tiny(d, "x", 1);
  o.layout = ModelInitOptions::Layout::kTransformers;
  EXPECT_EQ(write_random_checkpoint(o).code(), StatusCode::kInvalidArgument);
  o = tiny(d, "x", 1);
  o.preset = "nope";
  EXPECT_NE(write_random_checkpoint(o).message().find("known: tiny, small, v4-width"),
            std::string::npos);
}

TEST(ModelInit, TransformersLayoutFusesExpertsAndHasNoMtp) {
  TempDir d;
  auto o = tiny(d, "hf", 3);
  o.layout = ModelInitOptions::Layout::kTransformers;
  o.dtype = ModelInitOptions::DType::kBf16;
  ASSERT_TRUE(write_random_checkpoint(o).is_ok());
  auto f = SafetensorsFile::open((d.path / "hf" / "model.safetensors").string());
  ASSERT_TRUE(f.is_ok());
  const TensorInfo* gu = (*f)->find("model.layers.1.mlp.experts.gate_up_proj");
  ASSERT_NE(gu, nullptr);
  EXPECT_EQ(gu->shape, (std::vector<int64_t>{8, 64, 64}));
  EXPECT_EQ(gu->dtype, DType::kBF16);
  ASSERT_NE((*f)->find("model.layers.1.mlp.experts.down_proj"), nullptr);
  ASSERT_NE((*f)->find("lm_head.weight"), nullptr);
  ASSERT_NE((*f)->find("model.hc_head.hc_fn"), nullptr);
  ASSERT_NE((*f)->find("model.layers.0.mlp.gate.tid2eid"), nullptr);
  for (const auto& t : (*f)->header().tensors)
    EXPECT_EQ(t.name.find("mtp"), std::string::npos);
  std::ifstream cfg(d.path / "hf" / "config.json");
  std::stringstream ss;
  ss << cfg.rdbuf();
  const std::string text = ss.str();
  EXPECT_NE(text.find("\"DeepseekV4ForCausalLM\""), std::string::npos);
  EXPECT_NE(text.find("\"torch_dtype\": \"bfloat16\""), std::string::npos);
}

}  // namespace
}  // namespace dserve::model
