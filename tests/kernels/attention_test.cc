// cuda::sparse_attention, both kinds of math, against a host reference (double sums) on the
// same random inputs: a batch of three requests whose rows read the ring, the batch's own keys
// and compressed entries through shuffled block tables; sliding-only, every-visible-entry (HCA)
// and picked-entry (CSA) layers; 4, 20 and 64 heads (padded, mixed and full 16-head blocks) of
// 64, 128 and 512 channels. Runs where a GPU is usable; elsewhere every case reports SKIPPED
// with the reason.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <ostream>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "dserve/core/random.h"
#include "dserve/kernels/cuda_model_ops.h"
#include "dserve/kernels/cuda_ops.h"
#include "dserve/kernels/device.h"

namespace dserve::kernels {
namespace {

using cuda::AttentionMath;
using cuda::CudaStream;
using cuda::DeviceBuffer;

enum class Compressed { kNone, kAllVisible, kPicked };

struct Case {
  int64_t heads;
  int64_t head_dim;
  Compressed compressed;
};

std::ostream& operator<<(std::ostream& os, const Case& c) {
  const char* kind = c.compressed == Compressed::kNone         ? "sliding"
                     : c.compressed == Compressed::kAllVisible ? "all_visible"
                                                               : "picked";
  return os << c.heads << "_heads_of_" << c.head_dim << "_" << kind;
}

constexpr int64_t kWindow = 16;
constexpr int64_t kRate = 4;
constexpr int64_t kRowsPerPage = 4;
constexpr int64_t kPicks = 8;

// A request in the batch: its rows are positions first_pos .. first_pos + rows - 1.
struct Request {
  int64_t slot, first_pos, rows;
};
// Prefill rows that reach back into the ring, a row whose window is shorter than one key tile,
// and a decode row deep in its context.
const std::vector<Request> kRequests = {{0, 30, 17}, {1, 5, 1}, {2, 100, 1}};

std::vector<float> random_values(size_t n, SplitMix64& rng) {
  std::vector<float> v(n);
  for (float& x : v)
    x = static_cast<float>(rng.uniform() * 2.0 - 1.0);
  return v;
}

template <typename T>
DeviceBuffer upload(const std::vector<T>& v) {
  auto b = DeviceBuffer::from_host<T>(std::span<const T>(v));
  EXPECT_TRUE(b.is_ok()) << b.status().to_string();
  return b.is_ok() ? std::move(b).value() : DeviceBuffer();
}

class SparseAttentionTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    const DeviceInfo device = probe_cuda_device();
    if (!device.available) GTEST_SKIP() << "no usable GPU: " << device.why_unavailable;
  }
};

