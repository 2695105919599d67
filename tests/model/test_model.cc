#include "test_model.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <memory>

#include "dserve/core/random.h"
#include "dserve/model/checkpoint.h"
#include "dserve/model/config.h"
#include "dserve/model/model_init.h"
#include "dserve/model/sampler.h"
#include "dserve/tokenizer/tokenizer.h"

namespace dserve::model::testing_support {

double relative_row_diff(const float* a, const float* b, int64_t n) {
  double diff = 0.0, scale = 1.0;
  for (int64_t i = 0; i < n; ++i) {
    diff = std::max(diff, static_cast<double>(std::abs(a[i] - b[i])));
    scale = std::max(scale, static_cast<double>(std::abs(b[i])));
  }
  return diff / scale;
}

std::string tokenizer_json() {
  return tokenizer::default_tokenizer_json_path(DSERVE_SOURCE_DIR);
}

const std::string& tiny_model_dir() {
  // Never destroyed: the exit handler below reads it after static destructors may have run (a
  // destroyed string there once handed remove_all a garbage path, "/"). The handler removes only
  // the directory it made, checked again by name before anything goes.
  static const std::string* const dir = [] {
    const auto path =
        std::filesystem::temp_directory_path() / ("dserve-tiny-" + std::to_string(::getpid()));
    ModelInitOptions opts;
    opts.preset = "tiny";
    opts.seed = 1;
    opts.out_dir = path.string();
    opts.tokenizer_json = tokenizer_json();
    const Status s = write_random_checkpoint(opts);
    if (!s.is_ok()) {
      ADD_FAILURE() << "cannot write the tiny model: " << s.to_string();
      std::abort();
    }
    std::atexit([] {
      const std::filesystem::path made(*dir);
      if (made.has_parent_path() && made.parent_path() == std::filesystem::temp_directory_path() &&
          made.filename().string().starts_with("dserve-tiny-")) {
        std::error_code ignored;
        std::filesystem::remove_all(made, ignored);
      }
    });
    return new std::string(path.string());
  }();
  return *dir;
}

std::shared_ptr<const Model> generated_model(const std::string& preset, int64_t vocab_size,
                                             kvstore::KvDtype kv_dtype, uint64_t seed) {
  if (preset == "tiny" && vocab_size == 0 && seed == 1) return tiny_model_shared(kv_dtype);
  const auto dir =
      std::filesystem::temp_directory_path() /
      ("dserve-" + preset + "-" + std::to_string(seed) + "-" + std::to_string(::getpid()));
  ModelInitOptions opts;
  opts.preset = preset;
  opts.seed = seed;
  opts.out_dir = dir.string();
  opts.tokenizer_json = tokenizer_json();
  opts.vocab_size = vocab_size;
  const Status written = write_random_checkpoint(opts);
  EXPECT_TRUE(written.is_ok()) << written.to_string();
  auto config = load_model_config(dir.string());
  EXPECT_TRUE(config.is_ok()) << config.status().to_string();
  if (config.is_ok()) {
    EXPECT_TRUE(set_kv_dtype(*config, kv_dtype).is_ok());
  }
  auto weights = load_checkpoint(dir.string(), *config);
  EXPECT_TRUE(weights.is_ok()) << weights.status().to_string();
  std::filesystem::remove_all(dir);
  if (!config.is_ok() || !weights.is_ok()) return nullptr;
  return std::make_shared<const Model>(std::move(config).value(), std::move(weights).value());
}

namespace {
std::shared_ptr<const Model> load_tiny(kvstore::KvDtype kv_dtype) {
  auto config = load_model_config(tiny_model_dir());
  if (!config.is_ok()) {
    ADD_FAILURE() << config.status().to_string();
    std::abort();
  }
  if (Status s = set_kv_dtype(*config, kv_dtype); !s.is_ok()) {
    ADD_FAILURE() << s.to_string();
    std::abort();
  }
  auto weights = load_checkpoint(tiny_model_dir(), *config);
  if (!weights.is_ok()) {
    ADD_FAILURE() << weights.status().to_string();
    std::abort();
  }
  return std::make_shared<const Model>(std::move(config).value(), std::move(weights).value());
}

std::unique_ptr<Engine> cpu_engine(const std::shared_ptr<const Model>& model) {
  auto made = make_engine(model, EngineOptions{});
  if (!made.is_ok()) {
    ADD_FAILURE() << made.status().to_string();
    std::abort();
  }
  return std::move(made).value();
}
}  // namespace

const std::shared_ptr<const Model>& tiny_model_shared(kvstore::KvDtype kv_dtype) {
  static const std::shared_ptr<const Model> fp32 = load_tiny(kvstore::KvDtype::kFp32);
  if (kv_dtype == kvstore::KvDtype::kFp32) return fp32;
  static const std::shared_ptr<const Model> fp8 = load_tiny(kvstore::KvDtype::kFp8);
  return fp8;
}

const Model& tiny_model(kvstore::KvDtype kv_dtype) {
  return *tiny_model_shared(kv_dtype);
}

Engine& tiny_engine(kvstore::KvDtype kv_dtype) {
  static const std::unique_ptr<Engine> fp32 =
      cpu_engine(tiny_model_shared(kvstore::KvDtype::kFp32));
  if (kv_dtype == kvstore::KvDtype::kFp32) return *fp32;
  static const std::unique_ptr<Engine> fp8 = cpu_engine(tiny_model_shared(kvstore::KvDtype::kFp8));
  return *fp8;
}

std::string kv_dtype_param_name(const ::testing::TestParamInfo<kvstore::KvDtype>& info) {
  return std::string(kvstore::kv_dtype_name(info.param));
}

std::vector<int32_t> prompt_of(int64_t n, uint64_t seed) {
  SplitMix64 rng(seed);
  std::vector<int32_t> ids{0};
  while (static_cast<int64_t>(ids.size()) < n)
    ids.push_back(static_cast<int32_t>(1 + rng.below(128000)));
  return ids;
}

std::vector<int32_t> greedy_tokens(Engine& engine, const std::vector<int32_t>& prompt,
                                   int64_t max_tokens) {
  auto request = std::move(engine.new_request()).value();
  const StepRows rows[1] = {{request.get(), prompt, LogitsFor::kLastToken}};
  Tensor logits = std::move((*engine.step(rows))[0]);
  Sampler sampler(SamplingParams{});
  std::vector<int32_t> out;
  for (int64_t produced = 0; produced < max_tokens;) {
    const int32_t t = sampler.sample(logits.span());
    ++produced;
    if (t == engine.config().eos_token_id) break;
    out.push_back(t);
    if (produced == max_tokens) break;
    const int32_t one[1] = {t};
    const StepRows next[1] = {{request.get(), one, LogitsFor::kLastToken}};
    logits = std::move((*engine.step(next))[0]);
  }
  return out;
}

}  // namespace dserve::model::testing_support
