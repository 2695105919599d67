// The files the launcher and the node agents share: a Process as JSON (state.json, plan.json),
// the cluster plan, and the agents' reports.

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "dserve/cluster/node_agent.h"
#include "process_json.h"

namespace dserve::cluster {
namespace internal {

using json = nlohmann::json;

json process_to_json(const Process& p) {
  return json{{"name", p.name},
              {"role", std::string(process_role_name(p.role))},
              {"node", p.node},
              {"host", p.host},
              {"port", p.port},
              {"second_port", p.second_port},
              {"metrics_port", p.metrics_port},
              {"http_port", p.http_port},
              {"devices", p.devices},
              {"replica", p.replica},
              {"ssh", p.ssh},
              {"program", p.program},
              {"agent_by_systemd", p.agent_by_systemd}};
}

Process process_from_json(const json& j) {
  Process p;
  p.name = j.at("name").get<std::string>();
  const std::string role = j.at("role").get<std::string>();
  bool known = false;
  for (ProcessRole r : {ProcessRole::kGateway, ProcessRole::kPrefill, ProcessRole::kDecode,
                        ProcessRole::kColocated, ProcessRole::kNodeAgent}) {
    if (process_role_name(r) == role) {
      p.role = r;
      known = true;
    }
  }
  if (!known) throw std::runtime_error("unknown role '" + role + "'");
  p.node = j.at("node").get<std::string>();
  p.host = j.at("host").get<std::string>();
  p.port = j.at("port").get<uint16_t>();
  p.second_port = j.at("second_port").get<uint16_t>();
  p.metrics_port = j.at("metrics_port").get<uint16_t>();
  p.http_port = j.at("http_port").get<uint16_t>();
  p.devices = j.at("devices").get<std::vector<int64_t>>();
  p.replica = j.at("replica").get<int64_t>();
  p.ssh = j.at("ssh").get<std::string>();
  p.program = j.at("program").get<std::string>();
  p.agent_by_systemd = j.value("agent_by_systemd", false);
  return p;
}

}  // namespace internal

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// Plans and reports are small; anything larger is not one of ours.
constexpr size_t kMaxFileBytes = size_t{16} << 20;

Result<std::string> read_small_file(const std::string& path) {
  std::error_code ec;
  const uintmax_t size = fs::file_size(path, ec);
  if (ec) return not_found("no " + path);
  if (size > kMaxFileBytes) return data_loss(path + " is larger than 16 MiB");
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found("no " + path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

Status write_atomically(const std::string& path, const std::string& text) {
  std::error_code ec;
  fs::create_directories(fs::path(path).parent_path(), ec);
  if (ec) return internal_error("cannot create " + fs::path(path).parent_path().string());
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << text << "\n";
    if (!out.flush()) return internal_error("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return internal_error("cannot rename " + tmp + " to " + path + ": " + std::strerror(errno));
  }
  return Status::ok();
}

json supervision_to_json(const SupervisionSpec& s) {
  return json{{"max_restarts", s.max_restarts},       {"restart_window_ms", s.restart_window_ms},
              {"backoff_ms", s.backoff_ms},           {"backoff_max_ms", s.backoff_max_ms},
              {"stop_timeout_ms", s.stop_timeout_ms}, {"on_pool_lost", s.on_pool_lost},
              {"pool_lost_ms", s.pool_lost_ms}};
}

SupervisionSpec supervision_from_json(const json& j) {
  SupervisionSpec s;
  s.max_restarts = j.at("max_restarts").get<int64_t>();
  s.restart_window_ms = j.at("restart_window_ms").get<int64_t>();
  s.backoff_ms = j.at("backoff_ms").get<int64_t>();
  s.backoff_max_ms = j.at("backoff_max_ms").get<int64_t>();
  s.stop_timeout_ms = j.at("stop_timeout_ms").get<int64_t>();
  s.on_pool_lost = j.at("on_pool_lost").get<std::string>();
  s.pool_lost_ms = j.at("pool_lost_ms").get<int64_t>();
  return s;
}

}  // namespace

std::string plan_to_json(const ClusterPlan& plan) {
  json j;
  j["generation"] = plan.generation;
  j["supervision"] = supervision_to_json(plan.supervision);
  j["slurm_job"] = plan.slurm_job;
  j["processes"] = json::array();
  for (const PlannedProcess& p : plan.processes) {
    json e = internal::process_to_json(p.process);
    e["program"] = p.program;
    e["args"] = p.args;
    e["log"] = p.log_path;
    e["out"] = p.out_path;
    j["processes"].push_back(std::move(e));
  }
  return j.dump(2);
}

Result<ClusterPlan> plan_from_json(const std::string& text) {
  try {
    const json j = json::parse(text);
    ClusterPlan plan;
    plan.generation = j.at("generation").get<int64_t>();
    plan.supervision = supervision_from_json(j.at("supervision"));
    plan.slurm_job = j.at("slurm_job").get<std::string>();
    for (const json& e : j.at("processes")) {
      PlannedProcess p;
      p.process = internal::process_from_json(e);
      p.program = e.at("program").get<std::string>();
      p.args = e.at("args").get<std::vector<std::string>>();
      p.log_path = e.at("log").get<std::string>();
      p.out_path = e.at("out").get<std::string>();
      plan.processes.push_back(std::move(p));
    }
    return plan;
  } catch (const std::exception& e) {
    return data_loss(std::string("not a dserve cluster plan: ") + e.what());
  }
}

Status save_plan(const std::string& dir, const ClusterPlan& plan) {
  return write_atomically(dir + "/plan.json", plan_to_json(plan));
}

Result<ClusterPlan> load_plan(const std::string& dir) {
  DSERVE_ASSIGN_OR_RETURN(const std::string text, read_small_file(dir + "/plan.json"));
  auto plan = plan_from_json(text);
  if (!plan.is_ok()) return plan.status().with_context(dir + "/plan.json");
  return plan;
}

std::string report_to_json(const AgentReport& r) {
  json j{{"node", r.node},
         {"pid", r.pid},
         {"updated_unix_ms", r.updated_unix_ms},
         {"plan_generation", r.plan_generation},
         {"ended", r.ended},
         {"end_reason", r.end_reason},
         {"workers", json::array()}};
  for (const WorkerReport& w : r.workers) {
    j["workers"].push_back(json{{"name", w.name},
                                {"state", w.state},
                                {"pid", w.pid},
                                {"start_ticks", w.start_ticks},
                                {"restarts", w.restarts},
                                {"last_exit", w.last_exit},
                                {"last_recovery_s", w.last_recovery_s},
                                {"ready_unix_ms", w.ready_unix_ms}});
  }
  return j.dump();
}

Result<AgentReport> report_from_json(const std::string& text) {
  try {
    const json j = json::parse(text);
    AgentReport r;
    r.node = j.at("node").get<std::string>();
    r.pid = j.at("pid").get<pid_t>();
    r.updated_unix_ms = j.at("updated_unix_ms").get<int64_t>();
    r.plan_generation = j.at("plan_generation").get<int64_t>();
    r.ended = j.at("ended").get<bool>();
    r.end_reason = j.at("end_reason").get<std::string>();
    for (const json& e : j.at("workers")) {
      WorkerReport w;
      w.name = e.at("name").get<std::string>();
      w.state = e.at("state").get<std::string>();
      w.pid = e.at("pid").get<pid_t>();
      w.start_ticks = e.at("start_ticks").get<uint64_t>();
      w.restarts = e.at("restarts").get<int64_t>();
      w.last_exit = e.at("last_exit").get<std::string>();
      w.last_recovery_s = e.at("last_recovery_s").get<double>();
      w.ready_unix_ms = e.at("ready_unix_ms").get<int64_t>();
      r.workers.push_back(std::move(w));
    }
    return r;
  } catch (const std::exception& e) {
    return data_loss(std::string("not a dserve agent report: ") + e.what());
  }
}

std::string report_path(const std::string& dir, const std::string& node) {
  return dir + "/agents/" + node + ".json";
}

}  // namespace dserve::cluster
