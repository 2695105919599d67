// Deterministic parameter values and the output tensors of a generated checkpoint.

#include "generated_tensors.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <numbers>

#include "block_quant.h"
#include "dserve/core/random.h"

namespace dserve::model {
namespace {

constexpr uint64_t kGamma = kSplitMix64Gamma;
constexpr uint64_t mix(uint64_t z) {
  return splitmix64_mix(z);
}
double uniform_open(uint64_t bits) {  // (0, 1]: never 0, so the log below is finite
  return static_cast<double>((bits >> 11) + 1) * 0x1.0p-53;
}

// Standard normals i in [first, last) of stream `key`: pair p = i / 2 is one Box-Muller draw
// from uniforms 2p and 2p + 1 (cos for even i, sin for odd i).
void normals(uint64_t key, int64_t first, int64_t last, float* out, double scale, double shift) {
  for (int64_t i = first; i < last;) {
    const auto p = static_cast<uint64_t>(i >> 1);
    const double u1 = uniform_open(mix(key + (2 * p + 1) * kGamma));
    const double u2 = uniform_open(mix(key + (2 * p + 2) * kGamma));
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double theta = 2.0 * std::numbers::pi * u2;
    if ((i & 1) == 0) {
      out[i - first] = static_cast<float>(shift + scale * r * std::cos(theta));
      ++i;
    }
    if (i < last) {
      out[i - first] = static_cast<float>(shift + scale * r * std::sin(theta));
      ++i;
    }
  }
}

uint64_t spec_key(const ParamSpec& spec, uint64_t seed) {
  return stream_seed(seed, spec.name);
}

void put_f32(float v, uint8_t* dst) {
  std::memcpy(dst, &v, 4);
}
void put_bf16(float v, uint8_t* dst) {
  const uint16_t b = f32_to_bf16(v);
  std::memcpy(dst, &b, 2);
}

}  // namespace

void generate_values(const ParamSpec& spec, uint64_t seed, int64_t row0, int64_t rows, float* out) {
  const double fan = static_cast<double>(spec.cols());
  double scale = 1.0;
  double shift = 0.0;
  switch (spec.init) {
    case ParamInit::kEmbed:
    case ParamInit::kSink:
    case ParamInit::kTokenExperts:
      break;
    case ParamInit::kLinear:
      scale = 1.0 / std::sqrt(fan);
      break;
    case ParamInit::kNorm:
      scale = 0.1;
      shift = 1.0;
      break;
    case ParamInit::kApe:
    case ParamInit::kHcBase:
      scale = 0.5;
      break;
    case ParamInit::kHcFn:
      scale = 0.5 / std::sqrt(fan);
      break;
    case ParamInit::kHcScale:
      scale = 0.1;
      shift = 0.5;
      break;
    case ParamInit::kGateBias:
      scale = 0.1;
      break;
  }
  const int64_t cols = spec.cols();
  normals(spec_key(spec, seed), row0 * cols, (row0 + rows) * cols, out, scale, shift);
}

void generate_ids(const ParamSpec& spec, uint64_t seed, int64_t n_experts, int64_t row0,
                  int64_t rows, int64_t* out) {
  const uint64_t key = spec_key(spec, seed);
  const int64_t k = spec.cols();
  DSERVE_CHECK(k <= n_experts);
  for (int64_t r = 0; r < rows; ++r) {
    const uint64_t row_key = mix(key + static_cast<uint64_t>(row0 + r + 1) * 0xD1B54A32D192ED03ULL);
    int64_t* ids = out + r * k;
    uint64_t draw = 0;
    for (int64_t j = 0; j < k;) {
      const auto id =
          static_cast<int64_t>(mix(row_key + (++draw) * kGamma) % static_cast<uint64_t>(n_experts));
      if (std::find(ids, ids + j, id) == ids + j) ids[j++] = id;
    }
  }
}

Result<std::vector<OutputTensor>> plan_output_tensors(const std::vector<ParamSpec>& specs,
                                                      ModelInitOptions::Layout layout,
                                                      ModelInitOptions::DType dtype) {
  using Layout = ModelInitOptions::Layout;
  using Mode = ModelInitOptions::DType;
  const bool hf = layout == Layout::kTransformers;
  if (hf && dtype == Mode::kPacked) {
    return invalid_argument(
        "the transformers layout is written in bf16 or f32; the packed FP8/MXFP4 dtypes exist "
        "in the official layout only");
  }
  std::map<std::string, OutputTensor> out;
  const auto plain = [&](const ParamSpec& s, const std::string& name,
                         const std::vector<int64_t>& shape, int64_t first_row, OutputEncoding enc) {
    OutputTensor& t = out[name];
    if (t.pieces.empty()) {
      t.decl = {name,
                enc == OutputEncoding::kF32    ? DType::kF32
                : enc == OutputEncoding::kBf16 ? DType::kBF16
                                               : DType::kI64,
                shape};
      t.encoding = enc;
      t.row_bytes = s.cols() * dtype_size(t.decl.dtype);
      t.rows = 1;
      for (size_t i = 0; i + 1 < shape.size(); ++i)
        t.rows *= shape[i];
      t.row_cost = s.cols();
    }
    t.pieces.push_back({&s, first_row});
  };
  for (const ParamSpec& s : specs) {
    if (hf && s.hf_name.empty()) continue;
    const std::string& name = hf ? s.hf_name : s.name;
    const std::vector<int64_t>& shape = hf ? s.hf_shape : s.shape;
    if (s.ids != nullptr) {
      plain(s, name, shape, 0, OutputEncoding::kI64);
      continue;
    }
    const PackedFormat f = dtype == Mode::kPacked ? s.packed
                           : dtype == Mode::kBf16 ? PackedFormat::kBf16
                                                  : PackedFormat::kF32;
    if (f == PackedFormat::kF32 || f == PackedFormat::kBf16) {
      plain(s, name, shape, s.hf_row * (hf ? 1 : 0),
            f == PackedFormat::kF32 ? OutputEncoding::kF32 : OutputEncoding::kBf16);
      continue;
    }
    const int64_t rows = s.shape[0];
    const int64_t cols = s.shape[1];
    const std::string scale = official_scale_name(s.name);
    if (f == PackedFormat::kFp8) {
      out[name] = {{name, DType::kF8E4M3, s.shape},
                   OutputEncoding::kFp8Weight,
                   {{&s, 0}},
                   rows,
                   cols,
                   kFp8Block,
                   cols};
      out[scale] = {{scale, DType::kF8E8M0, {ceil_div(rows, kFp8Block), ceil_div(cols, kFp8Block)}},
                    OutputEncoding::kFp8Scale,
                    {{&s, 0}},
                    ceil_div(rows, kFp8Block),
                    ceil_div(cols, kFp8Block),
                    1,
                    kFp8Block * cols};
      continue;
    }
    if (cols % kFp4Group != 0) {
      return invalid_argument("`" + s.name +
                              "`: MXFP4 needs an input width that is a multiple of " +
                              "32, found " + std::to_string(cols));
    }
    out[name] = {{name, DType::kI8, {rows, cols / 2}},
                 OutputEncoding::kFp4Weight,
                 {{&s, 0}},
                 rows,
                 cols / 2,
                 1,
                 cols};
    out[scale] = {{scale, DType::kF8E8M0, {rows, cols / kFp4Group}},
                  OutputEncoding::kFp4Scale,
                  {{&s, 0}},
                  rows,
                  cols / kFp4Group,
                  1,
                  cols};
  }
  std::vector<OutputTensor> result;
  for (auto& [name, t] : out) {
    std::sort(t.pieces.begin(), t.pieces.end(),
              [](const OutputPiece& a, const OutputPiece& b) { return a.first_row < b.first_row; });
    result.push_back(std::move(t));
  }
  return result;
}

void fill_output_rows(const OutputTensor& t, uint64_t seed, int64_t n_experts, int64_t row0,
                      int64_t row1, uint8_t* dst) {
  DSERVE_CHECK(row0 % t.row_align == 0 && (row1 % t.row_align == 0 || row1 == t.rows));
  const ParamSpec& first = *t.pieces.front().spec;
  const int64_t cols = first.cols();
  std::vector<float> values;
  switch (t.encoding) {
    case OutputEncoding::kI64: {
      std::vector<int64_t> ids(static_cast<size_t>((row1 - row0) * cols));
      generate_ids(first, seed, n_experts, row0, row1 - row0, ids.data());
      std::memcpy(dst, ids.data(), ids.size() * 8);
      return;
    }
    case OutputEncoding::kF32:
    case OutputEncoding::kBf16: {
      const int64_t esize = t.encoding == OutputEncoding::kF32 ? 4 : 2;
      for (const OutputPiece& piece : t.pieces) {
        const int64_t a = std::max(row0, piece.first_row);
        const int64_t b = std::min(row1, piece.first_row + piece.spec->rows());
        if (a >= b) continue;
        values.resize(static_cast<size_t>((b - a) * cols));
        generate_values(*piece.spec, seed, a - piece.first_row, b - a, values.data());
        uint8_t* o = dst + (a - row0) * cols * esize;
        for (size_t i = 0; i < values.size(); ++i) {
          if (esize == 4) {
            put_f32(values[i], o + 4 * i);
          } else {
            put_bf16(values[i], o + 2 * i);
          }
        }
      }
      return;
    }
    case OutputEncoding::kFp8Weight:
    case OutputEncoding::kFp8Scale: {
      const int64_t total = first.rows();
      const int64_t scale_cols = ceil_div(cols, kFp8Block);
      std::vector<uint8_t> q;
      std::vector<uint8_t> scales(static_cast<size_t>(scale_cols));
      const bool weight = t.encoding == OutputEncoding::kFp8Weight;
      // Whole 128-row stripes: a block's scale depends on all of its rows.
      const int64_t s0 = weight ? row0 / kFp8Block : row0;
      const int64_t s1 = weight ? ceil_div(row1, kFp8Block) : row1;
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t r0 = s * kFp8Block;
        const int64_t n = std::min(kFp8Block, total - r0);
        values.resize(static_cast<size_t>(n * cols));
        q.resize(values.size());
        generate_values(first, seed, r0, n, values.data());
        quantize_fp8_block_row(values.data(), n, cols, q.data(), scales.data());
        if (weight) {
          std::memcpy(dst + (r0 - row0) * cols, q.data(), q.size());
        } else {
          std::memcpy(dst + (s - row0) * scale_cols, scales.data(), scales.size());
        }
      }
      return;
    }
    case OutputEncoding::kFp4Weight:
    case OutputEncoding::kFp4Scale: {
      const int64_t n = row1 - row0;
      values.resize(static_cast<size_t>(n * cols));
      generate_values(first, seed, row0, n, values.data());
      std::vector<uint8_t> packed(static_cast<size_t>(n * cols / 2));
      std::vector<uint8_t> scales(static_cast<size_t>(n * cols / kFp4Group));
      quantize_fp4(values.data(), n, cols, packed.data(), scales.data());
      const auto& src = t.encoding == OutputEncoding::kFp4Weight ? packed : scales;
      std::memcpy(dst, src.data(), src.size());
      return;
    }
  }
}

}  // namespace dserve::model
