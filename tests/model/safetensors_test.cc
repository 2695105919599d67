// safetensors reading/writing and the number formats: every dtype round trip, FP8/FP4
// quantisation error bounds, and precise errors for corrupt files.

#include "safetensors.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "block_quant.h"
#include "dserve/core/random.h"

namespace dserve::model {
namespace {

namespace fs = std::filesystem;

struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() /
           ("dserve-st-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

std::vector<uint8_t> read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
void write_all(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}
// A file image: 8-byte length, the header text, then `data_bytes` zero bytes.
std::vector<uint8_t> image(const std::string& header, size_t data_bytes, uint64_t length_field) {
  std::vector<uint8_t> out(8);
  for (int i = 0; i < 8; ++i)
    out[static_cast<size_t>(i)] = static_cast<uint8_t>(length_field >> (8 * i));
  out.insert(out.end(), header.begin(), header.end());
  out.resize(out.size() + data_bytes);
  return out;
}
std::vector<uint8_t> image(const std::string& header, size_t data_bytes) {
  return image(header, data_bytes, header.size());
}
Status parse_status(const std::vector<uint8_t>& bytes) {
  return parse_safetensors(bytes, "/x/model.safetensors").status();
}

TEST(NumberFormats, EveryDtypeHasANameAndSize) {
  for (const char* name : {"F32", "F16", "BF16", "F8_E4M3", "F8_E8M0", "I8", "U8", "I32", "I64"}) {
    const auto d = parse_dtype(name);
    ASSERT_TRUE(d.has_value()) << name;
    EXPECT_EQ(dtype_name(*d), name);
    EXPECT_GT(dtype_size(*d), 0);
  }
  EXPECT_FALSE(parse_dtype("F4").has_value());
}

TEST(NumberFormats, ScalarRoundTripsAreExactOnRepresentableValues) {
  for (int b = 0; b < 256; ++b) {
    const auto byte = static_cast<uint8_t>(b);
    const float v = e4m3_to_f32(byte);
    if (std::isnan(v)) continue;
    if (v == 0.0f) {
      EXPECT_EQ(f32_to_e4m3(v) & 0x7F, 0);
      continue;
    }
    EXPECT_EQ(f32_to_e4m3(v), byte) << b;
  }
  EXPECT_EQ(e4m3_to_f32(0x7E), 448.0f);
  EXPECT_EQ(f32_to_e4m3(1000.0f), 0x7E);  // saturates, e4m3fn has no infinity
  EXPECT_EQ(f32_to_e4m3(-1000.0f), 0xFE);
  EXPECT_EQ(e4m3_to_f32(0x01), std::ldexp(1.0f, -9));
  for (int n = 0; n < 16; ++n) {
    const auto nib = static_cast<uint8_t>(n);
    if (n == 8) continue;  // -0
    EXPECT_EQ(f32_to_e2m1(e2m1_to_f32(nib)), nib) << n;
  }
  for (int e = 0; e < 255; ++e)
    EXPECT_EQ(e8m0_to_f32(static_cast<uint8_t>(e)), std::ldexp(1.0f, e - 127));
  SplitMix64 rng(3);
  for (int i = 0; i < 10000; ++i) {
    const auto h = static_cast<uint16_t>(rng.next());
    const float f = bf16_to_f32(h);
    if (!std::isnan(f)) {
      EXPECT_EQ(f32_to_bf16(f), h);
    }
    const float g = f16_to_f32(h);
    if (!std::isnan(g)) {
      EXPECT_EQ(f32_to_f16(g), h) << h;
    }
  }
}

TEST(NumberFormats, RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f + 0x1.0p-8f), f32_to_bf16(1.0f));  // tie -> even mantissa
  EXPECT_EQ(f32_to_bf16(1.0f + 0x1.8p-8f), f32_to_bf16(1.0f + 0x1.0p-7f));
  EXPECT_EQ(e4m3_to_f32(f32_to_e4m3(1.0625f)), 1.0f);   // between 1 and 1.125
  EXPECT_EQ(e4m3_to_f32(f32_to_e4m3(1.1875f)), 1.25f);  // between 1.125 and 1.25
  EXPECT_EQ(f16_to_f32(f32_to_f16(1.0f + 0x1.0p-11f)), 1.0f);
  EXPECT_EQ(e2m1_to_f32(f32_to_e2m1(0.25f)), 0.0f);
  EXPECT_EQ(e2m1_to_f32(f32_to_e2m1(0.75f)), 1.0f);
  EXPECT_EQ(e2m1_to_f32(f32_to_e2m1(2.5f)), 2.0f);
  EXPECT_EQ(e2m1_to_f32(f32_to_e2m1(5.0f)), 4.0f);
  EXPECT_EQ(e2m1_to_f32(f32_to_e2m1(-7.0f)), -6.0f);
  EXPECT_EQ(e8m0_scale_for(448.0f, 448.0f), 127);
  EXPECT_EQ(e8m0_scale_for(449.0f, 448.0f), 128);
  EXPECT_EQ(e8m0_scale_for(0.0f, 448.0f), 127);
}

std::vector<float> random_matrix(int64_t rows, int64_t cols, uint64_t seed) {
  SplitMix64 rng(seed);
  std::vector<float> w(static_cast<size_t>(rows * cols));
  for (auto& x : w)
    x = static_cast<float>(rng.normal() * (1.0 + 10.0 * rng.uniform()));
  return w;
}

TEST(BlockQuant, Fp8RoundTripWithinBlockError) {
  const int64_t rows = 300, cols = 200;  // partial blocks on both edges
  const auto w = random_matrix(rows, cols, 1);
  std::vector<uint8_t> q(w.size());
  std::vector<uint8_t> scales(static_cast<size_t>(ceil_div(rows, 128) * ceil_div(cols, 128)));
  for (int64_t r0 = 0; r0 < rows; r0 += 128) {
    quantize_fp8_block_row(w.data() + r0 * cols, std::min<int64_t>(128, rows - r0), cols,
                           q.data() + r0 * cols, scales.data() + (r0 / 128) * ceil_div(cols, 128));
  }
  std::vector<float> back(w.size());
  dequantize_fp8(q.data(), scales.data(), DType::kF8E8M0, 0, rows, cols, back.data());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const float s =
          e8m0_to_f32(scales[static_cast<size_t>((r / 128) * ceil_div(cols, 128) + c / 128)]);
      const float x = w[static_cast<size_t>(r * cols + c)];
      const float y = back[static_cast<size_t>(r * cols + c)];
      // 3 mantissa bits: half an ulp is 2^-4 relative; subnormals step 2^-9 * scale.
      EXPECT_LE(std::fabs(x - y), std::max(std::fabs(x) * 0x1.0p-4f, s * 0x1.0p-10f))
          << r << "," << c;
    }
  }
  // Rows of a later stripe dequantise alone, given the whole scale matrix.
  std::vector<float> tail(static_cast<size_t>(44 * cols));
  dequantize_fp8(q.data() + 256 * cols, scales.data(), DType::kF8E8M0, 256, 44, cols, tail.data());
  EXPECT_EQ(std::memcmp(tail.data(), back.data() + 256 * cols, tail.size() * 4), 0);
}

