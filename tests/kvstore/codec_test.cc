// The codec: lossless round trips bit for bit, fp8 stays within its error bounds (and its
// scalar conversions match the e4m3fn / bf16 definitions), and no truncated, bit-flipped or
// misaddressed value is ever decoded.

#include "dserve/kvstore/codec.h"

#include <gtest/gtest.h>
#include <xxhash.h>

#include <bit>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>

#include "dserve/core/random.h"
#include "scalar_formats.h"

namespace dserve::kvstore {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// A CSA layer's compressed entries for one block: 128 tokens / rate 4 = 32 entries.
const PayloadLayout kSmallCsa{{{32, 128, 32}}};  // the small preset: head_dim 128, rope 32
const PayloadLayout kV4Csa{{{32, 512, 64}}};     // V4: head_dim 512, rope 64
// Two segments of other shapes, as a multi-layer payload has.
const PayloadLayout kMixed{{{32, 128, 32}, {8, 64, 16}}};

const BlockKey kKey{0x0123456789abcdefULL, 0xfedcba9876543210ULL};

std::vector<float> random_payload(const PayloadLayout& layout, uint64_t seed) {
  SplitMix64 rng(seed);
  std::vector<float> data(static_cast<size_t>(layout.floats()));
  for (float& x : data)
    x = static_cast<float>(rng.normal());
  return data;
}

void expect_data_loss(const Result<std::vector<float>>& r, const std::string& what) {
  ASSERT_FALSE(r.is_ok()) << what << ": a corrupt value was decoded";
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss) << what << ": " << r.status().to_string();
}

// Recomputes the trailing checksum, to forge values that only the later checks can refuse.
void reseal(std::vector<uint8_t>& value) {
  const uint64_t sum = XXH3_64bits(value.data(), value.size() - kCodecChecksumBytes);
  for (size_t i = 0; i < 8; ++i)
    value[value.size() - 8 + i] = static_cast<uint8_t>(sum >> (8 * i));
}

// bf16 round-to-nearest-even from first principles: 8 significant bits (normal inputs).
float reference_bf16(float x) {
  if (x == 0.0f || !std::isfinite(x)) return x;
  int e = 0;
  const double m = std::frexp(static_cast<double>(x), &e);  // |m| in [0.5, 1)
  return static_cast<float>(std::ldexp(std::nearbyint(m * 256.0), e - 8));
}

TEST(Codec, NamesRoundTrip) {
  for (Codec c : {Codec::kLossless, Codec::kFp8}) {
    const auto parsed = parse_codec(codec_name(c));
    ASSERT_TRUE(parsed.is_ok());
    EXPECT_EQ(*parsed, c);
  }
  const auto bad = parse_codec("FP8");
  ASSERT_FALSE(bad.is_ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("'FP8'"), std::string::npos);
}

TEST(Codec, LosslessRoundTripIsBitExact) {
  std::vector<float> data = random_payload(kMixed, 1);
  // Values a careless codec loses: subnormals, signed zeros, extremes, non-finite values.
  const float specials[] = {-0.0f,
                            0.0f,
                            std::numeric_limits<float>::denorm_min(),
                            -0x1.234p-140f,
                            std::numeric_limits<float>::min(),
                            std::numeric_limits<float>::max(),
                            -std::numeric_limits<float>::max(),
                            kInf,
                            -kInf,
                            1e-40f};
  for (size_t i = 0; i < std::size(specials); ++i)
    data[i * 37] = specials[i];
  for (Pool pool : kAllPools) {
    const auto value = encode_payload(kKey, pool, Codec::kLossless, kMixed, data);
    EXPECT_EQ(value.size(), encoded_size(pool, Codec::kLossless, kMixed));
    const auto decoded = decode_payload(kKey, pool, kMixed, value);
    ASSERT_TRUE(decoded.is_ok()) << decoded.status().to_string();
    ASSERT_EQ(decoded->size(), data.size());
    EXPECT_EQ(std::memcmp(decoded->data(), data.data(), data.size() * sizeof(float)), 0)
        << pool_name(pool);
  }
}

TEST(Codec, EmptyLayoutRoundTrips) {
  const PayloadLayout empty;
  const auto value =
      encode_payload(kKey, Pool::kSnapshot, Codec::kLossless, empty, std::span<const float>());
  EXPECT_EQ(value.size(), kCodecHeaderBytes + kCodecChecksumBytes);
  const auto decoded = decode_payload(kKey, Pool::kSnapshot, empty, value);
  ASSERT_TRUE(decoded.is_ok()) << decoded.status().to_string();
  EXPECT_TRUE(decoded->empty());
}