TEST_P(SparseAttentionTest, BothMathsMatchTheHostReference) {
  const Case c = GetParam();
  const int64_t hd = c.head_dim;
  const int64_t heads = c.heads;
  SplitMix64 rng(static_cast<uint64_t>(heads * 1000 + hd));

  // Rows of the batch.
  std::vector<int32_t> position, slot, first_pos, first_row, end_pos;
  for (const Request& r : kRequests) {
    const auto row0 = static_cast<int32_t>(position.size());
    for (int64_t i = 0; i < r.rows; ++i) {
      position.push_back(static_cast<int32_t>(r.first_pos + i));
      slot.push_back(static_cast<int32_t>(r.slot));
      first_pos.push_back(static_cast<int32_t>(r.first_pos));
      first_row.push_back(row0);
      end_pos.push_back(static_cast<int32_t>(r.first_pos + r.rows));
    }
  }
  const auto n = static_cast<int64_t>(position.size());
  const auto slots = static_cast<int64_t>(kRequests.size());

  const std::vector<float> q = random_values(static_cast<size_t>(n * heads * hd), rng);
  const std::vector<float> batch_kv = random_values(static_cast<size_t>(n * hd), rng);
  const std::vector<float> windows = random_values(static_cast<size_t>(slots * kWindow * hd), rng);
  const std::vector<float> sinks = random_values(static_cast<size_t>(heads), rng);

  // Compressed entries: every slot's pages, in a shuffled order of the pool.
  int64_t most_entries = 0;
  for (const Request& r : kRequests)
    most_entries = std::max(most_entries, (r.first_pos + r.rows) / kRate);
  const int64_t pages_per_slot = (most_entries + kRowsPerPage - 1) / kRowsPerPage;
  const int64_t pages = slots * pages_per_slot;
  const std::vector<float> pool =
      random_values(static_cast<size_t>(pages * kRowsPerPage * hd), rng);
  std::vector<int32_t> tables(static_cast<size_t>(pages));
  std::iota(tables.begin(), tables.end(), 0);
  for (size_t i = tables.size(); i > 1; --i)
    std::swap(tables[i - 1], tables[rng.below(i)]);

  // Picks: up to kPicks distinct visible entries per row, ascending.
  std::vector<int32_t> picks(static_cast<size_t>(n * kPicks), 0);
  std::vector<int32_t> pick_counts(static_cast<size_t>(n), 0);
  for (int64_t t = 0; t < n; ++t) {
    std::vector<int32_t> visible(
        static_cast<size_t>((position[static_cast<size_t>(t)] + 1) / kRate));
    std::iota(visible.begin(), visible.end(), 0);
    for (size_t i = visible.size(); i > 1; --i)
      std::swap(visible[i - 1], visible[rng.below(i)]);
    visible.resize(std::min<size_t>(visible.size(), kPicks));
    std::sort(visible.begin(), visible.end());
    std::copy(visible.begin(), visible.end(), picks.begin() + t * kPicks);
    pick_counts[static_cast<size_t>(t)] = static_cast<int32_t>(visible.size());
  }

  // The host reference: softmax over the window keys then the compressed entries, with the
  // head's sink in the denominator; the keys are the values.
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  std::vector<double> want(static_cast<size_t>(n * heads * hd));
  for (int64_t t = 0; t < n; ++t) {
    const size_t ts = static_cast<size_t>(t);
    const int64_t pos = position[ts];
    std::vector<const float*> keys;
    for (int64_t p = std::max<int64_t>(0, pos - kWindow + 1); p <= pos; ++p) {
      keys.push_back(p >= first_pos[ts]
                         ? &batch_kv[static_cast<size_t>((first_row[ts] + p - first_pos[ts]) * hd)]
                         : &windows[static_cast<size_t>((slot[ts] * kWindow + p % kWindow) * hd)]);
    }
    if (c.compressed != Compressed::kNone) {
      const bool picked = c.compressed == Compressed::kPicked;
      const int64_t count = picked ? pick_counts[ts] : (pos + 1) / kRate;
      for (int64_t j = 0; j < count; ++j) {
        const int64_t e = picked ? picks[static_cast<size_t>(t * kPicks + j)] : j;
        const int64_t page =
            tables[static_cast<size_t>(slot[ts] * pages_per_slot + e / kRowsPerPage)];
        keys.push_back(&pool[static_cast<size_t>((page * kRowsPerPage + e % kRowsPerPage) * hd)]);
      }
    }
    for (int64_t h = 0; h < heads; ++h) {
      const float* qh = &q[static_cast<size_t>((t * heads + h) * hd)];
      std::vector<double> logits;
      double most = sinks[static_cast<size_t>(h)];
      for (const float* k : keys) {
        double dot = 0.0;
        for (int64_t i = 0; i < hd; ++i)
          dot += static_cast<double>(qh[i]) * k[i];
        logits.push_back(dot * scale);
        most = std::max(most, logits.back());
      }
      double denominator = std::exp(sinks[static_cast<size_t>(h)] - most);
      for (double& l : logits) {
        l = std::exp(l - most);
        denominator += l;
      }
      double* o = &want[static_cast<size_t>((t * heads + h) * hd)];
      for (size_t j = 0; j < keys.size(); ++j) {
        for (int64_t i = 0; i < hd; ++i)
          o[i] += logits[j] / denominator * keys[j][i];
      }
    }
  }

  DeviceBuffer d_q = upload(q), d_kv = upload(batch_kv), d_windows = upload(windows);
  DeviceBuffer d_pool = upload(pool), d_tables = upload(tables), d_sinks = upload(sinks);
  DeviceBuffer d_picks = upload(picks), d_counts = upload(pick_counts);
  DeviceBuffer d_position = upload(position), d_slot = upload(slot);
  DeviceBuffer d_first_pos = upload(first_pos), d_first_row = upload(first_row);
  DeviceBuffer d_end_pos = upload(end_pos);
  auto out = DeviceBuffer::allocate(want.size() * sizeof(float));
  ASSERT_TRUE(out.is_ok()) << out.status().to_string();

  cuda::AttentionInputs in;
  in.q = d_q.as<float>();
  in.batch_kv = d_kv.as<float>();
  in.windows = d_windows.as<float>();
  in.sinks = d_sinks.as<float>();
  if (c.compressed != Compressed::kNone) {
    in.rate = kRate;
    in.compressed = cuda::PagedRowsView{d_pool.as<float>(), d_tables.as<int32_t>(), pages_per_slot,
                                        kRowsPerPage, hd};
  }
  if (c.compressed == Compressed::kPicked) {
    in.selected = d_picks.as<int32_t>();
    in.selected_counts = d_counts.as<int32_t>();
    in.selected_stride = kPicks;
  }
  const cuda::BatchRows rows{d_position.as<int32_t>(), d_slot.as<int32_t>(),
                             d_first_pos.as<int32_t>(), d_first_row.as<int32_t>(),
                             d_end_pos.as<int32_t>()};

  // fp32 sums in another order: 1e-5 of the largest output; bf16 queries, keys and
  // probabilities: 2e-2.
  for (const auto& [math, tolerance] :
       {std::pair{AttentionMath::kFp32, 1e-5}, std::pair{AttentionMath::kBf16TensorCores, 2e-2}}) {
    const Status run = cuda::sparse_attention(in, rows, n, heads, hd, kWindow, scale, math,
                                              out->as<float>(), CudaStream{});
    ASSERT_TRUE(run.is_ok()) << run.to_string();
    std::vector<float> got(want.size());
    ASSERT_TRUE(out->copy_to_host(std::span(got)).is_ok());
    double largest = 0.0;
    double worst = 0.0;
    size_t worst_at = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      largest = std::max(largest, std::abs(want[i]));
      const double diff = std::abs(static_cast<double>(got[i]) - want[i]);
      if (diff > worst) {
        worst = diff;
        worst_at = i;
      }
    }
    const auto row = static_cast<int64_t>(worst_at) / (heads * hd);
    EXPECT_LT(worst / largest, tolerance)
        << (math == AttentionMath::kFp32 ? "fp32" : "bf16 tensor cores") << ": row " << row
        << " head " << (static_cast<int64_t>(worst_at) / hd) % heads << " channel "
        << static_cast<int64_t>(worst_at) % hd << " got " << got[worst_at] << " want "
        << want[worst_at];
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, SparseAttentionTest,
    ::testing::Values(Case{4, 64, Compressed::kNone}, Case{4, 64, Compressed::kAllVisible},
                      Case{4, 64, Compressed::kPicked}, Case{20, 128, Compressed::kAllVisible},
                      Case{20, 128, Compressed::kPicked}, Case{64, 512, Compressed::kNone},
                      Case{64, 512, Compressed::kAllVisible}, Case{64, 512, Compressed::kPicked}),
    [](const ::testing::TestParamInfo<Case>& param) {
      std::ostringstream name;
      name << param.param;
      return name.str();
    });

}  // namespace
}  // namespace dserve::kernels
