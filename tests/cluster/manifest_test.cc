// The manifest: the shipped examples validate, and each kind of mistake produces its precise
// message (file:line:column, field, found, expected); every problem is reported at once.

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "dserve/cluster/manifest.h"
#include "dserve/cluster/serve_args.h"

namespace dserve::cluster {
namespace {

// A valid manifest; the tests below change one thing in it. Line numbers matter: the first
// line is line 1.
constexpr const char* kBase = R"(version: 1
mode: disaggregated
model:
  path: /models/m
  context_tokens: 4096
nodes:
  - name: node-a
    address: 10.0.0.1
    devices: 2
    memory_gib: 64
    base_port: 7000
gateway:
  node: node-a
pools:
  prefill:
    replicas: 1
    placement: node-a
  decode:
    replicas: 1
    placement: node-a
)";

std::string replace(std::string text, const std::string& from, const std::string& to) {
  const size_t at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  if (at != std::string::npos) text.replace(at, from.size(), to);
  return text;
}

std::vector<std::string> problems(const std::string& text) {
  std::vector<std::string> out;
  for (const auto& p : check_manifest(text, "m.yaml").problems)
    out.push_back(p.to_string());
  return out;
}

using Lines = std::vector<std::string>;

std::string read(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

TEST(Manifest, BaseIsValid) {
  auto m = parse_manifest(kBase, "m.yaml");
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  ASSERT_EQ(m->processes.size(), 3u);
  EXPECT_EQ(m->processes[0].name, "gateway");
  EXPECT_EQ(m->processes[0].port, 7000);
  EXPECT_EQ(m->processes[0].second_port, 7001);
  EXPECT_EQ(m->processes[1].name, "prefill-0");
  EXPECT_EQ(m->processes[1].port, 7002);
  EXPECT_EQ(m->processes[1].devices, (std::vector<int64_t>{0}));
  EXPECT_EQ(m->processes[2].name, "decode-0");
  EXPECT_EQ(m->processes[2].port, 7003);
  EXPECT_EQ(m->processes[2].devices, (std::vector<int64_t>{1}));
  // The prompt limit defaults to the model's context.
  EXPECT_EQ(m->limits.max_prompt_tokens, 4096);
  // /metrics: control port + network.metrics_port_offset (default 1000); no HTTP API unless
  // gateway.http_port names one.
  EXPECT_EQ(m->processes[0].metrics_port, 8000);
  EXPECT_EQ(m->processes[1].metrics_port, 8002);
  EXPECT_EQ(m->processes[2].metrics_port, 8003);
  EXPECT_EQ(m->processes[0].http_port, 0);
}

TEST(Manifest, HttpPortAndMetricsOffset) {
  auto m =
      parse_manifest(replace(std::string(kBase) + "network:\n  metrics_port_offset: 0\n",
                             "  node: node-a\npools:", "  node: node-a\n  http_port: 8080\npools:"),
                     "m.yaml");
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  EXPECT_EQ(m->processes[0].http_port, 8080);
  for (const auto& p : m->processes)
    EXPECT_EQ(p.metrics_port, 0) << p.name;
  auto args = to_serve_args(*m, m->processes[0]);
  ASSERT_TRUE(args.is_ok());
  const std::string joined = [&] {
    std::string j;
    for (const auto& a : *args)
      j += a + " ";
    return j;
  }();
  EXPECT_NE(joined.find("--http-listen 10.0.0.1:8080 "), std::string::npos) << joined;
  EXPECT_EQ(joined.find("--metrics-listen"), std::string::npos) << joined;
}

// --- The examples ------------------------------------------------------------------------

// launcher slurm: no nodes in the file; every process is planned on one node, with ports unique
// across the job, and moved to its allocated node by `up`.
TEST(ManifestExamples, SlurmPlansEveryProcessOnTheJobWithUniquePorts) {
  auto m = load_manifest(DSERVE_SOURCE_DIR "/cluster/examples/slurm.yaml");
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  EXPECT_EQ(m->launcher, Launcher::kSlurm);
  EXPECT_EQ(m->slurm.partition, "gpu");
  EXPECT_EQ(m->slurm.time_limit, "7-00:00:00");
  EXPECT_EQ(m->supervision.on_pool_lost, "fail-job");
  ASSERT_EQ(m->pools.size(), 2u);
  EXPECT_EQ(m->pools[0].gres, "gpu:1");
  std::set<uint16_t> ports;
  for (const auto& p : m->processes) {
    EXPECT_EQ(p.node, std::string(kSlurmPlanningNode)) << p.name;
    for (uint16_t port : {p.port, p.second_port, p.metrics_port, p.http_port}) {
      if (port) {
        EXPECT_TRUE(ports.insert(port).second) << p.name << " port " << port;
      }
    }
  }
  EXPECT_EQ(m->processes.size(), 5u);
  auto gateway = to_serve_args(*m, *find_process(*m, "gateway"));
  ASSERT_TRUE(gateway.is_ok());
  const std::string joined = [&] {
    std::string out;
    for (const auto& a : *gateway)
      out += a + " ";
    return out;
  }();
  EXPECT_NE(joined.find("--on-pool-lost fail-job --pool-lost-ms 120000"), std::string::npos)
      << joined;
}

TEST(ManifestMistakes, SlurmSettingsOutOfPlace) {
  const std::string slurm_base =
      "version: 1\nmode: disaggregated\nlauncher: slurm\nmodel:\n  path: /m\npools:\n"
      "  prefill:\n    replicas: 1\n  decode:\n    replicas: 1\n";
  // Nodes and placements are Slurm's to choose; a sbatch value must be one word.
  EXPECT_EQ(problems(slurm_base + "nodes:\n  - name: a\n    address: 10.0.0.1\n"),
            (Lines{"m.yaml:12:3: nodes: found a node list; expected no nodes under launcher "
                   "'slurm' (the job's allocation decides where each process runs; ask for nodes "
                   "with slurm.partition, slurm.constraint and the pools' gres)"}));
  EXPECT_EQ(problems(slurm_base + "slurm:\n  partition: gpu;rm\n"),
            (Lines{"m.yaml:12:14: slurm.partition: found 'gpu;rm'; expected one word without "
                   "spaces, quotes or shell characters (passed to sbatch)"}));
  // gres and the slurm section belong to launcher slurm; supervision choices are checked.
  EXPECT_EQ(problems(std::string(kBase) + "slurm:\n  partition: gpu\n"),
            (Lines{"m.yaml:22:3: slurm: found a slurm section; expected launcher: slurm with it "
                   "(the launcher is 'nodes')"}));
  EXPECT_EQ(problems(std::string(kBase) + "supervision:\n  on_pool_lost: abort\n"),
            (Lines{"m.yaml:22:17: supervision.on_pool_lost: found 'abort'; expected one of "
                   "restart, fail-job"}));
}

TEST(ManifestExamples, SingleNodeValidatesAndGivesServeCommands) {
  auto m = load_manifest(DSERVE_SOURCE_DIR "/cluster/examples/single-node.yaml");
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  std::vector<std::string> names;
  for (const auto& p : m->processes)
    names.push_back(p.name);
  EXPECT_EQ(names, (Lines{"gateway", "prefill-0", "prefill-1", "decode-0", "decode-1"}));

  auto gateway = to_serve_args(*m, *find_process(*m, "gateway"));
  ASSERT_TRUE(gateway.is_ok()) << gateway.status().to_string();
  EXPECT_EQ(*gateway, (Lines{"serve",
                             "--role",
                             "gateway",
                             "--model",
                             "/models/deepseek-v4",
                             "--listen",
                             "127.0.0.1:7000",
                             "--process-name",
                             "gateway",
                             "--metrics-listen",
                             "127.0.0.1:8000",
                             "--grpc-listen",
                             "127.0.0.1:50051",
                             "--prefill",
                             "127.0.0.1:7001,127.0.0.1:7002",
                             "--decode",
                             "127.0.0.1:7003,127.0.0.1:7004",
                             "--ready-timeout-ms",
                             "60000",
                             "--request-timeout-ms",
                             "300000",
                             "--probe-interval-ms",
                             "250",
                             "--reservation-renewal-ms",
                             "10000",
                             "--max-running",
                             "256",
                             "--max-queued",
                             "1024",
                             "--max-attempts",
                             "4",
                             "--max-prefill-losses",
                             "2",
                             "--max-prefill-queue-tokens",
                             "8192",
                             "--default-max-tokens",
                             "256",
                             "--max-prompt-tokens",
                             "131072",
                             "--max-output-tokens",
                             "32768",
                             "--max-requests-per-second-per-token",
                             "0",
                             "--max-concurrent-per-token",
                             "0"}));

  auto prefill = to_serve_args(*m, *find_process(*m, "prefill-1"));
  ASSERT_TRUE(prefill.is_ok());
  EXPECT_EQ(*prefill, (Lines{"serve",
                             "--role",
                             "prefill",
                             "--model",
                             "/models/deepseek-v4",
                             "--listen",
                             "127.0.0.1:7002",
                             "--process-name",
                             "prefill-1",
                             "--metrics-listen",
                             "127.0.0.1:8002",
                             "--ucx-transports",
                             "sm,self,tcp",
                             "--ucx-net-devices",
                             "lo",
                             "--transfer-timeout-ms",
                             "10000",
                             "--token-budget",
                             "2048",
                             "--step-ms",
                             "250"}));
  EXPECT_EQ(find_process(*m, "prefill-1")->devices, (std::vector<int64_t>{2, 3}));

  auto decode = to_serve_args(*m, *find_process(*m, "decode-0"));
  ASSERT_TRUE(decode.is_ok());
  EXPECT_EQ(*decode, (Lines{"serve",
                            "--role",
                            "decode",
                            "--model",
                            "/models/deepseek-v4",
                            "--listen",
                            "127.0.0.1:7003",
                            "--process-name",
                            "decode-0",
                            "--metrics-listen",
                            "127.0.0.1:8003",
                            "--ucx-transports",
                            "sm,self,tcp",
                            "--ucx-net-devices",
                            "lo",
                            "--transfer-timeout-ms",
                            "10000",
                            "--max-batch",
                            "64",
                            "--kv-budget-mib",
                            "16384",
                            "--reservation-timeout-ms",
                            "30000",
                            "--region-grace-ms",
                            "30000",
                            "--speculative-tokens",
                            "3",
                            "--speculation",
                            "adaptive"}));
  EXPECT_EQ(find_process(*m, "decode-1")->devices, (std::vector<int64_t>{6, 7}));
}

TEST(ManifestExamples, ThreeNodesValidatesAndGivesServeCommands) {
  auto m = load_manifest(DSERVE_SOURCE_DIR "/cluster/examples/three-nodes.yaml");
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  ASSERT_EQ(m->processes.size(), 9u);
  const Process& d2 = *find_process(*m, "decode-2");
  EXPECT_EQ(d2.node, "node-c");
  EXPECT_EQ(d2.host, "dserve-c.cluster.internal");
  EXPECT_EQ(d2.port, 7100);
  EXPECT_EQ(d2.devices, (std::vector<int64_t>{0, 1, 2, 3}));

  auto gateway = to_serve_args(*m, *find_process(*m, "gateway"));
  ASSERT_TRUE(gateway.is_ok());
  EXPECT_EQ(Lines(gateway->begin(), gateway->begin() + 17),
            (Lines{"serve", "--role", "gateway", "--model", "/models/deepseek-v4", "--listen",
                   "10.0.0.1:7000", "--process-name", "gateway", "--metrics-listen",
                   "10.0.0.1:8000", "--grpc-listen", "10.0.0.1:50051", "--prefill",
                   "10.0.0.1:7001,10.0.0.1:7002,10.0.0.1:7003,10.0.0.1:7004", "--decode",
                   "10.0.0.2:7100,10.0.0.2:7101,dserve-c.cluster.internal:7100,"
                   "dserve-c.cluster.internal:7101"}));

  auto decode = to_serve_args(*m, d2);
  ASSERT_TRUE(decode.is_ok());
  EXPECT_EQ(*decode, (Lines{"serve",
                            "--role",
                            "decode",
                            "--model",
                            "/models/deepseek-v4",
                            "--listen",
                            "dserve-c.cluster.internal:7100",
                            "--process-name",
                            "decode-2",
                            "--metrics-listen",
                            "dserve-c.cluster.internal:8100",
                            "--ucx-transports",
                            "rc,sm,self",
                            "--ucx-net-devices",
                            "mlx5_0:1",
                            "--transfer-timeout-ms",
                            "20000",
                            "--max-batch",
                            "128",
                            "--kv-budget-mib",
                            "65536",
                            "--reservation-timeout-ms",
                            "60000",
                            "--region-grace-ms",
                            "45000"}));
}

// The commented-out kv_store and security sections of the three-node example validate, and
// the prefix store reaches the prefill processes as the --kv-* flags (and no other process).
TEST(ManifestExamples, ThreeNodesWithKvStoreAndSecurityValidatesAndLaunches) {
  std::string text = read(DSERVE_SOURCE_DIR "/cluster/examples/three-nodes.yaml");
  const size_t from = text.find("# kv_store:");
  ASSERT_NE(from, std::string::npos);
  // Uncomment the block: drop the "# " that starts each of its lines.
  std::istringstream block(text.substr(from));
  std::string tail;
  for (std::string line; std::getline(block, line);)
    tail += line.substr(2) + "\n";
  auto m = parse_manifest(text.substr(0, from) + tail, "three-nodes-full.yaml");
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  ASSERT_TRUE(m->kv_store.has_value());
  EXPECT_EQ(m->kv_store->host_codec, "fp8");
  ASSERT_TRUE(m->kv_store->disk.has_value());
  EXPECT_EQ(m->kv_store->disk->path, "/var/lib/dserve/kv");
  auto args = to_serve_args(*m, *find_process(*m, "prefill-0"));
  ASSERT_TRUE(args.is_ok()) << args.status().to_string();
  EXPECT_EQ(Lines(args->end() - 18, args->end()),
            (Lines{"--token-budget", "4096", "--step-ms", "250", "--kv-device-mib", "8192",
                   "--kv-host-mib", "65536", "--kv-host-codec", "fp8", "--kv-disk-path",
                   "/var/lib/dserve/kv", "--kv-disk-mib", "1048576", "--kv-disk-codec", "fp8",
                   "--kv-write-queue-mib", "256"}));
  for (const char* other : {"gateway", "decode-0"}) {
    auto o = to_serve_args(*m, *find_process(*m, other));
    ASSERT_TRUE(o.is_ok()) << o.status().to_string();
    for (const std::string& arg : *o)
      EXPECT_EQ(arg.rfind("--kv-", 0) == 0, arg == "--kv-budget-mib") << other << ": " << arg;
  }
  ASSERT_TRUE(m->security.has_value());
  EXPECT_EQ(m->security->tls_ca, "/etc/dserve/tls/ca.crt");
  ASSERT_TRUE(m->security->control_tls.has_value());
  // The control plane's TLS goes to every process, the gateway's client TLS to the gateway.
  for (const char* process : {"gateway", "prefill-0", "decode-0"}) {
    auto o = to_serve_args(*m, *find_process(*m, process));
    ASSERT_TRUE(o.is_ok()) << o.status().to_string();
    const auto at = std::find(o->begin(), o->end(), "--control-tls-cert");
    ASSERT_LE(at + 6, o->end()) << process;
    EXPECT_EQ(Lines(at, at + 6), (Lines{"--control-tls-cert", "/etc/dserve/cluster/node.pem",
                                        "--control-tls-key", "/etc/dserve/cluster/node.key",
                                        "--control-tls-ca", "/etc/dserve/cluster/ca.pem"}))
        << process;
  }
  EXPECT_EQ(m->limits.max_output_tokens, 16384);
  EXPECT_EQ(m->limits.requests_per_second_per_token, 20);
  EXPECT_EQ(m->limits.concurrent_per_token, 64);
}

// security and the per-token limits go to the gateway, which serves the clients; the workers
// get neither.
TEST(ManifestServeArgs, SecurityAndClientLimitsGoToTheGatewayOnly) {
  auto m = parse_manifest(std::string(kBase) +
                              "security:\n  token_file: /etc/dserve/tokens\n"
                              "  tls_cert: /etc/tls/c.pem\n  tls_key: /etc/tls/k.pem\n"
                              "  tls_ca: /etc/tls/ca.pem\n"
                              "limits:\n  max_output_tokens: 1024\n"
                              "  requests_per_second_per_token: 5\n  concurrent_per_token: 2\n",
                          "m.yaml");
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  auto gateway = to_serve_args(*m, *find_process(*m, "gateway"));
  ASSERT_TRUE(gateway.is_ok()) << gateway.status().to_string();
  const Lines tail(gateway->end() - 14, gateway->end());
  EXPECT_EQ(tail, (Lines{"--max-output-tokens", "1024", "--max-requests-per-second-per-token", "5",
                         "--max-concurrent-per-token", "2", "--token-file", "/etc/dserve/tokens",
                         "--tls-cert", "/etc/tls/c.pem", "--tls-key", "/etc/tls/k.pem", "--tls-ca",
                         "/etc/tls/ca.pem"}));
  for (const char* worker : {"prefill-0", "decode-0"}) {
    auto args = to_serve_args(*m, *find_process(*m, worker));
    ASSERT_TRUE(args.is_ok()) << args.status().to_string();
    for (const std::string& arg : *args) {
      EXPECT_EQ(arg.find("token"), arg.find("token-budget")) << worker << ": " << arg;
      EXPECT_EQ(arg.find("tls"), std::string::npos) << worker << ": " << arg;
    }
  }
}

// kBase with mode colocated and `pool` (YAML under pools:) for its prefill and decode pools.
std::string colocated_manifest(const std::string& pool) {
  return replace(replace(kBase, R"(  prefill:
    replicas: 1
    placement: node-a
  decode:
    replicas: 1
    placement: node-a
)",
                         pool),
                 "mode: disaggregated", "mode: colocated");
}

TEST(ManifestServeArgs, ColocatedGivesBothHalvesAndTheGatewayNamesBoth) {
  const std::string text = colocated_manifest(R"(  colocated:
    replicas: 2
    placement: node-a
    devices_per_replica: 1
    ports: [7100, 7200]
)");
  auto m = parse_manifest(text, "m.yaml");
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  auto c1 = to_serve_args(*m, *find_process(*m, "colocated-1"));
  ASSERT_TRUE(c1.is_ok());
  EXPECT_EQ(
      Lines(c1->begin(), c1->begin() + 15),
      (Lines{"serve", "--role", "colocated", "--model", "/models/m", "--listen", "10.0.0.1:7200",
             "--process-name", "colocated-1", "--metrics-listen", "10.0.0.1:8200",
             "--decode-listen", "10.0.0.1:7201", "--max-step-tokens", "512"}));
  auto gw = to_serve_args(*m, *find_process(*m, "gateway"));
  ASSERT_TRUE(gw.is_ok());
  EXPECT_EQ(Lines(gw->begin() + 13, gw->begin() + 17),
            (Lines{"--prefill", "10.0.0.1:7100,10.0.0.1:7200", "--decode",
                   "10.0.0.1:7101,10.0.0.1:7201"}));
}

// Speculative decoding is a decode pool's setting: it reaches the decode processes only, and a
// manifest without it gives the arguments it always gave.
TEST(ManifestServeArgs, SpeculationGoesToTheDecodeProcesses) {
  const std::string text = replace(kBase, "  decode:\n    replicas: 1\n",
                                   "  decode:\n    replicas: 1\n    speculative_tokens: 3\n"
                                   "    speculation: fixed\n");
  auto m = parse_manifest(text, "m.yaml");
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  auto decode = to_serve_args(*m, *find_process(*m, "decode-0"));
  auto prefill = to_serve_args(*m, *find_process(*m, "prefill-0"));
  ASSERT_TRUE(decode.is_ok() && prefill.is_ok());
  const Lines wanted{"--speculative-tokens", "3", "--speculation", "fixed"};
  EXPECT_NE(std::search(decode->begin(), decode->end(), wanted.begin(), wanted.end()),
            decode->end());
  EXPECT_EQ(std::find(prefill->begin(), prefill->end(), "--speculative-tokens"), prefill->end());
  auto plain = parse_manifest(kBase, "m.yaml");
  ASSERT_TRUE(plain.is_ok());
  auto plain_decode = to_serve_args(*plain, *find_process(*plain, "decode-0"));
  ASSERT_TRUE(plain_decode.is_ok());
  EXPECT_EQ(std::find(plain_decode->begin(), plain_decode->end(), "--speculative-tokens"),
            plain_decode->end());
  EXPECT_EQ(problems(replace(kBase, "  decode:\n    replicas: 1\n",
                             "  decode:\n    replicas: 1\n    speculative_tokens: 9\n")),
            (Lines{"m.yaml:20:25: pools.decode.speculative_tokens: found 9; expected an integer "
                   "in 0..8"}));
  EXPECT_FALSE(problems(replace(kBase, "  prefill:\n    replicas: 1\n",
                                "  prefill:\n    replicas: 1\n    speculative_tokens: 2\n"))
                   .empty())
      << "a prefill pool has no speculation";
}

// A co-located step must leave prefill a row next to a full decode batch.
TEST(ManifestMistakes, ColocatedStepNoLargerThanTheDecodeBatch) {
  const std::string text = colocated_manifest(R"(  colocated:
    replicas: 1
    placement: node-a
    max_batch: 64
    max_step_tokens: 64
)");
  EXPECT_EQ(problems(text),
            (Lines{"m.yaml:19:22: pools.colocated.max_step_tokens: found 64; expected more than "
                   "max_batch (64), or a full decode batch leaves no row of a step for prefill"}));
}

// --- Each kind of mistake -----------------------------------------------------------------

TEST(ManifestMistakes, EmptyFile) {
  EXPECT_EQ(problems(""), (Lines{"m.yaml: found an empty file; expected a manifest mapping "
                                 "(version, mode, model, nodes, gateway, pools, ...)"}));
  EXPECT_EQ(problems("# only a comment\n").size(), 1u);
}

TEST(ManifestMistakes, YamlSyntaxErrorWithLine) {
  const auto p = problems(replace(kBase, "    replicas: 1\n    placement: node-a\n  decode:",
                                  "    replicas: [1\n    placement: node-a\n  decode:"));
  ASSERT_EQ(p.size(), 1u);
  EXPECT_EQ(p[0].rfind("m.yaml:17:", 0), 0u) << p[0];
  EXPECT_NE(p[0].find("found a YAML syntax error: "), std::string::npos) << p[0];
  EXPECT_NE(p[0].find("; expected well-formed YAML"), std::string::npos) << p[0];
}

TEST(ManifestMistakes, UnknownKeyDidYouMean) {
  std::string text = kBase;
  text.replace(text.rfind("    replicas: 1"), 15, "    replicass: 1");
  EXPECT_EQ(problems(text),
            (Lines{"m.yaml:19:5: pools.decode.replicass: found unknown key 'replicass'; expected "
                   "one of replicas, placement, ports, devices_per_replica, device, "
                   "max_batch, kv_budget_mib, speculative_tokens, speculation (did you mean "
                   "'replicas'?)",
                   "m.yaml:19:5: pools.decode.replicas: found nothing (the field is missing); "
                   "expected an integer in 1..4096"}));
}

TEST(ManifestMistakes, UnknownTopLevelKey) {
  EXPECT_EQ(problems(std::string(kBase) + "experts:\n  replicas: 2\n"),
            (Lines{"m.yaml:21:1: experts: found unknown key 'experts'; expected one of version, "
                   "mode, model, nodes, gateway, pools, network, kv_store, security, limits, "
                   "timeouts, launcher, slurm, supervision"}));
}

TEST(ManifestMistakes, KeyOfAnotherPool) {
  EXPECT_EQ(problems(replace(kBase, "    placement: node-a\n  decode:",
                             "    placement: node-a\n    max_batch: 8\n  decode:")),
            (Lines{"m.yaml:18:5: pools.prefill.max_batch: found unknown key 'max_batch'; "
                   "expected one of replicas, placement, ports, devices_per_replica, device, "
                   "token_budget, step_ms"}));
}

// A pool on the GPU: each replica is told the first of its devices; a device name the schema
// does not know, and cuda without a device, are refused with the line.
TEST(Manifest, APoolOnTheGpuComputesOnItsFirstDevice) {
  auto m = parse_manifest(replace(kBase, "  decode:\n    replicas: 1\n",
                                  "  decode:\n    replicas: 1\n    device: cuda\n"),
                          "m.yaml");
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  auto decode = to_serve_args(*m, *find_process(*m, "decode-0"));
  ASSERT_TRUE(decode.is_ok());
  const auto at = std::find(decode->begin(), decode->end(), "--device");
  ASSERT_NE(at, decode->end());
  EXPECT_EQ(*(at + 1), "cuda:1");  // the prefill replica took device 0
  auto prefill = to_serve_args(*m, *find_process(*m, "prefill-0"));
  ASSERT_TRUE(prefill.is_ok());
  EXPECT_EQ(std::find(prefill->begin(), prefill->end(), "--device"), prefill->end());

  EXPECT_EQ(problems(replace(kBase, "    placement: node-a\n  decode:",
                             "    placement: node-a\n    device: gpu\n  decode:")),
            (Lines{"m.yaml:18:13: pools.prefill.device: found 'gpu'; expected one of cpu, cuda "
                   "(did you mean 'cpu'?)"}));
  EXPECT_EQ(
      problems(replace(kBase, "    placement: node-a\n  decode:",
                       "    placement: node-a\n    device: cuda\n    devices_per_replica: 0\n"
                       "  decode:")),
      (Lines{"m.yaml:18:13: pools.prefill.device: found cuda with devices_per_replica 0; expected "
             "devices_per_replica of at least 1 (the GPU a replica computes on)"}));
}

TEST(ManifestMistakes, MissingRequiredField) {
  EXPECT_EQ(problems(replace(kBase, "  path: /models/m\n", "")),
            (Lines{"m.yaml:4:3: model.path: found nothing (the field is missing); expected a "
                   "string"}));
  EXPECT_EQ(problems(replace(kBase, "version: 1\n", "")),
            (Lines{"m.yaml:1:1: version: found nothing (the field is missing); expected an "
                   "integer in 1..1 (the manifest schema version)"}));
}

TEST(ManifestMistakes, StringWhereNumberExpected) {
  std::string text = kBase;
  text.replace(text.rfind("replicas: 1"), 11, "replicas: two");
  EXPECT_EQ(problems(text), (Lines{"m.yaml:19:15: pools.decode.replicas: found 'two' (not an "
                                   "integer); expected an integer in 1..4096"}));
}

TEST(ManifestMistakes, ListWhereMappingExpected) {
  EXPECT_EQ(problems(replace(kBase, "gateway:\n  node: node-a\n", "gateway: [node-a]\n")),
            (Lines{"m.yaml:12:10: gateway: found a list; expected a mapping"}));
}

TEST(ManifestMistakes, ZeroAndNegativeReplicas) {
  EXPECT_EQ(problems(replace(kBase, "replicas: 1", "replicas: 0")),
            (Lines{"m.yaml:16:15: pools.prefill.replicas: found 0; expected an integer in "
                   "1..4096"}));
  EXPECT_EQ(problems(replace(kBase, "replicas: 1", "replicas: -2")),
            (Lines{"m.yaml:16:15: pools.prefill.replicas: found -2; expected an integer in "
                   "1..4096"}));
}

TEST(ManifestMistakes, PortOutOfRange) {
  EXPECT_EQ(problems(replace(kBase, "  node: node-a\npools:",
                             "  node: node-a\n  grpc_port: "
                             "70000\npools:")),
            (Lines{"m.yaml:14:14: gateway.grpc_port: found 70000; expected an integer in "
                   "1..65535"}));
  EXPECT_EQ(problems(replace(kBase, "    placement: node-a\n  decode:",
                             "    placement: node-a\n    ports: [0]\n  decode:")),
            (Lines{"m.yaml:18:13: pools.prefill.ports[0]: found '0'; expected a port in "
                   "1..65535"}));
}

TEST(ManifestMistakes, TwoProcessesOnOneNodeWithOnePort) {
  std::string text = replace(kBase, "    placement: node-a\n  decode:",
                             "    placement: node-a\n    ports: [7100]\n  decode:");
  text += "    ports: [7100]\n";
  EXPECT_EQ(problems(text),
            (Lines{"m.yaml:22:13: pools.decode.ports[0]: found port 7100 on node 'node-a', "
                   "already used by prefill-0 (pools.prefill.ports[0], line 18); expected a port "
                   "no other process on node 'node-a' uses"}));
}

TEST(ManifestMistakes, AutomaticPortsSkipExplicitOnes) {
  // base_port 7000: the gateway's explicit 7001 is skipped by the automatic assignment.
  auto m = parse_manifest(
      replace(kBase, "  node: node-a\npools:", "  node: node-a\n  port: 7001\npools:"), "m.yaml");
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  EXPECT_EQ(m->processes[0].port, 7001);
  EXPECT_EQ(m->processes[0].second_port, 7000);
  EXPECT_EQ(m->processes[1].port, 7002);
}

TEST(ManifestMistakes, MetricsPortTakenByAnotherProcess) {
  // Offset 1: the gateway's /metrics would land on its own gRPC port, prefill-0's on decode-0's.
  EXPECT_EQ(problems(std::string(kBase) + "network:\n  metrics_port_offset: 1\n"),
            (Lines{"m.yaml:22:24: network.metrics_port_offset (gateway): found port 7001 on node "
                   "'node-a', already used by gateway (gateway.grpc_port, line 13); expected a "
                   "port no other process on node 'node-a' uses",
                   "m.yaml:22:24: network.metrics_port_offset (prefill-0): found port 7003 on "
                   "node 'node-a', already used by decode-0 (pools.decode.ports, line 20); "
                   "expected a port no other process on node 'node-a' uses"}));
}

TEST(ManifestMistakes, HttpPortTakenByAnotherProcess) {
  // An automatic port skips the HTTP port; an explicit one that equals it is a problem.
  std::string text =
      replace(kBase, "  node: node-a\npools:", "  node: node-a\n  http_port: 7100\npools:");
  text = replace(text, "    placement: node-a\n  decode:",
                 "    placement: node-a\n    ports: [7100]\n  decode:");
  EXPECT_EQ(problems(text),
            (Lines{"m.yaml:19:13: pools.prefill.ports[0]: found port 7100 on node 'node-a', "
                   "already used by gateway (gateway.http_port, line 14); expected a port no "
                   "other process on node 'node-a' uses"}));
}

TEST(ManifestMistakes, SshDestinationAndProgram) {
  EXPECT_EQ(problems(replace(kBase, "    base_port: 7000\n",
                             "    base_port: 7000\n    ssh: -oProxyCommand=x\n"
                             "    program: bin/dserve\n")),
            (Lines{"m.yaml:12:10: nodes[0].ssh: found '-oProxyCommand=x'; expected an ssh "
                   "destination: [user@]host or ssh://[user@]host[:port]",
                   "m.yaml:13:14: nodes[0].program: found 'bin/dserve'; expected the absolute "
                   "path of the dserve program on the node"}));
  auto m = parse_manifest(replace(kBase, "    base_port: 7000\n",
                                  "    base_port: 7000\n    ssh: ssh://ops@node-a:2222\n    "
                                  "program: /opt/dserve/bin/dserve\n"),
                          "m.yaml");
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  for (const auto& p : m->processes) {
    EXPECT_EQ(p.ssh, "ssh://ops@node-a:2222") << p.name;
    EXPECT_EQ(p.program, "/opt/dserve/bin/dserve") << p.name;
  }
}

TEST(ManifestMistakes, PortMissingWithoutBasePort) {
  EXPECT_EQ(problems(replace(kBase, "    base_port: 7000\n", "")),
            (Lines{"m.yaml:12:3: gateway.port: found nothing, and node 'node-a' has no base_port; "
                   "expected explicit ports, or nodes[0].base_port to assign them from",
                   "m.yaml:12:3: gateway.grpc_port: found nothing, and node 'node-a' has no "
                   "base_port; expected explicit ports, or nodes[0].base_port to assign them "
                   "from",
                   "m.yaml:16:16: pools.prefill.ports: found nothing, and node 'node-a' has no "
                   "base_port; expected explicit ports, or nodes[0].base_port to assign them "
                   "from",
                   "m.yaml:19:16: pools.decode.ports: found nothing, and node 'node-a' has no "
                   "base_port; expected explicit ports, or nodes[0].base_port to assign them "
                   "from"}));
}

TEST(ManifestMistakes, PlacementOnUnknownNode) {
  std::string text = kBase;
  text.replace(text.rfind("placement: node-a"), 17, "placement: [node-b]");
  EXPECT_EQ(problems(text), (Lines{"m.yaml:20:17: pools.decode.placement[0]: found 'node-b'; "
                                   "expected a node named in nodes (node-a) (did you mean "
                                   "'node-a'?)"}));
}

TEST(ManifestMistakes, PlacementCountDiffersFromReplicas) {
  std::string text = kBase;
  text.replace(text.rfind("placement: node-a"), 17, "placement: [node-a, node-a]");
  EXPECT_EQ(problems(text),
            (Lines{"m.yaml:20:16: pools.decode.placement: found 2 node names; expected 1 (one "
                   "per replica, as pools.decode.replicas says), or a single node name for all "
                   "replicas"}));
}

TEST(ManifestMistakes, DuplicateNodeNamesAndAddresses) {
  EXPECT_EQ(
      problems(replace(kBase, "gateway:\n", "  - name: node-a\n    address: 10.0.0.1\ngateway:\n")),
      (Lines{"m.yaml:12:5: nodes[1].name: found 'node-a' again (nodes[0], line 7); "
             "expected a node name used once",
             "m.yaml:12:5: nodes[1].address: found '10.0.0.1' again (nodes[0], line 7); "
             "expected one node per address (list a machine once and place several "
             "replicas on it)"}));
}

TEST(ManifestMistakes, InvalidAddress) {
  EXPECT_EQ(problems(replace(kBase, "address: 10.0.0.1", "address: 10.0.0.300")),
            (Lines{"m.yaml:8:14: nodes[0].address: found '10.0.0.300'; expected an IPv4 address "
                   "(a.b.c.d, each 0..255) or a host name"}));
  EXPECT_EQ(problems(replace(kBase, "address: 10.0.0.1", "address: bad_host!")).size(), 1u);
  EXPECT_EQ(problems(replace(kBase, "address: 10.0.0.1", "address: 10.0.1")).size(), 1u);
}

TEST(ManifestMistakes, DisaggregatedWithoutADecodePool) {
  EXPECT_EQ(problems(replace(kBase, "  decode:\n    replicas: 1\n    placement: node-a\n", "")),
            (Lines{"m.yaml:15:3: pools.decode: found nothing (the field is missing); expected a "
                   "decode pool: mode 'disaggregated' runs prefill and decode in separate "
                   "pools"}));
}

TEST(ManifestMistakes, ColocatedWithSeparatePools) {
  EXPECT_EQ(problems(replace(kBase, "mode: disaggregated", "mode: colocated")),
            (Lines{"m.yaml:15:3: pools.colocated: found nothing (the field is missing); expected "
                   "a colocated pool: mode 'colocated' runs prefill and decode in one process "
                   "per replica",
                   "m.yaml:16:5: pools.prefill: found a separate prefill pool; expected only "
                   "pools.colocated under mode 'colocated' (set mode: disaggregated to run "
                   "separate prefill and decode pools)",
                   "m.yaml:19:5: pools.decode: found a separate decode pool; expected only "
                   "pools.colocated under mode 'colocated' (set mode: disaggregated to run "
                   "separate prefill and decode pools)"}));
}

TEST(ManifestMistakes, DisaggregatedWithAColocatedPool) {
  EXPECT_EQ(problems(std::string(kBase) + "  colocated:\n    replicas: 1\n    placement: node-a\n"),
            (Lines{"m.yaml:22:5: pools.colocated: found a colocated pool; expected no colocated "
                   "pool under mode 'disaggregated' (set mode: colocated to run prefill and "
                   "decode in one process)"}));
}

TEST(ManifestMistakes, UnknownMode) {
  EXPECT_EQ(problems(replace(kBase, "mode: disaggregated", "mode: disagregated")),
            (Lines{"m.yaml:2:7: mode: found 'disagregated'; expected one of disaggregated, "
                   "colocated (did you mean 'disaggregated'?)"}));
}

TEST(ManifestMistakes, ReplicasWouldShareADevice) {
  EXPECT_EQ(problems(replace(kBase, "devices: 2", "devices: 1")),
            (Lines{"m.yaml:20:16: pools.decode.placement[0]: found replica 0 needing 1 more "
                   "devices on node 'node-a' with 1 devices, 1 already taken; expected at most 1 "
                   "devices in use on node 'node-a' across all pools: replicas sharing a device "
                   "would run co-located, which mode 'disaggregated' forbids"}));
}

TEST(ManifestMistakes, UnknownUcxTransport) {
  EXPECT_EQ(problems(std::string(kBase) + "network:\n  ucx_transports: [tcp, rc_mlx, sm]\n"),
            (Lines{"m.yaml:22:25: network.ucx_transports[1]: found 'rc_mlx'; expected a UCX "
                   "transport (tcp, sm, posix, sysv, cma, rc, ud, dc, cuda_copy, cuda_ipc, "
                   "gdr_copy, ...) (did you mean 'rc_mlx5'?)"}));
}

TEST(ManifestMistakes, KvTierSizesAndPaths) {
  EXPECT_EQ(problems(std::string(kBase) +
                     "kv_store:\n  host_mib: 0\n  disk:\n    path: var/kv\n    size_mib: -1\n"),
            (Lines{"m.yaml:22:13: kv_store.host_mib: found 0; expected an integer >= 1",
                   "m.yaml:24:11: kv_store.disk.path: found 'var/kv'; expected an absolute path "
                   "(starting with '/')",
                   "m.yaml:25:15: kv_store.disk.size_mib: found -1; expected an integer >= 1"}));
}

TEST(ManifestMistakes, KvHostTierLargerThanNodeMemory) {
  EXPECT_EQ(problems(std::string(kBase) + "kv_store:\n  host_mib: 70000\n"),
            (Lines{"m.yaml:22:13: kv_store.host_mib: found 70000 MiB x 1 prefix-caching replicas "
                   "on node 'node-a' = 70000 MiB; expected at most node 'node-a''s memory_gib (64 "
                   "GiB = 65536 MiB)"}));
}

TEST(ManifestMistakes, UnknownCodec) {
  EXPECT_EQ(problems(std::string(kBase) + "kv_store:\n  host_codec: fp16\n"),
            (Lines{"m.yaml:22:15: kv_store.host_codec: found 'fp16'; expected one of lossless, "
                   "fp8 (did you mean 'fp8'?)"}));
}

TEST(ManifestMistakes, TlsCertWithoutKeyAndRelativeTokenFile) {
  EXPECT_EQ(problems(std::string(kBase) +
                     "security:\n  token_file: tokens.txt\n  tls_cert: /etc/tls/c.pem\n"),
            (Lines{"m.yaml:22:15: security.token_file: found 'tokens.txt'; expected an absolute "
                   "path (starting with '/')",
                   "m.yaml:23:13: security.tls_key: found nothing (the field is missing); "
                   "expected the private key of security.tls_cert"}));
}

TEST(ManifestMistakes, ControlTlsNeedsAllThreeFiles) {
  EXPECT_EQ(problems(std::string(kBase) + "security:\n  control_tls:\n    cert: /etc/c.pem\n"
                                          "    ca: ca.pem\n"),
            (Lines{"m.yaml:23:5: security.control_tls.key: found nothing (the field is missing); "
                   "expected a string",
                   "m.yaml:24:9: security.control_tls.ca: found 'ca.pem'; expected an absolute "
                   "path (starting with '/')"}));
}

TEST(ManifestMistakes, LimitsInconsistent) {
  EXPECT_EQ(problems(std::string(kBase) + "limits:\n  max_queued: -1\n  max_prompt_tokens: 8192\n"),
            (Lines{"m.yaml:22:15: limits.max_queued: found -1; expected an integer >= 0",
                   "m.yaml:23:22: limits.max_prompt_tokens: found 8192; expected an integer in "
                   "1..4096 (model.context_tokens is 4096)"}));
}

TEST(ManifestMistakes, ClientLimitsOutOfRange) {
  EXPECT_EQ(problems(std::string(kBase) +
                     "limits:\n  max_output_tokens: 0\n  requests_per_second_per_token: -1\n"
                     "  concurrent_per_token: many\n"),
            (Lines{"m.yaml:22:22: limits.max_output_tokens: found 0; expected an integer in "
                   "1..4096 (model.context_tokens is 4096)",
                   "m.yaml:23:34: limits.requests_per_second_per_token: found -1; expected an "
                   "integer >= 0 (0: unlimited)",
                   "m.yaml:24:25: limits.concurrent_per_token: found 'many' (not an integer); "
                   "expected an integer in 0..4294967295 (0: unlimited)"}));
  EXPECT_EQ(problems(std::string(kBase) + "limits:\n  max_output_tokens: 8192\n"),
            (Lines{"m.yaml:22:22: limits.max_output_tokens: found 8192; expected an integer in "
                   "1..4096 (model.context_tokens is 4096)"}));
}

TEST(ManifestMistakes, DefaultMaxTokensAboveMaxOutputTokens) {
  EXPECT_EQ(problems(std::string(kBase) +
                     "limits:\n  default_max_tokens: 512\n  max_output_tokens: 256\n"),
            (Lines{"m.yaml:22:23: limits.default_max_tokens: found 512; expected at most "
                   "limits.max_output_tokens (256)"}));
  EXPECT_EQ(problems(std::string(kBase) + "limits:\n  max_output_tokens: 100\n"),
            (Lines{"m.yaml:22:22: limits.max_output_tokens: found 100; expected at least "
                   "limits.default_max_tokens (256)"}));
}

TEST(ManifestMistakes, RegionGraceNotLongerThanTransferTimeout) {
  EXPECT_EQ(
      problems(std::string(kBase) + "timeouts:\n  transfer_ms: 20000\n  region_grace_ms: 15000\n"),
      (Lines{"m.yaml:23:20: timeouts.region_grace_ms: found 15000; expected more than "
             "timeouts.transfer_ms (20000): a put still in flight could land in another "
             "request's region"}));
}

TEST(ManifestMistakes, DuplicateKey) {
  EXPECT_EQ(problems(replace(kBase, "  context_tokens: 4096\n",
                             "  context_tokens: 4096\n  path: /models/n\n")),
            (Lines{"m.yaml:6:3: model.path: found the key 'path' a second time; expected each "
                   "key once per mapping"}));
}

// --- Every problem at once, and the Status the callers see ----------------------------------

TEST(ManifestReport, EveryProblemAtOnceInOneStatus) {
  std::string text = replace(kBase, "address: 10.0.0.1", "address: 300.1.1.1");
  text = replace(text, "replicas: 1", "replicas: zero");
  text += "network:\n  ucx_transports: [tpc]\n";
  auto m = parse_manifest(text, "bad.yaml");
  ASSERT_FALSE(m.is_ok());
  EXPECT_EQ(m.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(m.status().message(),
            "bad.yaml: 3 problems:\n"
            "bad.yaml:8:14: nodes[0].address: found '300.1.1.1'; expected an IPv4 address "
            "(a.b.c.d, each 0..255) or a host name\n"
            "bad.yaml:16:15: pools.prefill.replicas: found 'zero' (not an integer); expected an "
            "integer in 1..4096\n"
            "bad.yaml:22:20: network.ucx_transports[0]: found 'tpc'; expected a UCX transport "
            "(tcp, sm, posix, sysv, cma, rc, ud, dc, cuda_copy, cuda_ipc, gdr_copy, ...) (did "
            "you mean 'tcp'?)");
  const auto check = check_manifest(text, "bad.yaml");
  ASSERT_EQ(check.problems.size(), 3u);
  EXPECT_EQ(check.problems[1].field, "pools.prefill.replicas");
  EXPECT_EQ(check.problems[1].at.line, 16);
  EXPECT_EQ(check.problems[1].found, "'zero' (not an integer)");
  EXPECT_FALSE(check.manifest.has_value());
}

TEST(ManifestReport, MissingFileIsNotFound) {
  auto m = load_manifest("/nonexistent/cluster.yaml");
  ASSERT_FALSE(m.is_ok());
  EXPECT_EQ(m.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(m.status().message(),
            "cannot read manifest '/nonexistent/cluster.yaml': No such file or directory");
}

// model.sha256 pins the checkpoint: every process gets --model-sha256; anything but 64 lowercase
// hex digits is refused.
TEST(ManifestServeArgs, ModelSha256GoesToEveryProcess) {
  const std::string digest(64, 'a');
  auto m = parse_manifest(replace(kBase, "  context_tokens: 4096\n",
                                  "  context_tokens: 4096\n  sha256: " + digest + "\n"),
                          "m.yaml");
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  for (const Process& p : m->processes) {
    auto args = to_serve_args(*m, p);
    ASSERT_TRUE(args.is_ok());
    const auto at = std::find(args->begin(), args->end(), "--model-sha256");
    ASSERT_NE(at, args->end()) << p.name;
    EXPECT_EQ(*(at + 1), digest);
  }
  EXPECT_EQ(problems(replace(kBase, "  context_tokens: 4096\n",
                             "  context_tokens: 4096\n  sha256: ABC\n")),
            Lines{"m.yaml:6:11: model.sha256: found 'ABC'; expected 64 lowercase hex digits (the "
                  "SHA-256 `dserve model init` prints for checksums.sha256)"});
}

// A second document used to be ignored silently: the cluster ran half of what was written.
TEST(ManifestMistakes, SecondYamlDocument) {
  EXPECT_EQ(problems(std::string(kBase) + "---\nversion: 2\n"),
            Lines{"m.yaml:22:1: found 2 YAML documents (separated by ---); expected one manifest "
                  "document per file"});
  // A leading --- is one document, as YAML has it.
  EXPECT_TRUE(problems(std::string("---\n") + kBase).empty());
}

// Size and type are checked before a byte is read: a huge file, a directory or a device is
// refused at once (/dev/zero used to be read until memory ran out).
TEST(ManifestReport, OnlyRegularFilesOfBoundedSize) {
  const std::string dir = ::testing::TempDir() + "dserve-manifest-size";
  std::filesystem::create_directories(dir);
  const std::string big = dir + "/big.yaml";
  {
    std::ofstream out(big);
    out << kBase << "# " << std::string(kMaxManifestBytes, 'x') << "\n";
  }
  auto m = load_manifest(big);
  ASSERT_FALSE(m.is_ok());
  EXPECT_EQ(m.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(m.status().message(), "manifest '" + big + "' is larger than 1048576 bytes, the limit");
  for (const auto& [path, kind] :
       {std::pair<std::string, std::string>{"/dev/zero", "a character device"},
        {dir, "a directory"}}) {
    m = load_manifest(path);
    ASSERT_FALSE(m.is_ok()) << path;
    EXPECT_EQ(m.status().code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(m.status().message(),
              "manifest '" + path + "' is " + kind + "; expected a regular file");
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace dserve::cluster