TEST(Codec, Fp8OnlyAppliesToTheCompressedPool) {
  const std::vector<float> data = random_payload(kMixed, 2);
  for (Pool pool : {Pool::kIndexKeys, Pool::kSnapshot}) {
    EXPECT_EQ(effective_codec(pool, Codec::kFp8), Codec::kLossless);
    const auto value = encode_payload(kKey, pool, Codec::kFp8, kMixed, data);
    EXPECT_EQ(value, encode_payload(kKey, pool, Codec::kLossless, kMixed, data));
    EXPECT_EQ(encoded_size(pool, Codec::kFp8, kMixed),
              encoded_size(pool, Codec::kLossless, kMixed));
    const auto decoded = decode_payload(kKey, pool, kMixed, value);
    ASSERT_TRUE(decoded.is_ok()) << decoded.status().to_string();
    EXPECT_EQ(std::memcmp(decoded->data(), data.data(), data.size() * sizeof(float)), 0);
  }
  EXPECT_EQ(effective_codec(Pool::kCompressed, Codec::kFp8), Codec::kFp8);
  EXPECT_LT(encoded_size(Pool::kCompressed, Codec::kFp8, kMixed),
            encoded_size(Pool::kCompressed, Codec::kLossless, kMixed) / 2);
}

// Per row: every non-RoPE channel within 1/28 of the row's max |x| (half an e4m3 step at the
// top of the range; the brief's bound is 2^-4), within 2^-4 of |x| where x / scale is an e4m3
// normal; every RoPE channel equal to bf16 round-to-nearest-even of x.
TEST(Codec, Fp8ErrorIsBounded) {
  for (const PayloadLayout* layout : {&kSmallCsa, &kV4Csa, &kMixed}) {
    std::vector<float> data = random_payload(*layout, 3);
    // Rows of very different magnitudes (the scale is per row), one all-zero row, one with a
    // single non-zero value, one of subnormals.
    SplitMix64 rng(4);
    int64_t offset = 0;
    for (const Segment& s : layout->segments) {
      for (int64_t r = 0; r < s.rows; ++r) {
        float* row = data.data() + offset + r * s.width;
        const float magnitude = std::pow(10.0f, static_cast<float>(rng.uniform() * 10.0 - 6.0));
        for (int64_t c = 0; c < s.width; ++c)
          row[c] *= magnitude;
        if (r == 1) std::fill(row, row + s.width, 0.0f);
        if (r == 2) std::fill(row, row + s.width - s.rope_channels - 1, 0.0f);
        if (r == 3) {
          for (int64_t c = 0; c < s.width - s.rope_channels; ++c)
            row[c] = std::ldexp(static_cast<float>(c % 7) - 3.0f, -140);
        }
      }
      offset += s.rows * s.width;
    }
    const auto value = encode_payload(kKey, Pool::kCompressed, Codec::kFp8, *layout, data);
    EXPECT_EQ(value.size(), encoded_size(Pool::kCompressed, Codec::kFp8, *layout));
    const auto decoded = decode_payload(kKey, Pool::kCompressed, *layout, value);
    ASSERT_TRUE(decoded.is_ok()) << decoded.status().to_string();

    offset = 0;
    double worst_of_row_max = 0.0;
    for (const Segment& s : layout->segments) {
      const int64_t nope = s.width - s.rope_channels;
      for (int64_t r = 0; r < s.rows; ++r) {
        const float* x = data.data() + offset + r * s.width;
        const float* y = decoded->data() + offset + r * s.width;
        float amax = 0.0f;
        for (int64_t c = 0; c < nope; ++c)
          amax = std::max(amax, std::fabs(x[c]));
        const double scale = amax / 448.0;
        for (int64_t c = 0; c < nope; ++c) {
          const double err = std::fabs(static_cast<double>(x[c]) - y[c]);
          ASSERT_LE(err, amax / 28.0 * (1 + 1e-5) + 0x1p-149)
              << "row " << r << " channel " << c << ": " << x[c] << " -> " << y[c];
          ASSERT_LE(err, amax * 0x1p-4);
          if (std::fabs(x[c]) >= 0x1p-6 * scale && amax >= std::numeric_limits<float>::min()) {
            ASSERT_LE(err, std::fabs(x[c]) * 0x1p-4 * (1 + 1e-5)) << x[c] << " -> " << y[c];
          }
          if (x[c] == 0.0f) {
            ASSERT_EQ(std::signbit(y[c]), std::signbit(x[c]));
          }
          if (amax > 0) worst_of_row_max = std::max(worst_of_row_max, err / amax);
        }
        for (int64_t c = nope; c < s.width; ++c)
          ASSERT_EQ(y[c], reference_bf16(x[c])) << "rope channel " << c << " of row " << r;
      }
      offset += s.rows * s.width;
    }
    std::printf("fp8 worst error / row max: %.5f (bound 1/28 = %.5f)\n", worst_of_row_max,
                1.0 / 28.0);
  }
}

