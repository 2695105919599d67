// KV hand-off throughput between two processes on loopback, against ucx_perftest.
//
// The state: a 32k-token DeepSeek-V4-Flash request in the served FP8 format (MODEL-V4.md):
// 584-byte entries (448 e4m3 + 64 bf16 rope + scales), 132-byte indexer keys (128 e4m3 +
// scale), 43 layers = 2 sliding-only + 21 CSA (rate 4) + 20 HCA (rate 128):
//   CSA entries   21 x 8192 x 584 = 100,466,688
//   indexer keys  21 x 8192 x 132 =  22,708,224
//   HCA entries   20 x  256 x 584 =   2,990,080
//   windows       43 x  128 x 584 =   3,214,336
//   total                          = 129,379,328 bytes (123.4 MiB)
// Compressor buffers are empty at a 128-aligned length; the CSA overlap state (< 1 MB) is left
// out.
//
// The process that receives (decode side) is this binary re-run with --serve; it registers the
// region, sends its address and rkey through a pipe, and verifies every hand-off's digests.
// Layouts: "uniform" cuts the state into --span-byte puts (the one ucx_perftest is compared
// with, at the same message size); "per-layer" is one put per (pool, layer); "per-page" one put
// per (pool, layer, 128-token block), as a decode worker's page table would have it.
//
// A hand-off is put() and then the digests to the receiver, which verifies every span
// (verify_landed) once all have landed; it ends when the receiver answers that it verified
// everything. (A pipelined mode, put_pipelined with verification as pieces land, was measured
// here until the path was removed: the hand-off never used it. bench/RESULTS.md keeps its
// figures.)
//
// Fairness: ucx_perftest runs on the same transports and devices, at the same message size
// (--span for "uniform", the whole state for "whole"). The set-ups are interleaved, because the
// machine is shared: every round runs ucx_perftest once per size and then one hand-off per
// layout, so that a burst of load hits all of them alike.
// Figures are medians of --repeats rounds after a warm-up round, with the slowest and fastest
// beside them. Ratios are ours / perftest: a put includes the sender's checksums, perftest none;
// "pair" is the median over rounds of hand-off / that round's perftest.

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <string>
#include <thread>
#include <vector>

#include "dserve/kvstore/transfer.h"

