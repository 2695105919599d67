// Numerics against the outside oracle: logits of transformers' DeepseekV4ForCausalLM (fp32,
// uncached full forward) on the same checkpoint and token ids, stored as fixtures by
// tools/oracle/make_fixtures.py on a GPU machine. Each fixture names how `dserve model init`
// wrote the checkpoint; the test regenerates it bit for bit, loads it with the real loader,
// and compares the argmax of every position and the logits at the fixture's probe ids.

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "dserve/model/checkpoint.h"
#include "dserve/model/model.h"
#include "dserve/model/model_init.h"
#include "dserve/model/sampler.h"
#include "test_model.h"

namespace dserve::model {
namespace {

namespace fs = std::filesystem;

std::vector<fs::path> fixtures() {
  std::vector<fs::path> out;
  const fs::path dir = fs::path(DSERVE_SOURCE_DIR) / "tests/fixtures/oracle";
  if (fs::exists(dir)) {
    for (const auto& e : fs::directory_iterator(dir)) {
      if (e.path().extension() == ".json") out.push_back(e.path());
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Logits may differ by fp32 rounding of a different summation order, amplified through the
// layers; argmax must agree wherever the reference's top two are not within that noise.
constexpr double kLogitTolerance = 2e-3;

TEST(Oracle, LogitsMatchTransformers) {
  const auto files = fixtures();
  if (files.empty()) {
    GTEST_SKIP() << "skipped: no oracle fixtures in tests/fixtures/oracle; generate them on a GPU "
                    "machine with tools/oracle/make_fixtures.py (see tools/oracle/README.md)";
  }
  for (const fs::path& file : files) {
    SCOPED_TRACE(file.filename().string());
    std::ifstream in(file);
    const nlohmann::json fx = nlohmann::json::parse(in);
    ASSERT_LT(fx.at("reference_prefix_causality_max_diff").get<double>(), 1e-4)
        << "the reference is not prefix-causal on this config; its logits cannot be trusted";

    const auto& m = fx.at("dserve_model");
    ModelInitOptions opts;
    opts.preset = m.at("preset").get<std::string>();
    opts.seed = m.at("seed").get<uint64_t>();
    opts.layout = ModelInitOptions::Layout::kTransformers;
    opts.dtype = m.at("dtype").get<std::string>() == "f32" ? ModelInitOptions::DType::kF32
                                                           : ModelInitOptions::DType::kBf16;
    opts.out_dir = (fs::temp_directory_path() /
                    ("dserve-oracle-" + std::to_string(::getpid()) + "-" + opts.preset))
                       .string();
    opts.tokenizer_json = testing_support::tokenizer_json();
    ASSERT_TRUE(write_random_checkpoint(opts).is_ok());
    auto config = load_model_config(opts.out_dir);
    ASSERT_TRUE(config.is_ok()) << config.status().to_string();
    auto weights = load_checkpoint(opts.out_dir, *config);
    ASSERT_TRUE(weights.is_ok()) << weights.status().to_string();
    fs::remove_all(opts.out_dir);
    const Model model(std::move(config).value(), std::move(weights).value());

    const auto ids = fx.at("token_ids").get<std::vector<int32_t>>();
    RequestState state = model.new_state();
    auto logits = model.forward(ids, state);
    ASSERT_TRUE(logits.is_ok()) << logits.status().to_string();

    double worst = 0.0;
    int argmax_mismatches = 0;
    const auto& positions = fx.at("positions");
    ASSERT_EQ(positions.size(), ids.size());
    for (size_t t = 0; t < ids.size(); ++t) {
      const auto& p = positions[t];
      const float* row = logits->row(static_cast<int64_t>(t));
      const auto probe_ids = p.at("probe_ids").get<std::vector<int64_t>>();
      const auto probe_logits = p.at("probe_logits").get<std::vector<double>>();
      for (size_t i = 0; i < probe_ids.size(); ++i) {
        worst = std::max(worst, std::abs(row[probe_ids[i]] - probe_logits[i]));
      }
      const int32_t ours = argmax({row, static_cast<size_t>(logits->cols())});
      if (ours != p.at("argmax").get<int32_t>()) ++argmax_mismatches;
    }
    RecordProperty("max_abs_logit_diff", std::to_string(worst));
    std::printf("oracle %s: %zu positions, max |logit diff| %.3g, argmax mismatches %d\n",
                file.filename().c_str(), ids.size(), worst, argmax_mismatches);
    EXPECT_LT(worst, kLogitTolerance);
    EXPECT_EQ(argmax_mismatches, 0);
  }
}

}  // namespace
}  // namespace dserve::model