TEST(Codec, Fp8KeepsGridValuesExactAndNonFiniteValuesDefined) {
  const PayloadLayout layout{{{2, 8, 2}}};
  // Row 0: max 448 gives scale 1, so e4m3 grid values come back exactly.
  // Row 1: NaN stays NaN, +-inf saturate to +-(448 * scale) with the scale of the finite 2.
  std::vector<float> data = {448.0f, -0.5f, 0.015625f, -240.0f, 0x1p-9f, 0.0f, 1.5f, -3.0f,
                             kNaN,   kInf,  -kInf,     2.0f,    -1.0f,   0.5f, kInf, kNaN};
  const auto value = encode_payload(kKey, Pool::kCompressed, Codec::kFp8, layout, data);
  const auto decoded = decode_payload(kKey, Pool::kCompressed, layout, value);
  ASSERT_TRUE(decoded.is_ok()) << decoded.status().to_string();
  const std::vector<float>& y = *decoded;
  for (int c = 0; c < 8; ++c)
    EXPECT_EQ(y[static_cast<size_t>(c)], data[static_cast<size_t>(c)]) << c;
  EXPECT_TRUE(std::isnan(y[8]));
  EXPECT_FLOAT_EQ(y[9], 2.0f);
  EXPECT_FLOAT_EQ(y[10], -2.0f);
  EXPECT_FLOAT_EQ(y[11], 2.0f);
  EXPECT_FLOAT_EQ(y[12], -1.0f);
  EXPECT_FLOAT_EQ(y[13], 0.5f);
  EXPECT_EQ(y[14], kInf);  // bf16 has infinities
  EXPECT_TRUE(std::isnan(y[15]));
}

// The codec's e4m3fn conversion against its definition: every finite code round-trips, every
// float goes to the nearest code (ties to the even code), magnitudes past 448 saturate.
TEST(Codec, E4m3MatchesTheDefinition) {
  using internal::e4m3_to_f32;
  using internal::f32_to_e4m3;
  for (int b = 0; b < 256; ++b) {
    const auto code = static_cast<uint8_t>(b);
    const float v = e4m3_to_f32(code);
    if ((b & 0x7F) == 0x7F) {
      EXPECT_TRUE(std::isnan(v)) << b;
      continue;
    }
    EXPECT_EQ(f32_to_e4m3(v), code) << b << " = " << v;
  }
  EXPECT_FLOAT_EQ(e4m3_to_f32(0x7E), 448.0f);
  EXPECT_FLOAT_EQ(e4m3_to_f32(0x01), 0x1p-9f);
  EXPECT_FLOAT_EQ(e4m3_to_f32(0x08), 0x1p-6f);
  EXPECT_EQ(f32_to_e4m3(kNaN), 0x7F);
  EXPECT_EQ(f32_to_e4m3(kInf), 0x7E);
  EXPECT_EQ(f32_to_e4m3(-kInf), 0xFE);
  EXPECT_EQ(f32_to_e4m3(1e9f), 0x7E);
  EXPECT_EQ(f32_to_e4m3(463.9f), 0x7E);
  // Midpoints between neighbouring positive codes round to the even one.
  for (int c = 0; c < 0x7E; ++c) {
    const double lo = e4m3_to_f32(static_cast<uint8_t>(c));
    const double hi = e4m3_to_f32(static_cast<uint8_t>(c + 1));
    const auto mid = static_cast<float>((lo + hi) / 2);
    const int even = (c % 2 == 0) ? c : c + 1;
    EXPECT_EQ(f32_to_e4m3(mid), even) << "midpoint of " << c << " and " << c + 1;
    EXPECT_EQ(f32_to_e4m3(-mid), 0x80 | even);
  }
  // Random values: the nearest finite code by brute force.
  SplitMix64 rng(5);
  for (int i = 0; i < 20000; ++i) {
    const auto x = static_cast<float>((rng.uniform() * 2 - 1) * std::ldexp(1.0, -12 + i % 22));
    int best = -1;
    double best_err = 0.0;
    for (int b = 0; b < 256; ++b) {
      const float v = e4m3_to_f32(static_cast<uint8_t>(b));
      if (std::isnan(v) || std::signbit(v) != std::signbit(x)) continue;
      const double err = std::fabs(static_cast<double>(v) - x);
      if (best < 0 || err < best_err) {
        best = b;
        best_err = err;
      }
    }
    ASSERT_EQ(f32_to_e4m3(x), best) << x;
  }
}

