#pragma once
// Deterministic pseudo-random numbers that give the same sequence on every machine and
// standard library (std::*_distribution do not). Used for seeded sampling and for generated
// checkpoints. Not thread-safe: one generator per stream.

#include <cmath>
#include <cstdint>
#include <numbers>
#include <string_view>

namespace dserve {

// SplitMix64's increment and output function. mix(key + i * kSplitMix64Gamma) is the i-th
// value of the stream seeded with `key`, which also makes a counter-based generator (any
// element computed directly, as the checkpoint generator does).
inline constexpr uint64_t kSplitMix64Gamma = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t splitmix64_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// SplitMix64 (Steele, Lea, Flood 2014): a 64-bit state, full period, passes BigCrush.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}

  uint64_t next() { return splitmix64_mix(state_ += kSplitMix64Gamma); }
  // Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  // Uniform integer in [0, n); n > 0. Rejection sampling, so exactly uniform.
  uint64_t below(uint64_t n) {
    const uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    uint64_t v = next();
    while (v >= limit)
      v = next();
    return v % n;
  }
  // Standard normal by Box-Muller (both values used in turn).
  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u1 = uniform();
    while (u1 <= 0.0)
      u1 = uniform();
    const double u2 = uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = r * std::sin(2.0 * std::numbers::pi * u2);
    has_spare_ = true;
    return r * std::cos(2.0 * std::numbers::pi * u2);
  }

 private:
  uint64_t state_;
  double spare_ = 0.0;
  bool has_spare_ = false;
};

// FNV-1a of a string, mixed with a seed: derives independent streams per named object
// (e.g. one per tensor name) so results do not depend on the order of generation.
inline uint64_t stream_seed(uint64_t seed, std::string_view name) {
  uint64_t h = 0xCBF29CE484222325ULL ^ seed;
  for (char c : name) {
    h ^= static_cast<uint8_t>(c);
    h *= 0x100000001B3ULL;
  }
  return SplitMix64(h).next();
}

}  // namespace dserve
