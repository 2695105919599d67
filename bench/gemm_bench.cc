// The batch-invariant product (kernels/invariant_gemm.h) against OpenBLAS sgemm at the
// model's Linear shapes, M = 1..512 rows, both on every core, in one run: GFLOP/s of each and
// the ratio. Also the CPU backend's previous way to batch invariance: one single-threaded
// OpenBLAS sgemv per row, rows split over the cores (it reads the weight once per row). Also the
// memory bandwidth of a plain streaming read (for the small-M points, which read the whole weight
// once). See bench/gemm_bench.sh (it sets OPENBLAS_CORETYPE).
//
//   gemm_bench [--benchmark_filter=...]

#include <benchmark/benchmark.h>
#include <cblas.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "dserve/kernels/invariant_gemm.h"

namespace {

struct Shape {
  const char* name;
  int64_t m;  // outputs (weight rows)
  int64_t k;  // inputs
};

// small: lm_head; v4-width: wq_a, an expert's down projection, wq_b.
constexpr Shape kShapes[] = {{"small.lm_head", 129280, 256},
                             {"v4.wq_a", 1024, 4096},
                             {"v4.expert_down", 4096, 2048},
                             {"v4.wq_b", 32768, 1024}};

std::vector<float> random_floats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& f : v)
    f = dist(rng);
  return v;
}

const std::vector<float>& weight(int shape) {
  static std::map<int, std::vector<float>> cache;
  auto it = cache.find(shape);
  if (it == cache.end()) {
    const Shape& s = kShapes[shape];
    it = cache.emplace(shape, random_floats(static_cast<size_t>(s.m * s.k), 1)).first;
  }
  return it->second;
}

enum class Impl { kInvariant, kInvariantAvx2, kSgemm, kSgemvPerRow };

// y[i] = W x[i] for rows [begin, end), one sgemv each.
void sgemv_rows(const Shape& s, const float* w, const float* x, float* y, int64_t begin,
                int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(s.m), static_cast<int>(s.k), 1.0f, w,
                static_cast<int>(s.k), x + i * s.k, 1, 0.0f, y + i * s.m, 1);
  }
}

void run(benchmark::State& state, Impl impl) {
  const Shape& s = kShapes[state.range(0)];
  const int64_t n = state.range(1);
  const auto& w = weight(static_cast<int>(state.range(0)));
  const auto x = random_floats(static_cast<size_t>(n * s.k), 2);
  std::vector<float> y(static_cast<size_t>(n * s.m));
  const long cores = sysconf(_SC_NPROCESSORS_ONLN);
  openblas_set_num_threads(impl == Impl::kSgemvPerRow ? 1 : static_cast<int>(cores));
  for (auto _ : state) {
    if (impl == Impl::kInvariant) {
      dserve::kernels::cpu::invariant_matmul(x.data(), n, s.k, w.data(), s.m, y.data(), s.m);
    } else if (impl == Impl::kInvariantAvx2) {
      dserve::kernels::cpu::invariant_matmul_with(dserve::kernels::cpu::CpuIsa::kAvx2, x.data(), n,
                                                  s.k, w.data(), s.m, y.data(), s.m);
    } else if (impl == Impl::kSgemvPerRow) {
      const int64_t parts = std::min<int64_t>(cores, n);
      std::vector<std::thread> threads;
      for (int64_t p = 1; p < parts; ++p) {
        threads.emplace_back(sgemv_rows, s, w.data(), x.data(), y.data(), n * p / parts,
                             n * (p + 1) / parts);
      }
      sgemv_rows(s, w.data(), x.data(), y.data(), 0, n / parts);
      for (auto& t : threads)
        t.join();
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(n),
                  static_cast<int>(s.m), static_cast<int>(s.k), 1.0f, x.data(),
                  static_cast<int>(s.k), w.data(), static_cast<int>(s.k), 0.0f, y.data(),
                  static_cast<int>(s.m));
    }
    benchmark::DoNotOptimize(y.data());
  }
  const double flops = 2.0 * static_cast<double>(n) * s.m * s.k;
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * state.iterations() / 1e9, benchmark::Counter::kIsRate);
  // Bytes the product must read at least (the weight; x and y are small beside it at low M).
  state.counters["weight_GB/s"] =
      benchmark::Counter(4.0 * s.m * s.k * state.iterations() / 1e9, benchmark::Counter::kIsRate);
  state.SetLabel(s.name);
}

void BM_Invariant(benchmark::State& state) {
  run(state, Impl::kInvariant);
}
// The AVX2 + FMA kernels on an AVX-512 machine (what a machine without AVX-512 runs).
void BM_InvariantAvx2(benchmark::State& state) {
  if (dserve::kernels::cpu::cpu_isa() == dserve::kernels::cpu::CpuIsa::kPortable) {
    state.SkipWithError("no AVX2 + FMA here");
    return;
  }
  run(state, Impl::kInvariantAvx2);
}
void BM_OpenBlasSgemm(benchmark::State& state) {
  run(state, Impl::kSgemm);
}
void BM_SgemvPerRow(benchmark::State& state) {
  run(state, Impl::kSgemvPerRow);
}

void shapes(benchmark::internal::Benchmark* b) {
  for (int shape = 0; shape < static_cast<int>(std::size(kShapes)); ++shape) {
    for (int64_t n : {1, 4, 16, 64, 512})
      b->Args({shape, n});
  }
  b->Unit(benchmark::kMillisecond)->MinTime(0.3)->UseRealTime();
}
BENCHMARK(BM_Invariant)->Apply(shapes);
BENCHMARK(BM_InvariantAvx2)->Apply(shapes);
BENCHMARK(BM_OpenBlasSgemm)->Apply(shapes);
BENCHMARK(BM_SgemvPerRow)->Apply(shapes);

// A streaming read of 512 MiB (sum of floats, on every core through OpenBLAS's sasum): the
// machine's memory bandwidth as the products see it.
void BM_StreamRead(benchmark::State& state) {
  static const std::vector<float> big = random_floats(size_t{128} << 20, 3);
  openblas_set_num_threads(static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN)));
  for (auto _ : state) {
    float s = cblas_sasum(static_cast<int>(big.size()), big.data(), 1);
    benchmark::DoNotOptimize(s);
  }
  state.counters["GB/s"] = benchmark::Counter(
      static_cast<double>(big.size()) * 4 * state.iterations() / 1e9, benchmark::Counter::kIsRate);
}
BENCHMARK(BM_StreamRead)->Unit(benchmark::kMillisecond)->MinTime(1.0)->UseRealTime();

}  // namespace

int main(int argc, char** argv) {
  const long cores = sysconf(_SC_NPROCESSORS_ONLN);
  openblas_set_num_threads(static_cast<int>(cores));
  std::printf(
      "cpu isa: %s; OpenBLAS core: %s, %d threads; %ld cores\n",
      std::string(dserve::kernels::cpu::cpu_isa_name(dserve::kernels::cpu::cpu_isa())).c_str(),
      openblas_get_corename(), openblas_get_num_threads(), cores);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  return 0;
}
