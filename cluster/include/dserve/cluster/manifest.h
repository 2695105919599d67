#pragma once
// The cluster manifest: one YAML file that says which processes of a cluster run where (nodes,
// the gateway, the prefill and decode pools, or one co-located pool), with which model, KV
// store, network, security files, limits and timeouts. Parsed once, at the edge, into the typed
// Manifest below; nothing downstream reads YAML. The schema is described in cluster/README.md
// and shown, commented field by field, in cluster/examples/.
//
// Validation reports every problem it finds at once, each with file, line, column, the dotted
// field path, what was found and what was expected. Unknown keys are errors (with a "did you
// mean" for near misses), and so is anything that would silently change the serving mode, e.g.
// prefill and decode replicas that would share a device under `mode: disaggregated`.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "dserve/core/status.h"

namespace dserve::cluster {

// Where a value sits in the manifest file; 1-based, 0 when not known (e.g. a missing field).
struct Location {
  int line = 0;
  int column = 0;
};

enum class ServingMode {
  kDisaggregated,  // separate prefill and decode processes
  kColocated,      // one process per replica runs a prefill and a decode worker in turns
};
std::string_view serving_mode_name(ServingMode mode);  // "disaggregated", "colocated"

// The `dserve serve --role` of a process; kNodeAgent: the `dserve agent` of a node, which runs
// the others (never in a manifest's processes).
enum class ProcessRole { kGateway, kPrefill, kDecode, kColocated, kNodeAgent };
std::string_view process_role_name(ProcessRole role);  // "gateway", "prefill", ...

struct Node {
  std::string name;                   // unique; [a-z0-9-], what placements refer to
  std::string address;                // IPv4 address or host name the node's processes bind
  int64_t devices = 0;                // accelerators on the node (0: CPU only)
  std::optional<int64_t> memory_gib;  // host memory, bounds the KV host tier when given
  std::optional<int64_t> base_port;   // ports of processes without explicit ones start here
  // Launch over ssh: the destination ([user@]host or ssh://[user@]host[:port]); `dserve up`
  // starts the node's processes through it. Not set: on the machine that runs `dserve up`.
  std::optional<std::string> ssh;
  // The dserve program on the node (absolute); default: the path of the one running `up`.
  std::optional<std::string> program;
  // Who starts the node's agent: `dserve up` (detached, here or over ssh), or the node's own
  // service manager (`systemd`: the dserve-agent@ unit, cluster/systemd/), which outlives
  // `up`, `down` and reboots; up and down then only change the plan it follows.
  bool agent_by_systemd = false;
  Location at;
};

struct ModelSpec {
  std::string path;                       // absolute model directory (config.json, weights...)
  std::optional<int64_t> context_tokens;  // the model's context, bounds the prompt limits
  // SHA-256 of the directory's checksums.sha256: every process checks the checkpoint against
  // it before loading (serve --model-sha256). Empty: not checked.
  std::string sha256;
  // How every worker keeps KV pages (serve --kv-dtype): "fp32" or "fp8" (kvstore/row_format.h).
  // One value per cluster: a hand-off or a prefix block is refused between workers that differ.
  std::string kv_dtype = "fp32";
};

struct GatewaySpec {
  std::string node;
  std::optional<int64_t> port;       // control (token sink) port; else from the node's base_port
  std::optional<int64_t> grpc_port;  // client gRPC port; else from the node's base_port
  std::optional<int64_t> http_port;  // the OpenAI-compatible HTTP API; off when not given
  Location at, port_at, grpc_port_at, http_port_at;
};

// The most workers one pool may have, in a manifest or after `dserve scale`.
inline constexpr int64_t kMaxPoolReplicas = 4096;
// The most draft tokens a pool may set (serve's --speculative-tokens; model::kMaxDraftTokens).
inline constexpr int64_t kMaxSpeculativeTokens = 8;

// A pool of identical worker processes: `replicas` of them, replica i on node placement[i].
struct Pool {
  ProcessRole role = ProcessRole::kPrefill;  // kPrefill, kDecode or kColocated
  int64_t replicas = 0;
  std::vector<std::string> placement;  // one node name per replica
  std::vector<int64_t> ports;          // empty, or one control port per replica
  int64_t devices_per_replica = 1;
  // Where a replica computes: "cpu", or "cuda" (on the first of its devices: serve --device
  // cuda:N, N that device's index on its node).
  std::string device = "cpu";
  int64_t token_budget = 2048;    // prefill, colocated: prompt tokens per step
  int64_t step_ms = 250;          // prefill, colocated: a step ends after the slice passing it
  int64_t max_batch = 64;         // decode, colocated: reservations + decoding requests
  int64_t max_step_tokens = 512;  // colocated: rows of one engine step (decode + prefill)
  int64_t kv_budget_mib = 1024;   // decode, colocated: KV bytes of the decode batch
  // decode, colocated: speculative decoding with the checkpoint's MTP block: draft tokens per
  // request per step at most (0: off), and "adaptive" (k chosen per step) or "fixed".
  int64_t speculative_tokens = 0;
  std::string speculation = "adaptive";
  // launcher slurm: the generic resources each of the pool's nodes needs (sbatch --gres, e.g.
  // "gpu:1"); empty: none. Its component of the job has one node per replica.
  std::string gres;
  Location at, gres_at;
  std::vector<Location> placement_at;  // where each placement entry is
  std::vector<Location> ports_at;      // where each explicit port is
};

struct NetworkSpec {
  std::vector<std::string> ucx_transports = {"tcp"};  // UCX_TLS for KV transfer
  std::vector<std::string> ucx_net_devices = {"lo"};  // UCX_NET_DEVICES
  // Every process serves Prometheus /metrics on its control port + this offset (on its node's
  // address); 0: no /metrics.
  int64_t metrics_port_offset = 1000;
  Location metrics_port_offset_at;
};

struct KvDiskTier {
  std::string path;          // absolute RocksDB directory
  int64_t size_mib = 16384;  // value bytes kept
  std::string codec = "lossless";
  int64_t write_queue_mib = 256;
};

// The prefix store of each prefill (or co-located) process: device, host and disk tiers.
struct KvStoreSpec {
  int64_t device_mib = 1024;
  int64_t host_mib = 4096;
  std::string host_codec = "lossless";  // "lossless" or "fp8" (kvstore/codec.h)
  std::optional<KvDiskTier> disk;
};

// Mutual TLS between the cluster's processes (every role's --control-tls-cert/-key/-ca).
struct ControlTlsSpec {
  std::string cert;  // absolute paths, the same on every node
  std::string key;
  std::string ca;
};

struct SecuritySpec {
  std::optional<std::string> token_file;  // absolute; clients must present a token from it
  std::optional<std::string> tls_cert;    // absolute; given together with tls_key
  std::optional<std::string> tls_key;
  std::optional<std::string> tls_ca;  // absolute; peers' certificates are checked against it
  std::optional<ControlTlsSpec> control_tls;  // every process; none: plain TCP
};

// Gateway admission limits (the `dserve serve --role gateway` flags of the same names).
struct Limits {
  int64_t max_running = 256;
  int64_t max_queued = 1024;
  int64_t max_attempts = 4;
  int64_t max_prefill_losses = 2;
  int64_t max_prefill_queue_tokens = 8192;
  int64_t default_max_tokens = 256;
  int64_t max_prompt_tokens = 1 << 20;
  int64_t max_output_tokens = 32768;          // a request asking for more max_tokens is refused
  int64_t requests_per_second_per_token = 0;  // per client token; 0: unlimited
  int64_t concurrent_per_token = 0;           // requests running per client token; 0: unlimited
};

struct Timeouts {
  int64_t ready_ms = 60000;         // gateway: wait for healthy workers at start
  int64_t request_ms = 300000;      // gateway: deadline of a request that sets none
  int64_t probe_interval_ms = 250;  // gateway: worker health probes
  int64_t transfer_ms = 10000;      // prefill, decode: one KV transfer (cluster-wide)
  int64_t reservation_ms = 30000;   // decode: reservation without hand-off
  int64_t region_grace_ms = 30000;  // decode: > transfer_ms
};

// How `dserve up` gets the processes onto machines. kNodes: the nodes the manifest lists, here
// or over ssh, each under a node agent that `up` starts; kSlurm: one Slurm job, whose node
// agents (one step per pool, one task per node) the scheduler starts on the nodes it allocates.
enum class Launcher { kNodes, kSlurm };
std::string_view launcher_name(Launcher launcher);  // "nodes", "slurm"

// The name of the single node a Slurm manifest's processes are resolved on before the job
// runs (ports, devices); `up` moves each process to its allocated node once the job starts.
inline constexpr std::string_view kSlurmPlanningNode = "slurm";

// launcher slurm: the job `dserve up` submits (sbatch options; each is checked by Slurm, and a
// refusal names the manifest line that set it).
struct SlurmSpec {
  std::string partition;      // empty: the cluster's default partition
  std::string account;        // empty: the user's default account
  std::string time_limit;     // sbatch --time; empty: the partition's limit
  std::string constraint;     // sbatch --constraint on every node of the job
  int64_t base_port = 20000;  // ports are assigned from here, unique across the job
  std::string program;        // the dserve program on the nodes; empty: the one running up
  Location at, partition_at, account_at, time_limit_at, constraint_at;
};

// What a node agent does when a worker dies, and what ends the cluster.
struct SupervisionSpec {
  int64_t max_restarts = 5;            // per worker within restart_window_ms; then it stays down
  int64_t restart_window_ms = 600000;  // restarts older than this no longer count
  int64_t backoff_ms = 500;            // the first restart's delay; doubled each time
  int64_t backoff_max_ms = 30000;
  int64_t stop_timeout_ms = 20000;  // SIGTERM to SIGKILL when the agent stops a worker
  // "restart": a lost worker is restarted (within the budget) and the cluster keeps serving;
  // "fail-job": when a pool has had no healthy worker for pool_lost_ms, the gateway exits and
  // its agent ends the cluster (the Slurm job is cancelled, releasing its nodes).
  std::string on_pool_lost = "restart";
  int64_t pool_lost_ms = 60000;
};

// One process the manifest names, with everything resolved: node, address, ports, devices.
struct Process {
  std::string name;  // "gateway", "prefill-0", "decode-1", "colocated-0"
  ProcessRole role = ProcessRole::kGateway;
  std::string node;
  std::string host;               // the node's address
  uint16_t port = 0;              // control port (--listen); the prefill half's when co-located
  uint16_t second_port = 0;       // gateway: gRPC port; co-located: the decode half's; else 0
  uint16_t metrics_port = 0;      // /metrics (control port + network.metrics_port_offset); 0: off
  uint16_t http_port = 0;         // gateway: the OpenAI-compatible API (gateway.http_port); 0: off
  std::vector<int64_t> devices;   // device indices on the node, devices_per_replica of them
  int64_t replica = 0;            // index in its pool (0 for the gateway)
  std::string ssh;                // the node's ssh destination; empty: started locally
  std::string program;            // the node's dserve program; empty: the launcher's own
  bool agent_by_systemd = false;  // the node's agent runs under systemd (Node::agent_by_systemd)
};

struct Manifest {
  std::string source;  // the file name problems were reported against
  ServingMode mode = ServingMode::kDisaggregated;
  ModelSpec model;
  std::vector<Node> nodes;
  GatewaySpec gateway;
  std::vector<Pool> pools;  // prefill then decode, or the one co-located pool
  NetworkSpec network;
  std::optional<KvStoreSpec> kv_store;
  std::optional<SecuritySpec> security;
  Limits limits;
  Timeouts timeouts;
  Launcher launcher = Launcher::kNodes;
  SlurmSpec slurm;  // launcher slurm only
  SupervisionSpec supervision;
  std::vector<Process> processes;  // launch order: gateway, then pools in order, by replica
};

// One thing wrong with a manifest.
struct ManifestProblem {
  std::string file;
  Location at;
  std::string field;     // dotted path, e.g. "pools.decode.replicas", "nodes[1].address"
  std::string found;     // what the file has, e.g. "0", "'tcpp'", "nothing"
  std::string expected;  // what would be valid
  // "file:line:column: field: found <found>; expected <expected>"
  std::string to_string() const;
};

// The outcome of validating a manifest: the Manifest when there is no problem.
struct ManifestCheck {
  std::optional<Manifest> manifest;
  std::vector<ManifestProblem> problems;  // in file order; empty iff manifest is set
};

// Validates `text` (a manifest's YAML) and reports every problem; `source_name` names the file
// in the problems. Never throws.
ManifestCheck check_manifest(std::string_view text, std::string_view source_name);

// The Manifest, or InvalidArgument whose message is "<source>: N problem(s):" followed by one
// ManifestProblem::to_string() per line.
Result<Manifest> parse_manifest(std::string_view text, std::string_view source_name);

// A manifest larger than this is refused before it is read (a real one is a few kB).
inline constexpr size_t kMaxManifestBytes = size_t{1} << 20;

// Reads and parses the file at `path`: NotFound when it cannot be opened, InvalidArgument when
// it is not a regular file or is larger than kMaxManifestBytes, or when it is not a valid
// manifest.
Result<Manifest> load_manifest(const std::string& path);

// The process called `name`, or nullptr. The pointer lives as long as `manifest`.
const Process* find_process(const Manifest& manifest, std::string_view name);

}  // namespace dserve::cluster