TEST(BlockQuant, Fp4RoundTripWithinGroupError) {
  const int64_t rows = 7, cols = 96;
  const auto w = random_matrix(rows, cols, 2);
  std::vector<uint8_t> packed(w.size() / 2), scales(w.size() / 32);
  quantize_fp4(w.data(), rows, cols, packed.data(), scales.data());
  std::vector<float> back(w.size());
  dequantize_fp4(packed.data(), scales.data(), rows, cols, back.data());
  for (size_t i = 0; i < w.size(); ++i) {
    const float s = e8m0_to_f32(scales[i / 32]);
    EXPECT_LE(std::fabs(w[i] - back[i]), 0.25f * std::max(std::fabs(w[i]), s)) << i;
  }
  EXPECT_EQ(packed[0] & 0xF, f32_to_e2m1(w[0] / e8m0_to_f32(scales[0])));  // low nibble first
}

TEST(Safetensors, WritesAndReadsEveryDtype) {
  TempDir dir;
  std::vector<std::pair<TensorDecl, std::vector<uint8_t>>> tensors;
  SplitMix64 rng(9);
  int i = 0;
  for (DType d : {DType::kF32, DType::kF16, DType::kBF16, DType::kF8E4M3, DType::kF8E8M0,
                  DType::kI8, DType::kU8, DType::kI32, DType::kI64}) {
    TensorDecl decl{"t" + std::to_string(i++) + std::string(dtype_name(d)), d, {3, 5}};
    std::vector<uint8_t> bytes(static_cast<size_t>(15 * dtype_size(d)));
    for (auto& b : bytes)
      b = static_cast<uint8_t>(rng.next());
    tensors.emplace_back(decl, bytes);
  }
  tensors.push_back({{"empty", DType::kF32, {0, 4}}, {}});
  ASSERT_TRUE(
      write_safetensors(dir.file("model.safetensors"), tensors, {{"format", "pt"}}).is_ok());
  auto f = SafetensorsFile::open(dir.file("model.safetensors"));
  ASSERT_TRUE(f.is_ok()) << f.status().to_string();
  EXPECT_EQ((*f)->header().metadata.at("format"), "pt");
  EXPECT_EQ((*f)->header().data_offset % 8, 0);
  for (const auto& [decl, bytes] : tensors) {
    const TensorInfo* t = (*f)->find(decl.name);
    ASSERT_NE(t, nullptr) << decl.name;
    EXPECT_EQ(t->dtype, decl.dtype);
    EXPECT_EQ(t->shape, decl.shape);
    const auto got = (*f)->bytes(*t);
    EXPECT_EQ(std::vector<uint8_t>(got.begin(), got.end()), bytes) << decl.name;
  }
}

