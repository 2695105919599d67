// The KV row formats (row_format.h): the byte counts of V4's served entry and indexer key, what
// the encodings keep (error bounds, RoPE channels in bf16, power-of-two scales), that rounding
// twice is rounding once (a stored row re-read and re-stored does not drift), and that the
// Hadamard rotation keeps dot products.

#include "dserve/kvstore/row_format.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "dserve/core/random.h"

namespace dserve::kvstore {
namespace {

std::vector<float> random_rows(int64_t rows, int64_t width, uint64_t seed, float spread) {
  SplitMix64 rng(seed);
  std::vector<float> out(static_cast<size_t>(rows * width));
  for (size_t i = 0; i < out.size(); ++i) {
    // Magnitudes over several octaves, so that blocks get different scales.
    out[i] =
        static_cast<float>(rng.normal()) * std::ldexp(1.0f, static_cast<int>(i / 64) % 5) * spread;
  }
  return out;
}

std::vector<float> round_trip(const RowFormat& f, std::vector<float> rows) {
  round_trip_rows(f, rows.data(), static_cast<int64_t>(rows.size()) / f.width);
  return rows;
}

TEST(RowFormat, ServedSizesAtV4Widths) {
  EXPECT_EQ(RowFormat::entry(KvDtype::kFp8, 512, 64).row_bytes(), 584);
  EXPECT_EQ(RowFormat::index_key(KvDtype::kFp8, 128).row_bytes(), 68);
  EXPECT_EQ(RowFormat::entry(KvDtype::kFp32, 512, 64).row_bytes(), 2048);
  EXPECT_EQ(RowFormat::index_key(KvDtype::kFp32, 128).row_bytes(), 512);
  // The presets' widths: every row a multiple of 4 bytes.
  EXPECT_EQ(RowFormat::entry(KvDtype::kFp8, 64, 16).row_bytes(), 88);
  EXPECT_EQ(RowFormat::entry(KvDtype::kFp8, 128, 32).row_bytes(), 168);
  EXPECT_EQ(RowFormat::index_key(KvDtype::kFp8, 32).row_bytes(), 17);
}

TEST(RowFormat, RefusesWidthsAnEncodingCannotHold) {
  EXPECT_FALSE(RowFormat::index_key(KvDtype::kFp8, 96).check().is_ok());  // not a power of two
  EXPECT_FALSE(RowFormat::index_key(KvDtype::kFp8, 16).check().is_ok());  // under one block
  EXPECT_FALSE((RowFormat{RowEncoding::kFp8Entry, 64, 65}).check().is_ok());
  EXPECT_FALSE((RowFormat{RowEncoding::kFp32, 0, 0}).check().is_ok());
  EXPECT_TRUE(RowFormat::index_key(KvDtype::kFp8, 128).check().is_ok());
  EXPECT_EQ(parse_kv_dtype("bf16").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(*parse_kv_dtype("fp8"), KvDtype::kFp8);
}

TEST(RowFormat, Fp32IsTheValuesBitForBit) {
  const RowFormat f = RowFormat::fp32(48);
  const auto x = random_rows(5, 48, 1, 1.0f);
  std::vector<std::byte> bytes(static_cast<size_t>(5 * f.row_bytes()));
  encode_rows(f, x.data(), 5, bytes.data());
  EXPECT_EQ(std::memcmp(bytes.data(), x.data(), bytes.size()), 0);
  EXPECT_EQ(round_trip(f, x), x);
}

TEST(RowFormat, Fp8EntryKeepsRopeInBf16AndTheRestWithinHalfAStep) {
  const RowFormat f = RowFormat::entry(KvDtype::kFp8, 512, 64);
  const int64_t rows = 40;
  const auto x = random_rows(rows, 512, 2, 0.3f);
  const auto y = round_trip(f, x);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x.data() + r * 512;
    const float* yr = y.data() + r * 512;
    for (int64_t b = 0; b < 7; ++b) {
      float amax = 0.0f;
      for (int64_t c = b * 64; c < (b + 1) * 64; ++c)
        amax = std::max(amax, std::fabs(xr[c]));
      // The scale is the power of two at or above amax / 448; e4m3's coarsest step below 448
      // is 32 units of the scale: an error of at most 16 of them.
      const float scale = std::exp2(std::ceil(std::log2(amax / 448.0f)));
      for (int64_t c = b * 64; c < (b + 1) * 64; ++c) {
        ASSERT_LE(std::fabs(yr[c] - xr[c]), 16.0f * scale) << "row " << r << " channel " << c;
        // Relative to the value: 2^-4 for a normal e4m3 code.
        if (std::fabs(xr[c]) / scale >= 0x1.0p-6f) {
          ASSERT_LE(std::fabs(yr[c] - xr[c]), std::fabs(xr[c]) * 0.0625f);
        }
      }
    }
    for (int64_t c = 448; c < 512; ++c) {
      uint32_t bits = 0;
      std::memcpy(&bits, yr + c, 4);
      EXPECT_EQ(bits & 0xFFFFu, 0u) << "RoPE channel " << c << " is not a bf16 value";
      ASSERT_LE(std::fabs(yr[c] - xr[c]), std::fabs(xr[c]) * 0x1.0p-8f);
    }
  }
}

TEST(RowFormat, RoundingTwiceIsRoundingOnce) {
  // An fp8 entry read back and written again keeps its values (a key decodes in the rotated
  // basis, so the same holds for it only through the indexer's query rotation: next test).
  for (const RowFormat& f :
       {RowFormat::entry(KvDtype::kFp8, 512, 64), RowFormat::entry(KvDtype::kFp8, 64, 16)}) {
    const auto once = round_trip(f, random_rows(64, f.width, 3, 2.0f));
    EXPECT_EQ(round_trip(f, once), once) << f.width << " channels";
  }
}

TEST(RowFormat, Fp4KeysKeepDotProductsThroughTheRotation) {
  const RowFormat f = RowFormat::index_key(KvDtype::kFp8, 128);
  const int64_t rows = 200;
  const auto keys = random_rows(rows, 128, 4, 1.0f);
  auto query = random_rows(1, 128, 5, 1.0f);
  std::vector<std::byte> bytes(static_cast<size_t>(rows * f.row_bytes()));
  encode_rows(f, keys.data(), rows, bytes.data());
  std::vector<float> decoded(keys.size());
  decode_rows(f, bytes.data(), rows, decoded.data());
  const auto exact_query = query;
  round_trip_rows(f, query.data(), 1);  // rotated and rounded as the indexer does
  double worst = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    double exact = 0.0, quantised = 0.0, norm_q = 0.0, norm_k = 0.0;
    for (int64_t c = 0; c < 128; ++c) {
      exact += static_cast<double>(exact_query[c]) * keys[r * 128 + c];
      quantised += static_cast<double>(query[c]) * decoded[r * 128 + c];
      norm_q += static_cast<double>(exact_query[c]) * exact_query[c];
      norm_k += static_cast<double>(keys[r * 128 + c]) * keys[r * 128 + c];
    }
    worst = std::max(worst, std::fabs(exact - quantised) / std::sqrt(norm_q * norm_k));
  }
  // fp4 keeps about 2 significant bits per channel: the product moves by a few percent of
  // |q| |k|, and without the rotation back it would be unrelated.
  EXPECT_LT(worst, 0.2) << "worst product error relative to |q||k|";
  std::fprintf(stderr, "[ info ] fp4 indexer keys (128 ch): worst |q.k error| / (|q||k|) = %.4f\n",
               worst);
}

// A device keeps decoded values (the GPU's fp32 pages); encoding them again gives rows that
// decode to the same values, fp4 keys included (they are not rotated a second time).
TEST(RowFormat, DecodedRowsEncodeBackToThemselves) {
  for (const RowFormat& f :
       {RowFormat::entry(KvDtype::kFp8, 512, 64), RowFormat::index_key(KvDtype::kFp8, 128),
        RowFormat::index_key(KvDtype::kFp8, 32)}) {
    const int64_t rows = 50;
    const auto x = random_rows(rows, f.width, 9, 1.5f);
    std::vector<std::byte> bytes(static_cast<size_t>(rows * f.row_bytes())), again(bytes.size());
    encode_rows(f, x.data(), rows, bytes.data());
    std::vector<float> decoded(x.size()), redecoded(x.size());
    decode_rows(f, bytes.data(), rows, decoded.data());
    encode_decoded_rows(f, decoded.data(), rows, again.data());
    decode_rows(f, again.data(), rows, redecoded.data());
    EXPECT_EQ(decoded, redecoded) << row_encoding_name(f.encoding) << " " << f.width;
  }
}

TEST(RowFormat, ZeroRowsAndEncodingAreDeterministic) {
  const RowFormat f = RowFormat::entry(KvDtype::kFp8, 512, 64);
  std::vector<float> zeros(512, 0.0f);
  EXPECT_EQ(round_trip(f, zeros), zeros);
  const auto x = random_rows(3, 512, 6, 1.0f);
  std::vector<std::byte> a(static_cast<size_t>(3 * f.row_bytes())), b(a.size());
  encode_rows(f, x.data(), 3, a.data());
  encode_rows(f, x.data(), 3, b.data());
  EXPECT_EQ(a, b);
}

}  // namespace
}  // namespace dserve::kvstore