namespace {

using namespace dserve::kvstore;
using Clock = std::chrono::steady_clock;

constexpr uint64_t kEntry = 584, kIndexKey = 132, kTokens = 32768;
constexpr uint64_t kCsaLayers = 21, kHcaLayers = 20, kLayers = 43, kWindow = 128, kBlock = 128;

struct Span {
  uint64_t offset, bytes;
};

// The state's spans, per (pool, layer) or per (pool, layer, block), back to back.
std::vector<Span> v4_layout(bool per_page) {
  std::vector<Span> spans;
  uint64_t off = 0;
  auto pool = [&](uint64_t layers, uint64_t rows, uint64_t row_bytes, uint64_t rows_per_page) {
    for (uint64_t l = 0; l < layers; ++l) {
      uint64_t step = per_page ? rows_per_page : rows;
      for (uint64_t r = 0; r < rows; r += step) {
        uint64_t n = std::min(step, rows - r) * row_bytes;
        spans.push_back({off, n});
        off += n;
      }
    }
  };
  pool(kCsaLayers, kTokens / 4, kEntry, kBlock / 4);      // CSA compressed entries
  pool(kCsaLayers, kTokens / 4, kIndexKey, kBlock / 4);   // indexer keys
  pool(kHcaLayers, kTokens / 128, kEntry, kBlock / 128);  // HCA compressed entries
  pool(kLayers, kWindow, kEntry, kWindow);                // sliding windows
  return spans;
}

uint64_t state_bytes() {
  uint64_t total = 0;
  for (const Span& s : v4_layout(false))
    total += s.bytes;
  return total;
}

std::vector<Span> uniform_layout(uint64_t total, uint64_t span) {
  std::vector<Span> spans;
  for (uint64_t off = 0; off < total; off += span)
    spans.push_back({off, std::min(span, total - off)});
  return spans;
}

bool io_all(int fd, void* data, size_t n, bool writing) {
  auto* p = static_cast<char*>(data);
  while (n > 0) {
    ssize_t r = writing ? write(fd, p, n) : read(fd, p, n);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}
bool write_frame(int fd, std::vector<uint8_t> bytes) {
  auto n = static_cast<uint32_t>(bytes.size());
  return io_all(fd, &n, sizeof n, true) && io_all(fd, bytes.data(), n, true);
}
bool read_frame(int fd, std::vector<uint8_t>& out) {
  uint32_t n = 0;
  if (!io_all(fd, &n, sizeof n, false)) return false;
  out.resize(n);
  return io_all(fd, out.data(), n, false);
}

// How the hand-off computes and checks digests (TransferOptions, VerifyOptions).
struct ChecksumSettings {
  unsigned checksum_threads = TransferOptions{}.checksum_threads;
  uint64_t digest_bytes = TransferOptions{}.digest_bytes;
  unsigned verify_threads = VerifyOptions{}.threads;
};

TransferOptions options_for(const std::string& transports, const std::string& name,
                            const ChecksumSettings& settings) {
  TransferOptions o;
  o.transports = transports;
  o.name = name;
  o.checksum_threads = settings.checksum_threads;
  o.digest_bytes = settings.digest_bytes;
  o.timeout = std::chrono::seconds(60);
  // UCX 1.13's shared-memory transports have no peer-failure detection (transfer.h).
  o.detect_peer_failure = true;
  for (const char* shm : {"sm", "posix", "sysv", "cma"}) {
    if (transports.find(shm) != std::string::npos) o.detect_peer_failure = false;
  }
  return o;
}

// The receiving side: register, hand over, verify each hand-off, answer "OK" or the error.
int serve(const std::string& transports, uint64_t bytes, bool allocate,
          const ChecksumSettings& settings) {
  auto engine = Transport::create_ucx(options_for(transports, "decode", settings));
  if (!engine.is_ok()) return 1;
  std::vector<std::byte> vector_memory(allocate ? 0 : bytes);
  auto region = allocate ? (*engine)->allocate_memory(bytes)
                         : (*engine)->register_memory(vector_memory.data(), bytes);
  if (!region.is_ok()) return 1;
  std::span<const std::byte> memory(region->data(), bytes);
  if (!write_frame(1, encode_peer_address((*engine)->local_address())) ||
      !write_frame(1, encode_remote_region((*engine)->describe(*region).value()))) {
    return 1;
  }
  std::vector<uint8_t> frame;
  while (read_frame(0, frame)) {
    auto digests = decode_digests(frame);
    VerifyOptions verify;
    verify.threads = settings.verify_threads;
    dserve::Status st =
        digests.is_ok() ? verify_landed(memory, *digests, verify) : digests.status();
    std::string answer = st.is_ok() ? "OK" : st.to_string();
    if (!write_frame(1, std::vector<uint8_t>(answer.begin(), answer.end()))) return 1;
  }
  return 0;
}

// Median, slowest and fastest of a set of measurements.
struct Spread {
  double median = 0, low = 0, high = 0;
};

Spread spread(std::vector<double> v) {
  if (v.empty()) return {};
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  double mid = n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
  return {mid, v.front(), v.back()};
}

struct Seconds {
  double put = 0, handoff = 0;
};

[[noreturn]] void fail(const std::string& why) {
  std::fprintf(stderr, "%s\n", why.c_str());
  std::exit(1);
}

// One hand-off of `ops`; exits on any failure (a benchmark of a broken transfer means nothing).
Seconds handoff(Transport& transport, dserve::kvstore::PeerId peer, const RemoteRegion& region,
                const std::vector<PutOp>& ops, int to_child, int from_child) {
  std::vector<uint8_t> answer;
  auto expect_ok = [&] {
    if (!read_frame(from_child, answer) || std::string(answer.begin(), answer.end()) != "OK") {
      fail("receiver refused the hand-off: " + std::string(answer.begin(), answer.end()));
    }
  };
  auto t0 = Clock::now();
  auto digests = transport.put(peer, region, ops);
  auto t1 = Clock::now();
  if (!digests.is_ok()) fail("put failed: " + digests.status().to_string());
  if (!write_frame(to_child, encode_digests(*digests))) fail("receiver gone");
  expect_ok();
  auto t2 = Clock::now();
  return {std::chrono::duration<double>(t1 - t0).count(),
          std::chrono::duration<double>(t2 - t0).count()};
}

// The 1-, 5- and 15-minute load averages, to be printed with the figures.
std::string load_average() {
  double l[3] = {0, 0, 0};
  if (getloadavg(l, 3) != 3) return "unknown";
  char out[48];
  std::snprintf(out, sizeof out, "%.1f %.1f %.1f", l[0], l[1], l[2]);
  return out;
}

std::string text(const Spread& v) {
  char out[48];
  std::snprintf(out, sizeof out, "%.2f [%.2f %.2f]", v.median, v.low, v.high);
  return out;
}

// A TCP port free on 127.0.0.1 now (bound to port 0 and read back), or -1.
int free_tcp_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in at{};
  at.sin_family = AF_INET;
  at.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(at);
  int port = -1;
  if (::bind(fd, reinterpret_cast<const sockaddr*>(&at), sizeof(at)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&at), &len) == 0) {
    port = ntohs(at.sin_port);
  }
  ::close(fd);
  return port;
}