TEST(Codec, Bf16RoundsToNearestEven) {
  using internal::bf16_to_f32;
  using internal::f32_to_bf16;
  SplitMix64 rng(6);
  for (int i = 0; i < 100000; ++i) {
    const auto x = std::bit_cast<float>(static_cast<uint32_t>(rng.next()));
    if (!std::isfinite(x) || std::fabs(x) < std::numeric_limits<float>::min() ||
        std::fabs(x) > 0x1.fep127f)
      continue;
    ASSERT_EQ(bf16_to_f32(f32_to_bf16(x)), reference_bf16(x)) << x;
  }
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 0x1p-8f)), 1.0f);  // a tie goes to even
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 0x3p-8f)), 1.0f + 0x1p-6f);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::bit_cast<float>(0x7F800001u)))));
}

// Bytes per token per layer of a CSA layer's compressed entries (the fp8 pool): 32 entries
// per 128-token block, plus the value's 48 bytes of header and checksum.
TEST(Codec, SizesPerTokenPerLayer) {
  struct Case {
    const char* name;
    const PayloadLayout* layout;
    size_t lossless;
    size_t fp8;
  };
  // lossless: 32 * width * 4; fp8: 32 * (4 + 2 * rope + (width - rope)); both + 48.
  const Case cases[] = {{"small CSA (head_dim 128, rope 32)", &kSmallCsa, 16432, 5296},
                        {"V4 CSA (head_dim 512, rope 64)", &kV4Csa, 65584, 18608}};
  for (const Case& c : cases) {
    for (Codec codec : {Codec::kLossless, Codec::kFp8}) {
      const auto value =
          encode_payload(kKey, Pool::kCompressed, codec, *c.layout, random_payload(*c.layout, 7));
      EXPECT_EQ(value.size(), encoded_size(Pool::kCompressed, codec, *c.layout));
    }
    const size_t lossless = encoded_size(Pool::kCompressed, Codec::kLossless, *c.layout);
    const size_t fp8 = encoded_size(Pool::kCompressed, Codec::kFp8, *c.layout);
    EXPECT_EQ(lossless, c.lossless);
    EXPECT_EQ(fp8, c.fp8);
    std::printf("%s: lossless %.3f B/token/layer, fp8 %.3f B/token/layer (%.2fx smaller)\n", c.name,
                static_cast<double>(lossless) / kBlockTokens,
                static_cast<double>(fp8) / kBlockTokens,
                static_cast<double>(lossless) / static_cast<double>(fp8));
  }
}

TEST(Codec, EveryBitFlipIsDataLoss) {
  const PayloadLayout layout{{{2, 8, 2}, {1, 4, 0}}};
  const std::vector<float> data = random_payload(layout, 8);
  for (Codec codec : {Codec::kLossless, Codec::kFp8}) {
    const auto value = encode_payload(kKey, Pool::kCompressed, codec, layout, data);
    ASSERT_TRUE(decode_payload(kKey, Pool::kCompressed, layout, value).is_ok());
    for (size_t pos = 0; pos < value.size(); ++pos) {
      for (int bit = 0; bit < 8; ++bit) {
        std::vector<uint8_t> bad = value;
        bad[pos] ^= static_cast<uint8_t>(1u << bit);
        expect_data_loss(decode_payload(kKey, Pool::kCompressed, layout, bad),
                         std::string(codec_name(codec)) + " byte " + std::to_string(pos) + " bit " +
                             std::to_string(bit));
      }
    }
  }
}

TEST(Codec, EveryTruncationAndExtensionIsDataLoss) {
  const std::vector<float> data = random_payload(kMixed, 9);
  for (Codec codec : {Codec::kLossless, Codec::kFp8}) {
    const auto value = encode_payload(kKey, Pool::kCompressed, codec, kMixed, data);
    for (size_t n = 0; n < value.size(); ++n) {
      expect_data_loss(decode_payload(kKey, Pool::kCompressed, kMixed, std::span(value).first(n)),
                       "truncated to " + std::to_string(n));
    }
    std::vector<uint8_t> longer = value;
    longer.push_back(0);
    expect_data_loss(decode_payload(kKey, Pool::kCompressed, kMixed, longer), "extended");
  }
}

