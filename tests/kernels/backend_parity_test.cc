// Every op on every available backend against the CPU reference (cpu_ops.h), one
// parametrised test over (backend, op case). Shapes come from the V4 config (hidden 4096,
// q_lora 1024, 64 heads of 512 channels of which 64 rotate, 1 / 7 / 128 tokens), plus tiny,
// odd and empty ones that catch tails and bounds. A backend that cannot run here (no GPU, or
// a build without it) reports each of its cases as SKIPPED with the reason. A new op adds its
// cases to all_cases() and a branch to each run_* function.

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <ostream>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "dserve/kernels/cpu_ops.h"
#include "dserve/kernels/cuda_ops.h"
#include "dserve/kernels/device.h"
#include "dserve/kernels/rope.h"

namespace dserve::kernels {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kEps = 1e-6f;  // rms_norm_eps of the V4 config

enum class Op { kMatmul, kMatmulBf16, kRmsNorm, kRope, kSoftmax };

const char* op_name(Op op) {
  switch (op) {
    case Op::kMatmul:
      return "matmul";
    case Op::kMatmulBf16:
      return "matmul_bf16";
    case Op::kRmsNorm:
      return "rms_norm";
    case Op::kRope:
      return "rope";
    case Op::kSoftmax:
      return "softmax";
  }
  return "?";
}

// One op at one shape. Fields an op does not use stay at their defaults.
struct OpCase {
  Op op;
  std::string name;            // distinguishes cases of one op in the test name
  int64_t rows;                // matmul: n; the others: rows of x
  int64_t width;               // matmul: k; rms_norm: d; rope: dim; softmax: n
  int64_t out = 0;             // matmul: m
  int64_t y_stride = 0;        // matmul: row stride of y (0: m)
  int64_t half = 0;            // rope: rotating pairs (the last 2 * half channels)
  int64_t rows_per_angle = 1;  // rope: consecutive rows sharing one row of cos/sin
  bool weighted = false;       // rms_norm
  bool inverse = false;        // rope

