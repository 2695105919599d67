// Checks across manifest sections, and the resolved process list: which node each process
// runs on, its ports and its devices.

#include <algorithm>
#include <map>

#include "manifest_internal.h"

namespace dserve::cluster::internal {
namespace {

std::string at_line(Location at) {
  return at.line > 0 ? "line " + std::to_string(at.line) : "the manifest";
}

std::string pool_key(ProcessRole role) {
  return std::string(process_role_name(role));
}

// Node names and addresses are unique; returns name -> index of the first node so named.
std::map<std::string, size_t> index_nodes(const std::vector<Node>& nodes, ProblemSink& sink) {
  std::map<std::string, size_t> by_name;
  std::map<std::string, size_t> by_address;
  for (size_t i = 0; i < nodes.size(); ++i) {
    const Node& n = nodes[i];
    const std::string path = "nodes[" + std::to_string(i) + "]";
    if (!n.name.empty()) {
      auto [it, fresh] = by_name.emplace(n.name, i);
      if (!fresh) {
        sink.add(n.at, path + ".name",
                 "'" + n.name + "' again (nodes[" + std::to_string(it->second) + "], " +
                     at_line(nodes[it->second].at) + ")",
                 "a node name used once");
      }
    }
    if (!n.address.empty()) {
      auto [it, fresh] = by_address.emplace(n.address, i);
      if (!fresh) {
        sink.add(n.at, path + ".address",
                 "'" + n.address + "' again (nodes[" + std::to_string(it->second) + "], " +
                     at_line(nodes[it->second].at) + ")",
                 "one node per address (list a machine once and place several replicas on it)");
      }
    }
  }
  return by_name;
}

// The problem for a node name that names no node.
void unknown_node(const std::string& name, Location at, const std::string& field,
                  const std::map<std::string, size_t>& by_name, ProblemSink& sink) {
  std::vector<std::string> names;
  names.reserve(by_name.size());
  for (const auto& [n, i] : by_name)
    names.push_back(n);
  std::string listed;
  for (const auto& n : names)
    listed += (listed.empty() ? "" : ", ") + n;
  std::string expected = "a node named in nodes (" + listed + ")";
  if (const std::string guess = nearest(name, names); !guess.empty()) {
    expected += " (did you mean '" + guess + "'?)";
  }
  sink.add(at, field, "'" + name + "'", expected);
}

// One port slot of a process: explicit (with where it was given) or to be assigned.
enum class PortKind { kControl, kSecond, kMetrics, kHttp };

struct PortSlot {
  size_t process = 0;
  PortKind kind = PortKind::kControl;
  std::optional<int64_t> explicit_port;
  Location at;
  std::string field;  // the field that gave it, or that should give it
};

}  // namespace

bool is_valid_address(std::string_view address) {
  if (address.empty() || address.size() > 253) return false;
  const bool numeric = std::all_of(address.begin(), address.end(),
                                   [](char c) { return (c >= '0' && c <= '9') || c == '.'; });
  size_t start = 0;
  int labels = 0;
  while (start <= address.size()) {
    size_t end = address.find('.', start);
    if (end == std::string_view::npos) end = address.size();
    const std::string_view label = address.substr(start, end - start);
    ++labels;
    if (label.empty() || label.size() > 63) return false;
    if (numeric) {
      if (label.size() > 3 || std::stoi(std::string(label)) > 255) return false;
    } else {
      if (label.front() == '-' || label.back() == '-') return false;
      for (char c : label) {
        const bool ok =
            (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-';
        if (!ok) return false;
      }
    }
    start = end + 1;
  }
  // Digits and dots only is an IPv4 address, which has exactly four parts.
  return !numeric || labels == 4;
}

void resolve_processes(Manifest& out, const SectionInfo& info, ProblemSink& sink) {
  const auto by_name = index_nodes(out.nodes, sink);
  if (!info.nodes_ok) return;  // placements against a broken node list only add noise

  std::vector<Process> processes;
  std::vector<PortSlot> slots;

  // The gateway.
  if (!out.gateway.node.empty()) {
    if (!by_name.count(out.gateway.node)) {
      unknown_node(out.gateway.node, out.gateway.at, "gateway.node", by_name, sink);
    } else {
      Process gw;
      gw.name = "gateway";
      gw.role = ProcessRole::kGateway;
      gw.node = out.gateway.node;
      processes.push_back(gw);
      slots.push_back({processes.size() - 1, PortKind::kControl, out.gateway.port,
                       out.gateway.port_at, "gateway.port"});
      slots.push_back({processes.size() - 1, PortKind::kSecond, out.gateway.grpc_port,
                       out.gateway.grpc_port_at, "gateway.grpc_port"});
      if (out.gateway.http_port) {
        slots.push_back({processes.size() - 1, PortKind::kHttp, out.gateway.http_port,
                         out.gateway.http_port_at, "gateway.http_port"});
      }
    }
  }

  // The pools' replicas, with their devices taken in order on each node.
  std::map<std::string, int64_t> devices_used;
  for (const Pool& pool : out.pools) {
    const std::string key = "pools." + pool_key(pool.role);
    std::map<std::string, bool> reported_full;
    for (size_t i = 0; i < pool.placement.size(); ++i) {
      const std::string& node_name = pool.placement[i];
      const std::string field = key + ".placement[" + std::to_string(i) + "]";
      const auto it = by_name.find(node_name);
      if (it == by_name.end()) {
        if (!reported_full[node_name])
          unknown_node(node_name, pool.placement_at[i], field, by_name, sink);
        reported_full[node_name] = true;
        continue;
      }
      const Node& node = out.nodes[it->second];
      Process p;
      p.name = pool_key(pool.role) + "-" + std::to_string(i);
      p.role = pool.role;
      p.node = node_name;
      p.replica = static_cast<int64_t>(i);
      int64_t& used = devices_used[node_name];
      if (used + pool.devices_per_replica > node.devices) {
        if (!reported_full[node_name]) {
          std::string expected = "at most " + std::to_string(node.devices) +
                                 " devices in use on node '" + node_name + "' across all pools";
          if (out.mode == ServingMode::kDisaggregated) {
            expected +=
                ": replicas sharing a device would run co-located, which mode "
                "'disaggregated' forbids";
          }
          sink.add(pool.placement_at[i], field,
                   "replica " + std::to_string(i) + " needing " +
                       std::to_string(pool.devices_per_replica) + " more devices on node '" +
                       node_name + "' with " + std::to_string(node.devices) + " devices, " +
                       std::to_string(used) + " already taken",
                   expected);
        }
        reported_full[node_name] = true;
      } else {
        for (int64_t d = 0; d < pool.devices_per_replica; ++d)
          p.devices.push_back(used + d);
      }
      used += pool.devices_per_replica;
      processes.push_back(p);
      const std::optional<int64_t> port =
          pool.ports.empty() ? std::nullopt : std::optional<int64_t>(pool.ports[i]);
      const Location port_at = pool.ports.empty() ? pool.placement_at[i] : pool.ports_at[i];
      const std::string port_field =
          pool.ports.empty() ? key + ".ports" : key + ".ports[" + std::to_string(i) + "]";
      slots.push_back({processes.size() - 1, PortKind::kControl, port, port_at, port_field});
      if (pool.role == ProcessRole::kColocated) {
        // The decode half listens on the next port when the prefill half's is explicit.
        const std::optional<int64_t> second =
            port ? std::optional<int64_t>(*port + 1) : std::nullopt;
        slots.push_back(
            {processes.size() - 1, PortKind::kSecond, second, port_at, port_field + " (+1)"});
      }
    }
  }

  // Ports: explicit ones first, then the rest from each node's base_port in process order.
  std::map<std::pair<std::string, int64_t>, const PortSlot*> taken;
  auto claim = [&](const PortSlot& slot, int64_t port) {
    Process& p = processes[slot.process];
    const auto [it, fresh] = taken.emplace(std::make_pair(p.node, port), &slot);
    if (!fresh) {
      const PortSlot& first = *it->second;
      sink.add(slot.at, slot.field,
               "port " + std::to_string(port) + " on node '" + p.node + "', already used by " +
                   processes[first.process].name + " (" + first.field + ", " + at_line(first.at) +
                   ")",
               "a port no other process on node '" + p.node + "' uses");
      return;
    }
    switch (slot.kind) {
      case PortKind::kControl:
        p.port = static_cast<uint16_t>(port);
        break;
      case PortKind::kSecond:
        p.second_port = static_cast<uint16_t>(port);
        break;
      case PortKind::kMetrics:
        p.metrics_port = static_cast<uint16_t>(port);
        break;
      case PortKind::kHttp:
        p.http_port = static_cast<uint16_t>(port);
        break;
    }
  };
  for (const PortSlot& slot : slots) {
    if (!slot.explicit_port) continue;
    if (*slot.explicit_port > 65535) {
      sink.add(slot.at, slot.field, "port " + std::to_string(*slot.explicit_port),
               "a port in 1..65535");
      continue;
    }
    claim(slot, *slot.explicit_port);
  }
  std::map<std::string, int64_t> next_port;
  for (const PortSlot& slot : slots) {
    if (slot.explicit_port) continue;
    Process& p = processes[slot.process];
    const Node& node = out.nodes[by_name.at(p.node)];
    if (!node.base_port) {
      sink.add(slot.at, slot.field, "nothing, and node '" + p.node + "' has no base_port",
               "explicit ports, or nodes[" + std::to_string(by_name.at(p.node)) +
                   "].base_port to assign them from");
      continue;
    }
    int64_t& next = next_port.try_emplace(p.node, *node.base_port).first->second;
    while (taken.count({p.node, next}))
      ++next;
    if (next > 65535) {
      sink.add(node.at, "nodes[" + std::to_string(by_name.at(p.node)) + "].base_port",
               std::to_string(*node.base_port) + ", which runs past port 65535 for " + p.name,
               "a base_port that leaves room for every process on node '" + p.node + "'");
      continue;
    }
    claim(slot, next++);
  }

  // Metrics: each process's control port + the offset, checked against every other port.
  if (out.network.metrics_port_offset > 0) {
    std::vector<PortSlot> metrics_slots;
    for (size_t i = 0; i < processes.size(); ++i) {
      if (processes[i].port == 0) continue;  // its control port is already a problem
      metrics_slots.push_back({i, PortKind::kMetrics,
                               processes[i].port + out.network.metrics_port_offset,
                               out.network.metrics_port_offset_at,
                               "network.metrics_port_offset (" + processes[i].name + ")"});
    }
    for (const PortSlot& slot : metrics_slots) {
      if (*slot.explicit_port > 65535) {
        sink.add(slot.at, slot.field,
                 std::to_string(out.network.metrics_port_offset) + ", which puts " +
                     processes[slot.process].name + "'s /metrics on port " +
                     std::to_string(*slot.explicit_port),
                 "an offset that keeps every process's metrics port within 1..65535");
        continue;
      }
      claim(slot, *slot.explicit_port);
    }
  }

  // The KV host tier of every prefix-caching replica on a node must fit its memory.
  if (out.kv_store) {
    std::map<std::string, int64_t> caches;
    for (const Process& p : processes) {
      if (p.role == ProcessRole::kPrefill || p.role == ProcessRole::kColocated) ++caches[p.node];
    }
    for (const Node& node : out.nodes) {
      if (!node.memory_gib || !caches.count(node.name)) continue;
      const int64_t need = out.kv_store->host_mib * caches[node.name];
      if (need > *node.memory_gib * 1024) {
        sink.add(info.kv_host_mib_at, "kv_store.host_mib",
                 std::to_string(out.kv_store->host_mib) + " MiB x " +
                     std::to_string(caches[node.name]) + " prefix-caching replicas on node '" +
                     node.name + "' = " + std::to_string(need) + " MiB",
                 "at most node '" + node.name + "''s memory_gib (" +
                     std::to_string(*node.memory_gib) +
                     " GiB = " + std::to_string(*node.memory_gib * 1024) + " MiB)");
      }
    }
  }

  for (Process& p : processes) {
    const Node& node = out.nodes[by_name.at(p.node)];
    p.host = node.address;
    p.ssh = node.ssh.value_or("");
    p.program = node.program.value_or("");
    p.agent_by_systemd = node.agent_by_systemd;
  }
  out.processes = std::move(processes);
}

}  // namespace dserve::cluster::internal
