// Fuzz target for the safetensors header parser: any byte string is either accepted with
// consistent offsets or rejected with a Status; it never crashes or reads out of bounds.
//
// With clang and DSERVE_FUZZ=ON this file is also built against libFuzzer
// (DSERVE_FUZZ_LIBFUZZER defined). Without it, the driver below runs seeded mutations of a few
// valid and invalid headers, bounded by iterations and wall time, so that CI runs it on every
// build: `fuzz_safetensors_header [iterations] [seconds]`.

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "dserve/core/random.h"
#include "safetensors.h"

namespace {

// Checks the invariants of an accepted header; aborts (a fuzzer finding) when one is broken.
void check_accepted(const dserve::model::SafetensorsHeader& h, size_t file_size) {
  for (const auto& t : h.tensors) {
    if (t.begin < 0 || t.end < t.begin ||
        static_cast<uint64_t>(h.data_offset + t.end) > file_size ||
        t.byte_size() != t.numel() * dserve::model::dtype_size(t.dtype)) {
      std::fprintf(stderr, "accepted an inconsistent tensor `%s`\n", t.name.c_str());
      std::abort();
    }
  }
}

int run_one(const uint8_t* data, size_t size) {
  const auto r = dserve::model::parse_safetensors({data, size}, "fuzz.safetensors");
  if (r.is_ok()) {
    check_accepted(*r, size);
  } else if (r.status().message().empty()) {
    std::abort();  // every rejection must say why
  }
  return 0;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return run_one(data, size);
}

#ifndef DSERVE_FUZZ_LIBFUZZER
namespace {

std::vector<uint8_t> file_image(const std::string& header, size_t data_bytes) {
  std::vector<uint8_t> out(8);
  for (size_t i = 0; i < 8; ++i)
    out[i] = static_cast<uint8_t>(header.size() >> (8 * i));
  out.insert(out.end(), header.begin(), header.end());
  out.resize(out.size() + data_bytes, 0x3C);
  return out;
}

std::vector<std::vector<uint8_t>> seeds() {
  using dserve::model::DType;
  std::vector<dserve::model::TensorInfo> layout;
  const std::string valid =
      dserve::model::safetensors_header_bytes({{"a.weight", DType::kF8E4M3, {4, 8}},
                                               {"a.scale", DType::kF8E8M0, {1, 1}},
                                               {"b", DType::kBF16, {3}},
                                               {"ids", DType::kI64, {2, 2}}},
                                              {{"format", "pt"}}, &layout);
  std::vector<uint8_t> v(valid.begin(), valid.end());
  v.resize(v.size() + static_cast<size_t>(layout.back().end), 0x11);
  return {
      v,
      file_image(R"({"x":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})", 16),
      file_image(
          R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"I8","shape":[9],"data_offsets":[4,13]}})",
          13),
      file_image(
          R"({"__metadata__":{"a":"b"},"e":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}})", 0),
      file_image(R"({"x":{"dtype":"F8_E4M3","shape":[18446744073709551615],"data_offsets":[0,1]}})",
                 1),
      file_image(R"([[[[{"x":1e999}]]]])", 0),
  };
}

const char* const kTokens[] = {"{",
                               "}",
                               "[",
                               "]",
                               ",",
                               ":",
                               "\"",
                               "-1",
                               "0",
                               "1e30",
                               "null",
                               "\"dtype\"",
                               "\"F32\"",
                               "\"shape\"",
                               "\"data_offsets\"",
                               "\"__metadata__\"",
                               "18446744073709551616",
                               "\\u0000",
                               "true"};

void mutate(std::vector<uint8_t>& b, dserve::SplitMix64& rng) {
  const int n = 1 + static_cast<int>(rng.below(4));
  for (int m = 0; m < n; ++m) {
    const size_t pos = b.empty() ? 0 : static_cast<size_t>(rng.below(b.size()));
    switch (rng.below(6)) {
      case 0:  // flip a bit
        if (!b.empty()) b[pos] ^= static_cast<uint8_t>(1u << rng.below(8));
        break;
      case 1:  // random byte
        if (!b.empty()) b[pos] = static_cast<uint8_t>(rng.next());
        break;
      case 2:  // delete a range
        if (!b.empty())
          b.erase(
              b.begin() + static_cast<std::ptrdiff_t>(pos),
              b.begin() + static_cast<std::ptrdiff_t>(std::min(b.size(), pos + 1 + rng.below(8))));
        break;
      case 3: {  // insert a JSON token
        const std::string tok = kTokens[rng.below(std::size(kTokens))];
        b.insert(b.begin() + static_cast<std::ptrdiff_t>(pos), tok.begin(), tok.end());
        break;
      }
      case 4:  // rewrite the length prefix
        if (b.size() >= 8) {
          const uint64_t len = rng.below(2) ? rng.below(b.size() + 16) : rng.next();
          for (size_t i = 0; i < 8; ++i)
            b[i] = static_cast<uint8_t>(len >> (8 * i));
        }
        break;
      default:  // truncate
        b.resize(static_cast<size_t>(rng.below(b.size() + 1)));
        break;
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const long iterations = argc > 1 ? std::atol(argv[1]) : 200000;
  const double seconds = argc > 2 ? std::atof(argv[2]) : 10.0;
  const auto start = std::chrono::steady_clock::now();
  const auto corpus = seeds();
  dserve::SplitMix64 rng(20261122);
  long done = 0, accepted = 0;
  for (const auto& s : corpus)
    run_one(s.data(), s.size());
  for (; done < iterations; ++done) {
    if (done % 256 == 0 &&
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > seconds) {
      break;
    }
    std::vector<uint8_t> b = corpus[static_cast<size_t>(rng.below(corpus.size()))];
    mutate(b, rng);
    accepted += dserve::model::parse_safetensors(b, "fuzz").is_ok();
    run_one(b.data(), b.size());
  }
  std::printf("fuzz_safetensors_header: %ld inputs, %ld accepted, no crash\n", done, accepted);
  return 0;
}
#endif