// ucx_perftest ucp_put_bw, server and client on loopback; returns overall GB/s (1e9), or -1.
double perftest_once(const std::string& binary, const std::string& transports, uint64_t size,
                     uint64_t iters, uint64_t warmup, int port) {
  std::string env = "UCX_TLS=" + transports + " UCX_NET_DEVICES=lo ";
  std::string args = " -t ucp_put_bw -s " + std::to_string(size) + " -n " + std::to_string(iters) +
                     " -w " + std::to_string(warmup) + " -f -p " + std::to_string(port);
  std::string server = env + binary + args + " >/dev/null 2>&1 &";
  if (std::system(server.c_str()) != 0) return -1;
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  std::string client = env + binary + " 127.0.0.1" + args + " 2>&1";
  FILE* p = popen(client.c_str(), "r");
  if (p == nullptr) return -1;
  char line[512];
  std::string last;
  while (std::fgets(line, sizeof line, p) != nullptr) {
    if (std::strlen(line) > 1) last = line;
  }
  pclose(p);
  // "iters p50 avg overall bw_avg bw_overall rate_avg rate_overall"; bandwidths in MiB/s.
  double v[8];
  if (std::sscanf(last.c_str(), "%lf %lf %lf %lf %lf %lf %lf %lf", &v[0], &v[1], &v[2], &v[3],
                  &v[4], &v[5], &v[6], &v[7]) != 8) {
    std::fprintf(stderr, "cannot parse ucx_perftest output: %s\n", last.c_str());
    return -1;
  }
  return v[5] * 1048576.0 / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"KV hand-off throughput (UCX RMA put) between two processes on loopback"};
  std::vector<std::string> transports = {"tcp", "sm,self"};
  uint64_t span = 1u << 20;
  int repeats = 5;
  std::string perftest_binary = "ucx_perftest";
  int port = 0;
  std::string serve_transports;
  uint64_t serve_bytes = 0;
  bool serve_allocate = false;
  ChecksumSettings settings;
  std::vector<std::string> regions = {"registered", "allocated"};
  std::vector<std::string> layout_names = {"uniform", "whole", "per-layer", "per-page"};
  app.add_option("--transports", transports, "UCX transport sets to measure");
  app.add_option("--span", span, "bytes per put in the uniform layout (= ucx_perftest -s)");
  app.add_option("--repeats", repeats,
                 "timed rounds (each: perftest per size, a hand-off per layout)");
  app.add_option("--perftest", perftest_binary, "ucx_perftest binary");
  app.add_option("--port", port,
                 "ucx_perftest's first control port, one more per run (0: a free one each run)");
  app.add_option("--regions", regions, "receiver memory: registered and/or allocated");
  app.add_option("--layouts", layout_names, "uniform, whole, per-layer, per-page");
  app.add_option("--checksum-threads", settings.checksum_threads,
                 "TransferOptions::checksum_threads of the sender (0: hash before the puts)");
  app.add_option("--digest-bytes", settings.digest_bytes,
                 "TransferOptions::digest_bytes of the sender (0: one digest per put)");
  app.add_option("--verify-threads", settings.verify_threads,
                 "VerifyOptions::threads of the receiver (1: the serial verify_landed)");
  app.add_option("--serve", serve_transports, "internal: run as the receiving process");
  app.add_option("--serve-bytes", serve_bytes, "internal: region size of the receiver");
  app.add_flag("--serve-allocate", serve_allocate, "internal: receiver uses allocate_memory");
  CLI11_PARSE(app, argc, argv);
  if (!serve_transports.empty()) {
    return serve(serve_transports, serve_bytes, serve_allocate, settings);
  }

  const uint64_t total = state_bytes();
  utsname u{};
  uname(&u);
  std::time_t now = std::time(nullptr);
  char date[64];
  std::strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", std::gmtime(&now));
  std::printf("transfer_bench  %s  host %s (%s %s), %u cores\n", date, u.nodename, u.sysname,
              u.release, std::thread::hardware_concurrency());
  std::printf("state: V4-Flash, 32768 tokens, FP8 served format: %llu bytes (%.1f MiB)\n",
              static_cast<unsigned long long>(total), static_cast<double>(total) / 1048576.0);
  std::printf(
      "layouts: uniform %llu-byte puts (%zu), whole (1 put), per-layer (%zu), per-page (%zu); "
      "%d repeats\n",
      static_cast<unsigned long long>(span), uniform_layout(total, span).size(),
      v4_layout(false).size(), v4_layout(true).size(), repeats);
  std::printf(
      "checksums: %u sender threads beside the puts, %llu bytes per digest (0: per put), %u "
      "receiver threads; load average %s\n",
      settings.checksum_threads, static_cast<unsigned long long>(settings.digest_bytes),
      settings.verify_threads, load_average().c_str());
  std::printf(
      "put = sender checksums + puts + flush; hand-off = until the "
      "receiver verified the last byte; GB/s = 1e9 bytes/s, median [slowest fastest]\n\n");

  std::vector<std::byte> state(total);
  for (uint64_t i = 0; i < total; i += 8) {
    uint64_t v = (i * 0x9e3779b97f4a7c15ull) ^ (i >> 7);
    std::memcpy(state.data() + i, &v, std::min<uint64_t>(8, total - i));
  }

  {
    auto t0 = Clock::now();
    uint64_t h = span_checksum(state.data(), total);
    double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    std::printf("sender checksum alone (XXH3-64 of the state): %.2f GB/s [%016llx]\n\n",
                static_cast<double>(total) / secs / 1e9, static_cast<unsigned long long>(h));
  }
  std::printf("%-9s %-10s %-9s %-19s %-19s %-19s %5s %5s %5s\n", "transport", "region", "layout",
              "put GB/s", "hand-off GB/s", "perftest GB/s", "put", "h-o", "pair");
  const std::pair<const char*, std::vector<Span>> all_layouts[] = {
      {"uniform", uniform_layout(total, span)},
      {"whole", uniform_layout(total, total)},
      {"per-layer", v4_layout(false)},
      {"per-page", v4_layout(true)}};
  std::vector<std::pair<const char*, std::vector<PutOp>>> layouts;
  for (const auto& [name, spans] : all_layouts) {
    if (std::find(layout_names.begin(), layout_names.end(), name) == layout_names.end()) continue;
    std::vector<PutOp> ops;
    for (const Span& sp : spans)
      ops.push_back({state.data() + sp.offset, sp.bytes, sp.offset});
    layouts.emplace_back(name, std::move(ops));
  }
  for (const std::string& tls : transports) {
    for (const std::string& kind : regions) {
      const bool allocate = kind == "allocated";
      int to_child[2], from_child[2];
      if (pipe(to_child) != 0 || pipe(from_child) != 0) return 1;
      pid_t pid = fork();
      if (pid == 0) {
        dup2(to_child[0], 0);
        dup2(from_child[1], 1);
        close(to_child[1]);
        close(from_child[0]);
        std::string bytes = std::to_string(total);
        std::string verify = std::to_string(settings.verify_threads);
        execl("/proc/self/exe", argv[0], "--serve", tls.c_str(), "--serve-bytes", bytes.c_str(),
              "--verify-threads", verify.c_str(), allocate ? "--serve-allocate" : nullptr,
              static_cast<char*>(nullptr));
        _exit(127);
      }
      close(to_child[0]);
      close(from_child[1]);
      std::vector<uint8_t> a, r;
      if (!read_frame(from_child[0], a) || !read_frame(from_child[0], r)) {
        std::fprintf(stderr, "receiver for %s did not start\n", tls.c_str());
        return 1;
      }
      auto engine = Transport::create_ucx(options_for(tls, "prefill", settings));
      if (!engine.is_ok()) {
        std::fprintf(stderr, "%s\n", engine.status().to_string().c_str());
        return 1;
      }
      auto peer = (*engine)->connect(decode_peer_address(a).value());
      if (!peer.is_ok()) return 1;
      RemoteRegion region = decode_remote_region(r).value();

      // Rounds: perftest at both sizes, then every layout.
      // Round 0 warms up (page faults, wire-up) and is not counted.
      std::vector<double> perf_span, perf_whole;
      std::vector<std::vector<Seconds>> times(layouts.size());
      auto next_port = [&port] { return port == 0 ? free_tcp_port() : port++; };
      for (int round = 0; round <= repeats; ++round) {
        double ps = perftest_once(perftest_binary, tls, span, std::max<uint64_t>(50, total / span),
                                  20, next_port());
        double pw = perftest_once(perftest_binary, tls, total, 3, 1, next_port());
        for (size_t l = 0; l < layouts.size(); ++l) {
          Seconds t =
              handoff(**engine, *peer, region, layouts[l].second, to_child[1], from_child[0]);
          if (round > 0) times[l].push_back(t);
        }
        if (round > 0) {
          perf_span.push_back(ps);
          perf_whole.push_back(pw);
        }
      }
      auto bytes = static_cast<double>(total);
      for (size_t l = 0; l < layouts.size(); ++l) {
        const std::string name = layouts[l].first;
        const std::vector<double>* perf = name == "uniform" ? &perf_span
                                          : name == "whole" ? &perf_whole
                                                            : nullptr;
        std::vector<double> put, ho, pair;
        const auto& ts = times[l];
        for (size_t i = 0; i < ts.size(); ++i) {
          put.push_back(bytes / ts[i].put / 1e9);
          ho.push_back(bytes / ts[i].handoff / 1e9);
          if (perf != nullptr && (*perf)[i] > 0) pair.push_back(ho.back() / (*perf)[i]);
        }
        Spread p = spread(put), h = spread(ho);
        std::string ref, ratio, handoff_ratio, paired;
        if (perf != nullptr) {
          std::vector<double> valid;
          for (double v : *perf) {
            if (v > 0) valid.push_back(v);
          }
          Spread reference = spread(valid);
          if (reference.median > 0) {
            char buf[16];
            ref = text(reference);
            std::snprintf(buf, sizeof buf, "%.2f", p.median / reference.median);
            ratio = buf;
            std::snprintf(buf, sizeof buf, "%.2f", h.median / reference.median);
            handoff_ratio = buf;
            std::snprintf(buf, sizeof buf, "%.2f", spread(pair).median);
            paired = buf;
          }
        }
        std::printf("%-9s %-10s %-9s %-19s %-19s %-19s %5s %5s %5s\n", tls.c_str(), kind.c_str(),
                    name.c_str(), text(p).c_str(), text(h).c_str(), ref.c_str(), ratio.c_str(),
                    handoff_ratio.c_str(), paired.c_str());
      }
      std::fflush(stdout);
      close(to_child[1]);
      close(from_child[0]);
      waitpid(pid, nullptr, 0);
    }
  }
  std::printf("\nload average at the end: %s\n", load_average().c_str());
  return 0;
}
