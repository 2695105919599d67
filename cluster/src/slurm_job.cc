#include "dserve/cluster/slurm_job.h"

#include <sys/wait.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "process_util.h"

namespace dserve::cluster {
namespace {

namespace fs = std::filesystem;

using internal::sh_quote;

struct Ran {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

// Runs a Slurm client command under `timeout`; its output is bounded (64 KiB kept).
Ran run_slurm(const std::string& command, int timeout_s = 30) {
  Ran r;
  const std::string cmd = "timeout " + std::to_string(timeout_s) + " " + command + " 2>&1";
  std::FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) {
    r.output = std::string("cannot run `") + command + "`: " + std::strerror(errno);
    return r;
  }
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) {
    if (r.output.size() < 65536) r.output.append(buf, n);
  }
  const int status = ::pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  if (r.exit_code == 124)
    r.output += "(no answer from Slurm in " + std::to_string(timeout_s) + " s)";
  if (r.exit_code == 127) r.output += "(is slurm-client installed? `" + command + "` not found)";
  return r;
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (!line.empty()) out.push_back(line);
  }
  return out;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == sep) {
      out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  out.push_back(cur);
  return out;
}

std::string at_line(const std::string& source, Location at) {
  return source + ":" + std::to_string(at.line);
}

// The sbatch options of one component.
std::string component_options(const Manifest& m, int64_t nodes, const std::string& gres) {
  const SlurmSpec& s = m.slurm;
  std::string o = "--nodes=" + std::to_string(nodes) + " --ntasks-per-node=1 --exclusive";
  if (!s.partition.empty()) o += " --partition=" + sh_quote(s.partition);
  if (!s.account.empty()) o += " --account=" + sh_quote(s.account);
  if (!s.time_limit.empty()) o += " --time=" + sh_quote(s.time_limit);
  if (!s.constraint.empty()) o += " --constraint=" + sh_quote(s.constraint);
  if (!gres.empty()) o += " --gres=" + sh_quote(gres);
  return o;
}

}  // namespace

std::vector<ProcessRole> slurm_component_roles(const Manifest& m) {
  std::vector<ProcessRole> roles = {ProcessRole::kGateway};
  for (const Pool& p : m.pools)
    roles.push_back(p.role);
  return roles;
}

std::string slurm_batch_script(const Manifest& m, const std::string& state_dir,
                               const std::string& program) {
  std::string source = m.source;
  std::replace(source.begin(), source.end(), '\n', ' ');  // a comment line stays one line
  std::string s =
      "#!/bin/bash\n"
      "# dserve cluster from " +
      source +
      ": one node agent per node of each component.\n"
      "# When one agent step ends (the cluster ended, a node was lost), the job ends.\n";
  const auto roles = slurm_component_roles(m);
  for (size_t k = 0; k < roles.size(); ++k) {
    s += "srun --het-group=" + std::to_string(k) + " --ntasks-per-node=1 --kill-on-bad-exit=0 " +
         sh_quote(program) + " agent --state-dir " + sh_quote(state_dir) + " &\n";
  }
  s += "wait -n\n"
       "echo \"dserve: an agent step ended (status $?); ending job $SLURM_JOB_ID\" >&2\n"
       "scancel \"$SLURM_JOB_ID\"\n"
       "wait\n";
  return s;
}

Result<std::string> submit_slurm_job(const Manifest& m, const std::string& state_dir,
                                     const std::string& program) {
  std::error_code ec;
  fs::create_directories(fs::path(state_dir) / "logs", ec);
  if (ec) return invalid_argument("cannot create " + state_dir + "/logs: " + ec.message());
  const std::string script_path = state_dir + "/job.sh";
  {
    std::ofstream out(script_path, std::ios::trunc);
    out << slurm_batch_script(m, state_dir, program);
    if (!out.flush()) return internal_error("cannot write " + script_path);
  }
  std::string cmd =
      "sbatch --parsable --job-name=" + sh_quote("dserve-" + fs::path(m.source).stem().string()) +
      " --output=" + sh_quote(state_dir + "/logs/job-%j.out") + " " + component_options(m, 1, "");
  for (const Pool& p : m.pools)
    cmd += " : " + component_options(m, p.replicas, p.gres);
  cmd += " " + sh_quote(script_path);
  const Ran r = run_slurm(cmd);
  if (r.exit_code == 124 || r.exit_code == 127 || r.exit_code < 0) {
    // Not a refusal: Slurm could not be asked. A timed-out sbatch may still have queued the job.
    return unavailable("could not submit the job: " + r.output +
                       (r.exit_code == 124
                            ? "; a job may have been queued all the same: look for "
                              "dserve-" +
                                  fs::path(m.source).stem().string() + " in squeue and scancel it"
                            : ""));
  }
  const auto words = lines_of(r.output);
  if (r.exit_code == 0 && !words.empty()) {
    const std::string id = split(words.back(), ';').front();
    if (!id.empty() && id.find_first_not_of("0123456789") == std::string::npos) return id;
  }
  // Which manifest setting the refusal concerns, when sbatch's words say.
  std::string where;
  const std::string& out = r.output;
  auto mentions = [&](const char* word) { return out.find(word) != std::string::npos; };
  if (mentions("partition")) {
    where = at_line(m.source, m.slurm.partition_at) + ": slurm.partition";
  } else if (mentions("gres") || mentions("generic resource")) {
    for (const Pool& p : m.pools) {
      if (!p.gres.empty()) {
        where += (where.empty() ? "" : "; ") + at_line(m.source, p.gres_at) + ": pools." +
                 std::string(process_role_name(p.role)) + ".gres";
      }
    }
  } else if (mentions("--time") || mentions("time limit")) {
    where = at_line(m.source, m.slurm.time_limit_at) + ": slurm.time_limit";
  } else if (mentions("account")) {
    where = at_line(m.source, m.slurm.account_at) + ": slurm.account";
  } else if (mentions("feature") || mentions("constraint")) {
    where = at_line(m.source, m.slurm.constraint_at) + ": slurm.constraint";
  }
  std::string said;
  for (const auto& line : lines_of(out))
    said += (said.empty() ? "" : "; ") + line;
  return invalid_argument("Slurm refused the job" + (where.empty() ? "" : " (" + where + ")") +
                          ": " + said);
}

