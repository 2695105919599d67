#pragma once
// RoPE frequency tables of DeepSeek-V4: the "main" rope (sliding-only layers) and the
// "compress" rope (CSA/HCA layers and their compressors), optionally YaRN-scaled. The YaRN
// ramp follows the YaRN paper (arXiv 2309.00071, eq. 18-19) with `truncate` on and an
// attention factor of 1, as the V4 reference applies it.

#include <cstdint>
#include <optional>
#include <vector>

namespace dserve::kernels {

struct YarnParams {
  double factor;
  double original_max_position_embeddings;
  double beta_fast;
  double beta_slow;
};

// Immutable after construction; safe to share between threads.
class RopeTable {
 public:
  // rope_dim: channels that rotate (even); theta: the base.
  RopeTable(int64_t rope_dim, double theta, std::optional<YarnParams> yarn);

  int64_t rope_dim() const { return rope_dim_; }
  const std::vector<float>& inv_freq() const { return inv_freq_; }
  // cos/sin of position `pos` for each of the rope_dim/2 pairs, written into out (size rope_dim/2).
  void angles(int64_t pos, float* cos_out, float* sin_out) const;
  // Keeps the angles of positions [0, positions) computed once (the same values angles() would
  // compute): a forward step then copies them instead of calling cos and sin per pair, row and
  // layer. Positions past them are computed as before. Not thread-safe against angles(); call
  // before the table is shared.
  void precompute(int64_t positions);

 private:
  int64_t rope_dim_;
  std::vector<float> inv_freq_;  // rope_dim / 2
  int64_t cached_positions_ = 0;
  std::vector<float> cached_cos_, cached_sin_;  // [cached_positions_, rope_dim / 2]
};

}  // namespace dserve::kernels