  int64_t stride() const { return y_stride == 0 ? out : y_stride; }
};

void PrintTo(const OpCase& c, std::ostream* os) {
  *os << op_name(c.op) << "/" << c.name << " rows " << c.rows << " width " << c.width;
}

std::vector<OpCase> all_cases() {
  std::vector<OpCase> cases;
  for (const Op op : {Op::kMatmul, Op::kMatmulBf16}) {
    for (const int64_t t : {1, 7, 128}) {
      const std::string tokens = "tokens" + std::to_string(t);
      cases.push_back({.op = op, .name = "wq_a_" + tokens, .rows = t, .width = 4096, .out = 1024});
      cases.push_back(
          {.op = op, .name = "wq_b_" + tokens, .rows = t, .width = 1024, .out = 64 * 512});
    }
    cases.push_back({.op = op, .name = "tiny64_rows7", .rows = 7, .width = 64, .out = 64});
    cases.push_back(
        {.op = op, .name = "odd_strided", .rows = 3, .width = 67, .out = 33, .y_stride = 40});
    cases.push_back({.op = op, .name = "no_rows", .rows = 0, .width = 64, .out = 64});
  }
  for (const int64_t t : {1, 7, 128}) {
    const std::string tokens = "tokens" + std::to_string(t);
    cases.push_back({.op = Op::kRmsNorm,
                     .name = "hidden4096_" + tokens,
                     .rows = t,
                     .width = 4096,
                     .weighted = true});
    cases.push_back({.op = Op::kRmsNorm,
                     .name = "q_lora1024_" + tokens,
                     .rows = t,
                     .width = 1024,
                     .weighted = true});
    // The per-head query norm: unweighted, over each of the 64 heads of 512 channels.
    cases.push_back(
        {.op = Op::kRmsNorm, .name = "q_heads512_" + tokens, .rows = 64 * t, .width = 512});
  }
  cases.push_back(
      {.op = Op::kRmsNorm, .name = "tiny64_rows7", .rows = 7, .width = 64, .weighted = true});
  cases.push_back(
      {.op = Op::kRmsNorm, .name = "odd1001_rows3", .rows = 3, .width = 1001, .weighted = true});
  cases.push_back({.op = Op::kRmsNorm, .name = "odd3_rows5", .rows = 5, .width = 3});
  cases.push_back(
      {.op = Op::kRmsNorm, .name = "no_rows", .rows = 0, .width = 64, .weighted = true});
  for (const int64_t t : {1, 7, 128}) {
    const std::string tokens = "tokens" + std::to_string(t);
    // Queries: 64 heads of one token share its angles. Keys: one head per token.
    for (const bool inverse : {false, true}) {
      cases.push_back({.op = Op::kRope,
                       .name = std::string(inverse ? "inverse_" : "") + "q_heads512_" + tokens,
                       .rows = 64 * t,
                       .width = 512,
                       .half = 32,
                       .rows_per_angle = 64,
                       .inverse = inverse});
    }
    cases.push_back(
        {.op = Op::kRope, .name = "kv512_" + tokens, .rows = t, .width = 512, .half = 32});
  }
  for (const bool inverse : {false, true}) {
    cases.push_back({.op = Op::kRope,
                     .name = std::string(inverse ? "inverse_" : "") + "tiny64_rope16_rows7",
                     .rows = 7,
                     .width = 64,
                     .half = 8,
                     .inverse = inverse});
  }
  cases.push_back({.op = Op::kRope,
                   .name = "odd9_half3_rows5",
                   .rows = 5,
                   .width = 9,
                   .half = 3,
                   .rows_per_angle = 2});
  cases.push_back({.op = Op::kRope, .name = "no_rows", .rows = 0, .width = 64, .half = 8});
  for (const int64_t t : {1, 7, 128}) {
    // Attention scores of 64 heads over the 128-token window plus 512 selected entries.
    cases.push_back({.op = Op::kSoftmax,
                     .name = "heads64_" + std::to_string(t) + "x640",
                     .rows = 64 * t,
                     .width = 640});
  }
  cases.push_back({.op = Op::kSoftmax, .name = "tiny64_rows7", .rows = 7, .width = 64});
  cases.push_back({.op = Op::kSoftmax, .name = "odd1000_rows9", .rows = 9, .width = 1000});
  cases.push_back({.op = Op::kSoftmax, .name = "long5000_rows3", .rows = 3, .width = 5000});
  cases.push_back({.op = Op::kSoftmax, .name = "one_rows4", .rows = 4, .width = 1});
  cases.push_back({.op = Op::kSoftmax, .name = "no_rows", .rows = 0, .width = 64});
  cases.push_back({.op = Op::kSoftmax, .name = "no_cols", .rows = 3, .width = 0});
  return cases;
}

// bf16 by round-to-nearest-even on the upper 16 bits of an fp32 (inputs here are finite).
uint16_t bf16_bits(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
float bf16_round(float f) {
  return std::bit_cast<float>(static_cast<uint32_t>(bf16_bits(f)) << 16);
}

// The inputs of one case, identical for every backend. `y` is the initial output of matmul:
// NaN where the product goes (an entry left unwritten fails the comparison), a sentinel in
// the stride padding (which must stay untouched).
struct OpData {
  std::vector<float> x;
  std::vector<float> w;  // matmul: [m, k]; rms_norm: [d] (empty when unweighted)
  std::vector<float> cos, sin;
  std::vector<float> y;
};

// FNV-1a: a seed that depends on the case's name only, the same on every platform.
uint32_t seed_of(const std::string& s) {
  uint32_t h = 2166136261u;
  for (const char ch : s)
    h = (h ^ static_cast<uint8_t>(ch)) * 16777619u;
  return h;
}

size_t sz(int64_t v) {
  return static_cast<size_t>(v);
}

OpData make_data(const OpCase& c) {
  std::mt19937 rng(seed_of(std::string(op_name(c.op)) + "/" + c.name));
  auto uniform = [&rng](std::vector<float>& v, size_t count, float lo, float hi) {
    std::uniform_real_distribution<float> dist(lo, hi);
    v.resize(count);
    for (float& e : v)
      e = dist(rng);
  };
  OpData d;
  switch (c.op) {
    case Op::kMatmul:
    case Op::kMatmulBf16:
      uniform(d.x, sz(c.rows * c.width), -1.0f, 1.0f);
      uniform(d.w, sz(c.out * c.width), -1.0f, 1.0f);
      if (c.op == Op::kMatmulBf16) {
        // The reference multiplies exactly the values the bf16 backend sees.
        for (float& e : d.x)
          e = bf16_round(e);
        for (float& e : d.w)
          e = bf16_round(e);
      }
      d.y.assign(sz(c.rows * c.stride()), -777.0f);
      for (int64_t r = 0; r < c.rows; ++r) {
        std::fill_n(d.y.begin() + r * c.stride(), c.out, std::numeric_limits<float>::quiet_NaN());
      }
      break;
    case Op::kRmsNorm:
      uniform(d.x, sz(c.rows * c.width), -2.0f, 2.0f);
      // Rows of very different scale, so that eps matters in some.
      for (int64_t r = 0; r < c.rows; ++r) {
        const float scale = std::pow(10.0f, static_cast<float>(r % 5) - 3.0f);
        for (int64_t i = 0; i < c.width; ++i)
          d.x[sz(r * c.width + i)] *= scale;
      }
      if (c.weighted) uniform(d.w, sz(c.width), 0.5f, 1.5f);
      break;
    case Op::kRope: {
      uniform(d.x, sz(c.rows * c.width), -1.0f, 1.0f);
      const int64_t angle_rows = (c.rows + c.rows_per_angle - 1) / c.rows_per_angle;
      d.cos.resize(sz(angle_rows * c.half));
      d.sin.resize(sz(angle_rows * c.half));
      if (c.half > 0) {
        const RopeTable table(2 * c.half, 10000.0, std::nullopt);
        std::uniform_int_distribution<int64_t> position(0, 1 << 20);
        for (int64_t r = 0; r < angle_rows; ++r) {
          table.angles(position(rng), d.cos.data() + r * c.half, d.sin.data() + r * c.half);
        }
      }
      break;
    }
    case Op::kSoftmax: {
      uniform(d.x, sz(c.rows * c.width), -8.0f, 8.0f);
      // Masked entries as attention produces them: some rows partly, some wholly.
      std::bernoulli_distribution masked(0.3);
      for (int64_t r = 0; r < c.rows; ++r) {
        for (int64_t i = 0; i < c.width; ++i) {
          if (r % 7 == 5 || (r % 3 == 1 && masked(rng))) d.x[sz(r * c.width + i)] = -kInf;
        }
      }
      break;
    }
  }
  return d;
}

std::vector<float> run_reference(const OpCase& c, const OpData& d) {
  std::vector<float> out;
  switch (c.op) {
    case Op::kMatmul:
    case Op::kMatmulBf16:
      out = d.y;
      cpu::matmul_rows(d.x.data(), c.rows, c.width, d.w.data(), c.out, out.data(), c.stride());
      break;
    case Op::kRmsNorm:
      out = d.x;
      cpu::rms_norm(out.data(), c.rows, c.width, d.w, kEps);
      break;
    case Op::kRope:
      out = d.x;
      for (int64_t r = 0; r < c.rows; ++r) {
        const size_t angle = sz(r / c.rows_per_angle * c.half);
        cpu::rope_interleaved(out.data() + r * c.width, c.width,
                              std::span<const float>(d.cos).subspan(angle, sz(c.half)),
                              std::span<const float>(d.sin).subspan(angle, sz(c.half)), c.inverse);
      }
      break;
    case Op::kSoftmax:
      out = d.x;
      for (int64_t r = 0; r < c.rows; ++r)
        cpu::softmax(out.data() + r * c.width, c.width);
      break;
  }
  return out;
}

// The CUDA backend on one case: inputs up, one launch on the default stream, output down.
Result<std::vector<float>> run_cuda(const OpCase& c, const OpData& d) {
  using cuda::DeviceBuffer;
  const cuda::CudaStream stream{};
  std::vector<float> out;
  switch (c.op) {
    case Op::kMatmul:
    case Op::kMatmulBf16: {
      DSERVE_ASSIGN_OR_RETURN(cuda::BlasHandle blas, cuda::BlasHandle::create());
      DSERVE_ASSIGN_OR_RETURN(DeviceBuffer y, DeviceBuffer::from_host<float>(d.y));
      if (c.op == Op::kMatmul) {
        DSERVE_ASSIGN_OR_RETURN(DeviceBuffer x, DeviceBuffer::from_host<float>(d.x));
        DSERVE_ASSIGN_OR_RETURN(DeviceBuffer w, DeviceBuffer::from_host<float>(d.w));
        DSERVE_RETURN_IF_ERROR(cuda::matmul(blas, x.as<float>(), c.rows, c.width, w.as<float>(),
                                            c.out, y.as<float>(), c.stride(), stream));
        DSERVE_RETURN_IF_ERROR(cuda::synchronize(stream));
      } else {
        std::vector<uint16_t> xb(d.x.size()), wb(d.w.size());
        std::transform(d.x.begin(), d.x.end(), xb.begin(), bf16_bits);
        std::transform(d.w.begin(), d.w.end(), wb.begin(), bf16_bits);
        DSERVE_ASSIGN_OR_RETURN(DeviceBuffer x, DeviceBuffer::from_host<uint16_t>(xb));
        DSERVE_ASSIGN_OR_RETURN(DeviceBuffer w, DeviceBuffer::from_host<uint16_t>(wb));
        DSERVE_RETURN_IF_ERROR(cuda::matmul_bf16(blas, x.as<uint16_t>(), c.rows, c.width,
                                                 w.as<uint16_t>(), c.out, y.as<float>(), c.stride(),
                                                 stream));
        DSERVE_RETURN_IF_ERROR(cuda::synchronize(stream));
      }
      out.resize(d.y.size());
      DSERVE_RETURN_IF_ERROR(y.copy_to_host(std::span<float>(out)));
      return out;
    }
    case Op::kRmsNorm: {
      DSERVE_ASSIGN_OR_RETURN(DeviceBuffer x, DeviceBuffer::from_host<float>(d.x));
      DSERVE_ASSIGN_OR_RETURN(DeviceBuffer w, DeviceBuffer::from_host<float>(d.w));
      DSERVE_RETURN_IF_ERROR(cuda::rms_norm(x.as<float>(), c.rows, c.width,
                                            c.weighted ? w.as<float>() : nullptr, kEps, stream));
      DSERVE_RETURN_IF_ERROR(cuda::synchronize(stream));
      out.resize(d.x.size());
      DSERVE_RETURN_IF_ERROR(x.copy_to_host(std::span<float>(out)));
      return out;
    }
    case Op::kRope: {
      DSERVE_ASSIGN_OR_RETURN(DeviceBuffer x, DeviceBuffer::from_host<float>(d.x));
      DSERVE_ASSIGN_OR_RETURN(DeviceBuffer cos, DeviceBuffer::from_host<float>(d.cos));
      DSERVE_ASSIGN_OR_RETURN(DeviceBuffer sin, DeviceBuffer::from_host<float>(d.sin));
      DSERVE_RETURN_IF_ERROR(cuda::rope_interleaved(x.as<float>(), c.rows, c.width, c.half,
                                                    cos.as<float>(), sin.as<float>(),
                                                    c.rows_per_angle, c.inverse, stream));
      DSERVE_RETURN_IF_ERROR(cuda::synchronize(stream));
      out.resize(d.x.size());
      DSERVE_RETURN_IF_ERROR(x.copy_to_host(std::span<float>(out)));
      return out;
    }
    case Op::kSoftmax: {
      DSERVE_ASSIGN_OR_RETURN(DeviceBuffer x, DeviceBuffer::from_host<float>(d.x));
      DSERVE_RETURN_IF_ERROR(cuda::softmax(x.as<float>(), c.rows, c.width, stream));
      DSERVE_RETURN_IF_ERROR(cuda::synchronize(stream));
      out.resize(d.x.size());
      DSERVE_RETURN_IF_ERROR(x.copy_to_host(std::span<float>(out)));
      return out;
    }
  }
  return internal_error("unknown op");
}

// Why the CUDA backend cannot run here; empty when it can. Asked once per process.
std::string cuda_unavailable_reason() {
  static const std::string reason = [] {
    const DeviceInfo info = probe_cuda_device();
    return info.available ? std::string() : info.why_unavailable;
  }();
  return reason;
}

// A backend under test: its name, why it cannot run here (empty: it can), and its runner.
struct Backend {
  std::string name;
  std::function<std::string()> why_unavailable;
  std::function<Result<std::vector<float>>(const OpCase&, const OpData&)> run;
};

const std::vector<Backend>& backends() {
  static const std::vector<Backend> all = {
      {"cuda", cuda_unavailable_reason, run_cuda},
  };
  return all;
}

const Backend& backend_named(const std::string& name) {
  for (const Backend& b : backends()) {
    if (b.name == name) return b;
  }
  DSERVE_CHECK_MSG(false, "no backend named " + name);
  return backends().front();
}

std::vector<std::string> backend_names() {
  std::vector<std::string> names;
  for (const Backend& b : backends())
    names.push_back(b.name);
  return names;
}

// Per-op tolerance |got - expected| <= abs + rel * |expected|. The backends differ from the
// reference by summation order and by the last bits of exp/sqrt, not by algorithm; a GEMM's
// rounding grows with sqrt(k). TF32 (10-bit mantissa) products would miss these by far.
struct Tolerance {
  double abs;
  double rel;
};

Tolerance tolerance_for(const OpCase& c) {
  switch (c.op) {
    case Op::kMatmul:
    case Op::kMatmulBf16:
      return {4e-5 * std::sqrt(static_cast<double>(c.width)), 1e-5};
    case Op::kRmsNorm:
      return {1e-6, 1e-5};
    case Op::kRope:
      return {1e-6, 1e-5};
    case Op::kSoftmax:
      return {1e-7, 1e-5};
  }
  return {0.0, 0.0};
}

testing::AssertionResult all_close(const std::vector<float>& got,
                                   const std::vector<float>& expected, Tolerance tol) {
  if (got.size() != expected.size()) {
    return testing::AssertionFailure() << "size " << got.size() << ", expected " << expected.size();
  }
  size_t bad = 0;
  double worst = 0.0;
  std::ostringstream first;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i];
    const double e = expected[i];
    const bool same_inf = std::isinf(e) && g == e;
    const double err = std::abs(g - e);
    if (same_inf || err <= tol.abs + tol.rel * std::abs(e)) continue;
    if (!std::isnan(err)) worst = std::max(worst, err);
    if (bad++ < 5) first << "\n  [" << i << "] got " << g << ", expected " << e;
  }
  if (bad == 0) return testing::AssertionSuccess();
  return testing::AssertionFailure()
         << bad << " of " << got.size() << " entries differ (largest error " << worst
         << ", tolerance " << tol.abs << " + " << tol.rel << " * |expected|)" << first.str();
}