TEST(Safetensors, HeaderBytesAreDeterministic) {
  std::vector<TensorInfo> a, b;
  const std::vector<TensorDecl> d1 = {{"b", DType::kBF16, {2}}, {"a", DType::kI8, {3}}};
  const std::vector<TensorDecl> d2 = {{"a", DType::kI8, {3}}, {"b", DType::kBF16, {2}}};
  const std::string h1 = safetensors_header_bytes(d1, {}, &a);
  EXPECT_EQ(h1, safetensors_header_bytes(d2, {}, &b));
  EXPECT_EQ(h1.size() % 8, 0u);
  EXPECT_EQ(a[0].name, "a");
  EXPECT_EQ(a[1].begin, 3);
}

TEST(Safetensors, ShardedDirectoryThroughTheIndex) {
  TempDir dir;
  ASSERT_TRUE(
      write_safetensors(dir.file("s1.safetensors"), {{{"x", DType::kF32, {1}}, {0, 0, 128, 63}}})
          .is_ok());
  ASSERT_TRUE(
      write_safetensors(dir.file("s2.safetensors"), {{{"y", DType::kI8, {2}}, {1, 2}}}).is_ok());
  std::ofstream(dir.file("model.safetensors.index.json"))
      << R"({"metadata": {}, "weight_map": {"x": "s1.safetensors", "y": "s2.safetensors"}})";
  auto set = SafetensorsSet::open_dir(dir.path.string());
  ASSERT_TRUE(set.is_ok()) << set.status().to_string();
  EXPECT_EQ(set->size(), 2u);
  ASSERT_TRUE(set->find("y").has_value());
  EXPECT_EQ(set->find("y")->file->path(), dir.file("s2.safetensors"));
  EXPECT_FALSE(set->contains("z"));

  std::ofstream(dir.file("model.safetensors.index.json"))
      << R"({"weight_map": {"x": "s2.safetensors"}})";
  const auto bad = SafetensorsSet::open_dir(dir.path.string());
  EXPECT_EQ(bad.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(bad.status().message().find("`x` is placed in"), std::string::npos);
  fs::remove(dir.file("model.safetensors.index.json"));
  EXPECT_EQ(SafetensorsSet::open_dir(dir.path.string()).status().code(), StatusCode::kNotFound);
}

TEST(Safetensors, TruncatedFileNamesTheTensor) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  ASSERT_TRUE(
      write_safetensors(path, {{{"w", DType::kF32, {4}}, std::vector<uint8_t>(16)}}).is_ok());
  auto bytes = read_all(path);
  bytes.resize(bytes.size() - 1);
  write_all(path, bytes);
  const auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(f.status().message().find(path + ": tensor `w`: data_offsets [0,16] run past the data "
                                             "section (15 bytes)"),
            std::string::npos)
      << f.status().message();
  bytes.resize(5);
  write_all(path, bytes);
  EXPECT_NE(SafetensorsFile::open(path).status().message().find("shorter than the 8-byte"),
            std::string::npos);
}

TEST(Safetensors, RejectsCorruptHeadersPrecisely) {
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  EXPECT_TRUE(parse_status(image(ok, 8)).is_ok());
  const auto expect = [](const std::vector<uint8_t>& img, StatusCode code,
                         const std::string& text) {
    const Status s = parse_status(img);
    EXPECT_EQ(s.code(), code) << s.to_string();
    EXPECT_NE(s.message().find(text), std::string::npos) << s.message();
    EXPECT_EQ(s.message().rfind("/x/model.safetensors", 0), 0u) << s.message();
  };
  expect(image(ok, 8, 1000), StatusCode::kDataLoss,
         "header length 1000 runs past the end of the file (" + std::to_string(8 + ok.size() + 8) +
             " bytes)");
  expect(image(R"({"a":{"dtype":"F32",)", 0), StatusCode::kInvalidArgument,
         "malformed JSON header");
  expect(image("[1,2]", 0), StatusCode::kInvalidArgument, "not an object");
  expect(image(R"({"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}})", 1),
         StatusCode::kInvalidArgument, "tensor `a`: unknown dtype \"F4\"");
  expect(image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
               R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
               12),
         StatusCode::kInvalidArgument, "tensor `b`: bytes [4, 12) overlap tensor `a` [0, 8)");
  expect(image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8),
         StatusCode::kInvalidArgument, "end before begin");
  expect(image(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
         StatusCode::kInvalidArgument, "tensor `a`: 8 bytes for F32 [3], expected 12");
  expect(image(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
         StatusCode::kInvalidArgument, "bad dimension");
  expect(
      image(
          R"({"a":{"dtype":"I8","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}})",
          8),
      StatusCode::kInvalidArgument, "overflows");
  expect(image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
               R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
               8),
         StatusCode::kInvalidArgument, "tensor `a`: duplicate name");
  expect(image(R"({"__metadata__":{"k":1}})", 0), StatusCode::kInvalidArgument, "__metadata__.k");
  // Gaps between tensors are allowed.
  EXPECT_TRUE(
      parse_status(image(R"({"a":{"dtype":"I8","shape":[1],"data_offsets":[4,5]}})", 8)).is_ok());
}

}  // namespace
}  // namespace dserve::model
