#include "dserve/kernels/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <vector>

#include "dserve/core/check.h"

namespace dserve::kernels {
namespace {

// YaRN: the dimension at which a frequency completes `rotations` turns over the original
// context (arXiv 2309.00071, eq. 17).
double correction_dim(double rotations, double dim, double base, double max_pos) {
  return dim * std::log(max_pos / (rotations * 2.0 * std::numbers::pi)) / (2.0 * std::log(base));
}

}  // namespace

RopeTable::RopeTable(int64_t rope_dim, double theta, std::optional<YarnParams> yarn)
    : rope_dim_(rope_dim) {
  DSERVE_CHECK_MSG(rope_dim > 0 && rope_dim % 2 == 0, "rope_dim must be positive and even");
  const int64_t half = rope_dim / 2;
  inv_freq_.resize(static_cast<size_t>(half));
  std::vector<float> pos_freq(static_cast<size_t>(half));
  // The frequencies are computed in fp32 exactly as the reference computes them, so that
  // positions far from zero keep the same angles.
  const float base = static_cast<float>(theta);
  for (int64_t i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(rope_dim);
    pos_freq[static_cast<size_t>(i)] = std::pow(base, exponent);
    inv_freq_[static_cast<size_t>(i)] = 1.0f / pos_freq[static_cast<size_t>(i)];
  }
  if (!yarn) return;

  double low = std::floor(correction_dim(yarn->beta_fast, static_cast<double>(rope_dim), theta,
                                         yarn->original_max_position_embeddings));
  double high = std::ceil(correction_dim(yarn->beta_slow, static_cast<double>(rope_dim), theta,
                                         yarn->original_max_position_embeddings));
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(rope_dim - 1));
  if (low == high) high += 0.001;  // the ramp would divide by zero
  const float factor = static_cast<float>(yarn->factor);
  for (int64_t i = 0; i < half; ++i) {
    const float extrapolation = inv_freq_[static_cast<size_t>(i)];
    const float interpolation = 1.0f / (factor * pos_freq[static_cast<size_t>(i)]);
    float ramp = static_cast<float>((static_cast<double>(i) - low) / (high - low));
    ramp = std::clamp(ramp, 0.0f, 1.0f);
    const float extrapolation_weight = 1.0f - ramp;
    inv_freq_[static_cast<size_t>(i)] =
        interpolation * (1.0f - extrapolation_weight) + extrapolation * extrapolation_weight;
  }
}

void RopeTable::angles(int64_t pos, float* cos_out, float* sin_out) const {
  const auto half = static_cast<int64_t>(inv_freq_.size());
  if (pos >= 0 && pos < cached_positions_) {
    std::copy_n(cached_cos_.data() + pos * half, half, cos_out);
    std::copy_n(cached_sin_.data() + pos * half, half, sin_out);
    return;
  }
  const float p = static_cast<float>(pos);
  for (size_t i = 0; i < inv_freq_.size(); ++i) {
    const float angle = inv_freq_[i] * p;
    cos_out[i] = std::cos(angle);
    sin_out[i] = std::sin(angle);
  }
}

void RopeTable::precompute(int64_t positions) {
  const auto half = static_cast<int64_t>(inv_freq_.size());
  std::vector<float> c(static_cast<size_t>(positions * half)), s(c.size());
  cached_positions_ = 0;  // angles() below computes
  for (int64_t p = 0; p < positions; ++p)
    angles(p, c.data() + p * half, s.data() + p * half);
  cached_cos_ = std::move(c);
  cached_sin_ = std::move(s);
  cached_positions_ = positions;
}

}  // namespace dserve::kernels