class BackendParityTest : public testing::TestWithParam<std::tuple<std::string, OpCase>> {};

TEST_P(BackendParityTest, MatchesCpuReference) {
  const auto& [backend_name, c] = GetParam();
  const Backend& backend = backend_named(backend_name);
  const std::string why = backend.why_unavailable();
  if (!why.empty()) GTEST_SKIP() << "skipped: no GPU (" << why << ")";

  const OpData data = make_data(c);
  const std::vector<float> expected = run_reference(c, data);
  Result<std::vector<float>> got = backend.run(c, data);
  ASSERT_TRUE(got.is_ok()) << backend.name << ": " << got.status().to_string();
  EXPECT_TRUE(all_close(*got, expected, tolerance_for(c)));
}

std::string case_test_name(const testing::TestParamInfo<BackendParityTest::ParamType>& info) {
  const std::string& backend = std::get<0>(info.param);
  const OpCase& c = std::get<1>(info.param);
  return backend + "_" + op_name(c.op) + "_" + c.name;
}

INSTANTIATE_TEST_SUITE_P(AllOps, BackendParityTest,
                         testing::Combine(testing::ValuesIn(backend_names()),
                                          testing::ValuesIn(all_cases())),
                         case_test_name);

}  // namespace
}  // namespace dserve::kernels