TEST(Codec, WrongKeyPoolOrLayoutIsDataLoss) {
  const std::vector<float> data = random_payload(kMixed, 10);
  const auto value = encode_payload(kKey, Pool::kIndexKeys, Codec::kLossless, kMixed, data);

  const auto other_key = decode_payload({kKey.hi, kKey.lo ^ 1}, Pool::kIndexKeys, kMixed, value);
  expect_data_loss(other_key, "other key");
  EXPECT_NE(other_key.status().message().find("written for block " + kKey.to_hex()),
            std::string::npos)
      << other_key.status().message();

  const auto other_pool = decode_payload(kKey, Pool::kSnapshot, kMixed, value);
  expect_data_loss(other_pool, "other pool");
  EXPECT_NE(other_pool.status().message().find("pool index_keys"), std::string::npos)
      << other_pool.status().message();

  // Same number of floats, other segments.
  const PayloadLayout reshaped{{{64, 64, 16}, {8, 64, 16}}};
  ASSERT_EQ(reshaped.floats(), kMixed.floats());
  const auto other_layout = decode_payload(kKey, Pool::kIndexKeys, reshaped, value);
  expect_data_loss(other_layout, "other layout");
  EXPECT_NE(other_layout.status().message().find("another layout"), std::string::npos)
      << other_layout.status().message();
}

// Values with a valid checksum that are still wrong: the checks after the checksum refuse
// them (a buggy or foreign writer, or a future format).
TEST(Codec, ForgedValuesAreDataLoss) {
  const std::vector<float> data = random_payload(kMixed, 11);
  const auto value = encode_payload(kKey, Pool::kSnapshot, Codec::kLossless, kMixed, data);
  struct Forgery {
    size_t at;
    uint8_t byte;
    const char* expect;
  };
  const Forgery forgeries[] = {{4, 2, "format version 2"},
                               {6, 7, "unknown codec 7"},
                               {6, 1, "codec fp8 is never applied"},
                               {7, 9, "unknown pool 9"}};
  for (const Forgery& f : forgeries) {
    std::vector<uint8_t> bad = value;
    bad[f.at] = f.byte;
    reseal(bad);
    const auto r = decode_payload(kKey, Pool::kSnapshot, kMixed, bad);
    expect_data_loss(r, f.expect);
    EXPECT_NE(r.status().message().find(f.expect), std::string::npos) << r.status().message();
  }
  // An fp8 value whose payload length does not fit the layout it claims.
  const auto fp8 = encode_payload(kKey, Pool::kCompressed, Codec::kFp8, kMixed, data);
  std::vector<uint8_t> lossless_claim = fp8;
  lossless_claim[6] = 0;
  reseal(lossless_claim);
  const auto r = decode_payload(kKey, Pool::kCompressed, kMixed, lossless_claim);
  expect_data_loss(r, "fp8 payload labelled lossless");
  EXPECT_NE(r.status().message().find("the layout needs"), std::string::npos)
      << r.status().message();
}

// Random garbage, some of it with a valid-looking header, is never decoded.
TEST(Codec, RandomBytesAreNeverDecoded) {
  const PayloadLayout layout{{{2, 8, 2}}};
  const auto valid =
      encode_payload(kKey, Pool::kCompressed, Codec::kFp8, layout, random_payload(layout, 12));
  SplitMix64 rng(13);
  for (int i = 0; i < 20000; ++i) {
    std::vector<uint8_t> bytes;
    if (i % 2 == 0) {
      bytes.resize(rng.below(2 * valid.size()));
      for (uint8_t& b : bytes)
        b = static_cast<uint8_t>(rng.next());
      // Keep the header's first bytes half of the time, to get past the magic and version.
      if (i % 4 == 0) std::copy_n(valid.begin(), std::min<size_t>(bytes.size(), 40), bytes.begin());
    } else {
      bytes = valid;
      const uint64_t flips = 2 + rng.below(6);
      for (uint64_t f = 0; f < flips; ++f)
        bytes[rng.below(bytes.size())] ^= static_cast<uint8_t>(1 + rng.below(255));
      if (bytes == valid) continue;
    }
    expect_data_loss(decode_payload(kKey, Pool::kCompressed, layout, bytes),
                     "random value " + std::to_string(i));
  }
}

TEST(CodecDeathTest, PayloadOfTheWrongSizeIsAProgrammerError) {
  const std::vector<float> data(10);
  EXPECT_DEATH((void)encode_payload(kKey, Pool::kCompressed, Codec::kLossless, kSmallCsa, data),
               "layout.s number of bytes");
}

}  // namespace
}  // namespace dserve::kvstore