Result<std::vector<SlurmComponent>> slurm_job_components(const Manifest& m,
                                                         const std::string& job) {
  const Ran r = run_slurm("squeue -h -j " + sh_quote(job) + " -o '%i|%T|%N|%r'");
  std::vector<SlurmComponent> out;
  if (r.exit_code != 0) {
    if (r.output.find("Invalid job id") != std::string::npos) return out;  // gone
    return unavailable("squeue -j " + job + ": " + r.output);
  }
  const auto roles = slurm_component_roles(m);
  for (const auto& line : lines_of(r.output)) {
    const auto f = split(line, '|');
    if (f.size() < 4) return unavailable("squeue printed '" + line + "'");
    SlurmComponent c;
    c.id = f[0];
    c.state = f[1];
    c.reason = f[3];
    const auto plus = c.id.find('+');
    const size_t k =
        plus == std::string::npos ? 0 : std::strtoul(c.id.c_str() + plus + 1, nullptr, 10);
    if (k >= roles.size()) return unavailable("job " + job + " has a component " + c.id);
    c.role = roles[k];
    if (!f[2].empty() && f[2] != "(null)" && c.state == "RUNNING") {
      const Ran names = run_slurm("scontrol show hostnames " + sh_quote(f[2]));
      if (names.exit_code != 0) return unavailable("scontrol show hostnames: " + names.output);
      c.nodes = lines_of(names.output);
    }
    if (k >= out.size()) out.resize(k + 1);
    out[k] = std::move(c);
  }
  return out;
}

Result<std::vector<SlurmStep>> slurm_job_steps(const std::string& job) {
  // Step ids carry the component's own job id: first the ids of the job's components.
  const Ran ids = run_slurm("squeue -h -j " + sh_quote(job) + " -o '%A'");
  if (ids.exit_code != 0) return unavailable("squeue -j " + job + ": " + ids.output);
  const auto components = lines_of(ids.output);
  const Ran r = run_slurm("squeue -h -s -o '%i|%j|%N'");
  if (r.exit_code != 0) return unavailable("squeue -s: " + r.output);
  std::vector<SlurmStep> out;
  for (const auto& line : lines_of(r.output)) {
    const auto f = split(line, '|');
    if (f.size() < 3) continue;
    const std::string owner = f[0].substr(0, f[0].find('.'));
    for (const auto& c : components) {
      if (owner == c) out.push_back({f[0], f[1], f[2]});
    }
  }
  return out;
}

Result<std::string> slurm_node_address(const std::string& node) {
  const Ran r = run_slurm("scontrol show node -o " + sh_quote(node));
  if (r.exit_code != 0) return unavailable("scontrol show node " + node + ": " + r.output);
  std::istringstream in(r.output);
  for (std::string word; in >> word;) {
    if (word.rfind("NodeAddr=", 0) == 0 && word.size() > 9) return word.substr(9);
  }
  return unavailable("scontrol show node " + node + " printed no NodeAddr: " + r.output);
}

Result<bool> slurm_job_listed(const std::string& job) {
  const Ran q = run_slurm("squeue -h -j " + sh_quote(job) + " -o '%T'");
  if (q.output.find("Invalid job id") != std::string::npos) return false;
  if (q.exit_code != 0) return unavailable("squeue -j " + job + ": " + q.output);
  return !lines_of(q.output).empty();
}

Status cancel_slurm_job(const std::string& job, std::chrono::milliseconds timeout) {
  const Ran r = run_slurm("scancel " + sh_quote(job));
  if (r.exit_code != 0) return unavailable("scancel " + job + ": " + r.output);
  const auto until = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const auto listed = slurm_job_listed(job);
    if (listed.is_ok() && !*listed) return Status::ok();
    if (std::chrono::steady_clock::now() >= until) {
      return unavailable("job " + job + " is still listed by squeue " +
                         std::to_string(timeout.count()) + " ms after scancel" +
                         (listed.is_ok() ? "" : ": " + listed.status().message()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

}  // namespace dserve::cluster
