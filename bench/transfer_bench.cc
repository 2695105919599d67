// KV hand-off between two processes on loopback, against ucx_perftest: a 32k-token
// DeepSeek-V4-Flash request (43 layers: 2 sliding-only, 21 CSA at rate 4, 20 HCA at rate 128;
// 512-channel entries with 64 RoPE channels, 128-channel indexer keys, a 128-token window) in
// each KV dtype, laid out as model::handoff_spans lays it out: the small part (windows and
// compressor state) and every page of compressed entries and indexer keys.
//
// Two ways to hand it over, each timed from the sender's first step until the receiver says
// it has the state in its own pages, verified:
//   staged  (how the hand-off worked before): the sender packs every page into one buffer and
//           checksums it (pack_state), puts that one buffer; the receiver copies it out of its
//           region, verifies it, and unpacks it into pages (one more copy). Copies: pack, wire,
//           receiver's copy, unpack = 4; hashes: pack's, the put's, the receiver's.
//   paged   (the hand-off now, model/state_handoff.h): the sender puts every page from where it
//           lies, one op and one digest per page; the receiver copies each span into a page
//           and checks that page's digest. Copies: wire, receiver's copy = 2; hashes: the
//           put's, the receiver's.
// The sender's pages are separate allocations, as a request's pages are.
//
// The process that receives (decode side) is this binary re-run with --serve; it registers the
// region, sends its address and rkey through a pipe, and for each hand-off does the receiver's
// part of the method the sender names.
//
// Fairness: ucx_perftest runs on the same transports and devices, at the size of the state
// (one put of the whole state). The set-ups are interleaved, because the machine is shared:
// every round runs ucx_perftest once per dtype and then one hand-off per (dtype, method), so
// that a burst of load hits all of them alike. Figures are medians of --repeats rounds after a
// warm-up round, with the slowest and fastest beside them; "pair" is the median over rounds of
// hand-off / that round's perftest.

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
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "dserve/kvstore/transfer.h"
#include "dserve/model/config.h"
#include "dserve/model/model_init.h"
#include "dserve/model/state_handoff.h"

namespace {

using namespace dserve::kvstore;
using Clock = std::chrono::steady_clock;

constexpr int64_t kTokens = 32768;

// V4-Flash's shapes, as far as the state goes, in `dtype`.
dserve::model::ModelConfig v4_flash(KvDtype dtype) {
  dserve::model::ModelConfig c = dserve::model::v4_flash_state_config();
  if (dserve::Status s = dserve::model::set_kv_dtype(c, dtype); !s.is_ok()) {
    std::fprintf(stderr, "%s\n", s.to_string().c_str());
    std::exit(1);
  }
  return c;
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

// How the sender computes digests (TransferOptions).
struct ChecksumSettings {
  unsigned checksum_threads = TransferOptions{}.checksum_threads;
  uint64_t digest_bytes = TransferOptions{}.digest_bytes;
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

// How a hand-off is made (the header comment); the first byte of each frame to the receiver.
enum class Method : uint8_t { kStaged = 0, kPaged = 1 };
const char* method_name(Method m) {
  return m == Method::kStaged ? "staged" : "paged";
}

// The page size the staged receiver unpacks into: a CSA page of fp8 entries (32 x 584 bytes);
// the cost is the bytes copied, hardly the number of pieces.
constexpr uint64_t kStagedPiece = 18688;

// The receiver's part, as the decode worker does it: nothing of the region is read before its
// digest matched on a copy.
dserve::Status receive(Method method, std::span<const std::byte> region,
                       std::span<const SpanDigest> digests) {
  if (method == Method::kStaged) {
    // Copy the packed state out, verify it, unpack it into fresh pages (here: one copy of each
    // page-sized piece into its own allocation, as unpack_state's appends do).
    if (digests.size() != 1) return dserve::data_loss("staged: one digest expected");
    std::vector<std::byte> copy(region.begin(), region.begin() + digests[0].bytes);
    const SpanDigest whole{0, digests[0].bytes, digests[0].xxh3};
    DSERVE_RETURN_IF_ERROR(verify_landed(copy, std::span(&whole, 1)));
    // unpack_state appends the rows into zero-filled pages (PagedRows::append).
    std::vector<std::vector<std::byte>> pages;
    for (uint64_t at = 0; at < copy.size(); at += kStagedPiece) {
      const uint64_t n = std::min<uint64_t>(kStagedPiece, copy.size() - at);
      pages.emplace_back(n);
      std::memcpy(pages.back().data(), copy.data() + at, n);
    }
    return dserve::Status::ok();
  }
  // receive_handoff: each span into a page allocated for overwrite, checked there.
  std::vector<std::unique_ptr<std::byte[]>> pages;
  pages.reserve(digests.size());
  for (const SpanDigest& d : digests) {
    pages.emplace_back(new std::byte[d.bytes]);
    std::memcpy(pages.back().get(), region.data() + d.remote_offset, d.bytes);
    if (span_checksum(pages.back().get(), d.bytes) != d.xxh3) {
      return dserve::data_loss("paged: span at " + std::to_string(d.remote_offset) +
                               " does not match its digest");
    }
  }
  return dserve::Status::ok();
}

// The receiving side: register, hand over, receive each hand-off, answer "OK" or the error.
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
    if (frame.empty()) return 1;
    auto digests = decode_digests(std::span(frame).subspan(1));
    dserve::Status st = digests.is_ok() ? receive(static_cast<Method>(frame[0]), memory, *digests)
                                        : digests.status();
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

[[noreturn]] void fail(const std::string& why) {
  std::fprintf(stderr, "%s\n", why.c_str());
  std::exit(1);
}

// The sender's state: the small part and every page in its own allocation, as a request has
// them, at the offsets handoff_spans gives.
struct SenderState {
  std::vector<std::vector<std::byte>> pieces;
  std::vector<PutOp> ops;
  uint64_t bytes = 0;
};

SenderState sender_state(const dserve::model::ModelConfig& config) {
  SenderState st;
  uint64_t seed = 0x9e3779b97f4a7c15ull;
  for (const auto& span : dserve::model::handoff_spans(config, kTokens)) {
    st.pieces.emplace_back(span.bytes);
    for (uint64_t i = 0; i + 8 <= span.bytes; i += 8) {
      seed = seed * 6364136223846793005ull + 1442695040888963407ull;
      std::memcpy(st.pieces.back().data() + i, &seed, 8);
    }
    st.ops.push_back({st.pieces.back().data(), span.bytes, span.offset});
    st.bytes = span.offset + span.bytes;
  }
  return st;
}

struct Seconds {
  double put = 0;      // from the first step until the put returned (packing included)
  double handoff = 0;  // until the receiver had the state verified in its pages
};

// One hand-off; exits on any failure (a benchmark of a broken transfer means nothing).
Seconds handoff(Transport& transport, dserve::kvstore::PeerId peer, const RemoteRegion& region,
                const SenderState& state, Method method, int to_child, int from_child) {
  std::vector<uint8_t> answer;
  const auto t0 = Clock::now();
  std::vector<std::byte> packed;
  std::vector<PutOp> staged;
  const std::vector<PutOp>* ops = &state.ops;
  if (method == Method::kStaged) {
    // pack_state: every page into one buffer, then its checksum.
    packed.resize(state.bytes);
    for (const PutOp& op : state.ops)
      std::memcpy(packed.data() + op.remote_offset, op.local, op.bytes);
    volatile uint64_t sum = span_checksum(packed.data(), packed.size());
    (void)sum;
    staged.push_back({packed.data(), packed.size(), 0});
    ops = &staged;
  }
  auto digests = transport.put(peer, region, *ops);
  const auto t1 = Clock::now();
  if (!digests.is_ok()) fail("put failed: " + digests.status().to_string());
  std::vector<uint8_t> frame{static_cast<uint8_t>(method)};
  const auto encoded = encode_digests(*digests);
  frame.insert(frame.end(), encoded.begin(), encoded.end());
  if (!write_frame(to_child, std::move(frame))) fail("receiver gone");
  if (!read_frame(from_child, answer) || std::string(answer.begin(), answer.end()) != "OK") {
    fail("receiver refused the hand-off: " + std::string(answer.begin(), answer.end()));
  }
  return {std::chrono::duration<double>(t1 - t0).count(),
          std::chrono::duration<double>(Clock::now() - t0).count()};
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
  CLI::App app{"KV hand-off of a 32k-token V4-Flash state between two processes on loopback"};
  std::vector<std::string> transports = {"tcp", "sm,self"};
  std::vector<std::string> dtypes = {"fp32", "fp8"};
  std::vector<std::string> methods = {"staged", "paged"};
  int repeats = 5;
  std::string perftest_binary = "ucx_perftest";
  int port = 0;
  std::string serve_transports;
  uint64_t serve_bytes = 0;
  bool serve_allocate = false;
  ChecksumSettings settings;
  std::string region_kind = "allocated";
  app.add_option("--transports", transports, "UCX transport sets to measure");
  app.add_option("--kv-dtypes", dtypes, "fp32 and/or fp8");
  app.add_option("--methods", methods, "staged (pack, put, copy, unpack) and/or paged");
  app.add_option("--repeats", repeats, "timed rounds (each: perftest per dtype, every hand-off)");
  app.add_option("--perftest", perftest_binary, "ucx_perftest binary");
  app.add_option("--port", port,
                 "ucx_perftest's first control port, one more per run (0: a free one each run)");
  app.add_option("--region", region_kind,
                 "receiver memory: allocated (allocate_memory, as the decode worker's arena "
                 "is over shared memory) or registered");
  app.add_option("--checksum-threads", settings.checksum_threads,
                 "TransferOptions::checksum_threads of the sender (0: hash before the puts)");
  app.add_option("--serve", serve_transports, "internal: run as the receiving process");
  app.add_option("--serve-bytes", serve_bytes, "internal: region size of the receiver");
  app.add_flag("--serve-allocate", serve_allocate, "internal: receiver uses allocate_memory");
  CLI11_PARSE(app, argc, argv);
  if (!serve_transports.empty()) {
    return serve(serve_transports, serve_bytes, serve_allocate, settings);
  }

  struct Dtype {
    std::string name;
    SenderState state;
  };
  std::vector<Dtype> states;
  uint64_t largest = 0;
  for (const std::string& name : dtypes) {
    auto dtype = parse_kv_dtype(name);
    if (!dtype.is_ok()) fail("--kv-dtypes: " + dtype.status().to_string());
    states.push_back({name, sender_state(v4_flash(*dtype))});
    largest = std::max(largest, states.back().state.bytes);
  }
  std::vector<Method> chosen;
  for (const std::string& m : methods) {
    if (m != "staged" && m != "paged") fail("--methods: staged or paged, got " + m);
    chosen.push_back(m == "staged" ? Method::kStaged : Method::kPaged);
  }

  utsname u{};
  uname(&u);
  std::time_t now = std::time(nullptr);
  char date[64];
  std::strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", std::gmtime(&now));
  std::printf("transfer_bench  %s  host %s (%s %s), %u cores\n", date, u.nodename, u.sysname,
              u.release, std::thread::hardware_concurrency());
  for (const Dtype& d : states) {
    std::printf(
        "state: V4-Flash, %lld tokens, kv_dtype %s: %llu bytes (%.1f MiB) in %zu spans "
        "(the small part and every page)\n",
        static_cast<long long>(kTokens), d.name.c_str(),
        static_cast<unsigned long long>(d.state.bytes),
        static_cast<double>(d.state.bytes) / 1048576.0, d.state.ops.size());
  }
  std::printf(
      "copies per hand-off: staged 4 (pack, wire, receiver's copy, unpack), paged 2 "
      "(wire, receiver's copy into its pages)\n");
  std::printf("receiver region: %s; %d repeats; sender checksum threads %u; load average %s\n",
              region_kind.c_str(), repeats, settings.checksum_threads, load_average().c_str());
  std::printf(
      "put = from the sender's first step (packing included) until the put returned; "
      "hand-off = until the receiver has the state verified in its pages; GB/s = 1e9 "
      "bytes/s, median [slowest fastest]; ratios against ucx_perftest ucp_put_bw of one "
      "message of the state's size (w) and of 1 MiB messages (1M)\n\n");
  std::printf("%-9s %-6s %-7s %8s %-19s %-19s %-19s %-19s %5s %5s %5s %5s\n", "transport", "dtype",
              "method", "h-o ms", "put GB/s", "hand-off GB/s", "perftest whole", "perftest 1 MiB",
              "p/w", "h/w", "p/1M", "h/1M");

  for (const std::string& tls : transports) {
    const bool allocate = region_kind == "allocated";
    int to_child[2], from_child[2];
    if (pipe(to_child) != 0 || pipe(from_child) != 0) return 1;
    pid_t pid = fork();
    if (pid == 0) {
      dup2(to_child[0], 0);
      dup2(from_child[1], 1);
      close(to_child[1]);
      close(from_child[0]);
      std::string bytes = std::to_string(largest);
      execl("/proc/self/exe", argv[0], "--serve", tls.c_str(), "--serve-bytes", bytes.c_str(),
            allocate ? "--serve-allocate" : nullptr, static_cast<char*>(nullptr));
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
    if (!engine.is_ok()) fail(engine.status().to_string());
    auto peer = (*engine)->connect(decode_peer_address(a).value());
    if (!peer.is_ok()) return 1;
    RemoteRegion region = decode_remote_region(r).value();

    // Round 0 warms up (page faults, wire-up) and is not counted.
    std::vector<std::vector<double>> perf_whole(states.size()), perf_mib(states.size());
    std::vector<std::vector<std::vector<Seconds>>> times(
        states.size(), std::vector<std::vector<Seconds>>(chosen.size()));
    auto next_port = [&port] { return port == 0 ? free_tcp_port() : port++; };
    for (int round = 0; round <= repeats; ++round) {
      for (size_t d = 0; d < states.size(); ++d) {
        // perftest at the state's size and with 1 MiB messages (their total the state's size):
        // over shared memory 1 MiB messages stay in the caches, over TCP one huge message is
        // far slower than a stream of 1 MiB ones; both are printed.
        const uint64_t mib = uint64_t{1} << 20;
        const double whole =
            perftest_once(perftest_binary, tls, states[d].state.bytes, 3, 1, next_port());
        const double pieces =
            perftest_once(perftest_binary, tls, mib,
                          std::max<uint64_t>(50, states[d].state.bytes / mib), 20, next_port());
        if (round > 0) {
          perf_whole[d].push_back(whole);
          perf_mib[d].push_back(pieces);
        }
        for (size_t m = 0; m < chosen.size(); ++m) {
          const Seconds t = handoff(**engine, *peer, region, states[d].state, chosen[m],
                                    to_child[1], from_child[0]);
          if (round > 0) times[d][m].push_back(t);
        }
      }
    }
    for (size_t d = 0; d < states.size(); ++d) {
      const auto bytes = static_cast<double>(states[d].state.bytes);
      const Spread whole = spread(perf_whole[d]), pieces = spread(perf_mib[d]);
      for (size_t m = 0; m < chosen.size(); ++m) {
        std::vector<double> put, ho, ms;
        for (const Seconds& t : times[d][m]) {
          put.push_back(bytes / t.put / 1e9);
          ho.push_back(bytes / t.handoff / 1e9);
          ms.push_back(t.handoff * 1000.0);
        }
        const Spread p = spread(put), h = spread(ho);
        auto ratio = [](double num, double den) { return den > 0 ? num / den : 0.0; };
        std::printf("%-9s %-6s %-7s %8.1f %-19s %-19s %-19s %-19s %5.2f %5.2f %5.2f %5.2f\n",
                    tls.c_str(), states[d].name.c_str(), method_name(chosen[m]), spread(ms).median,
                    text(p).c_str(), text(h).c_str(), text(whole).c_str(), text(pieces).c_str(),
                    ratio(p.median, whole.median), ratio(h.median, whole.median),
                    ratio(p.median, pieces.median), ratio(h.median, pieces.median));
      }
    }
    std::fflush(stdout);
    close(to_child[1]);
    close(from_child[0]);
    waitpid(pid, nullptr, 0);
  }
  std::printf("\nload average at the end: %s\n", load_average().c_str());
  return 0;
}
