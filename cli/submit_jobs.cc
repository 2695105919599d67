#include "submit_jobs.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.h"

namespace dserve::cli {
namespace {

using json = nlohmann::json;

struct Job {
  std::string id;
  dserve::v1::GenerateRequest request;
};

std::string describe(const json& v) {
  std::string s = v.dump();
  return s.size() > 40 ? s.substr(0, 37) + "..." : s;
}

// Parses one job line; appends "FILE:LINE: ..." problems.
// `ids` collects the ids seen so far (a repeat is a problem too).
std::optional<Job> parse_job(const std::string& line, size_t line_no, const std::string& source,
                             uint32_t default_max_tokens, std::set<std::string>& ids,
                             std::vector<std::string>& problems) {
  const std::string where = source + ":" + std::to_string(line_no) + ": ";
  json j;
  try {
    j = json::parse(line);
  } catch (const json::parse_error& e) {
    problems.push_back(where + "not a JSON object (" + std::string(e.what()) + ")");
    return std::nullopt;
  }
  if (!j.is_object()) {
    problems.push_back(where + "found " + describe(j) + "; expected a JSON object");
    return std::nullopt;
  }
  static const std::set<std::string> known = {"id",         "prompt",      "prompt_tokens", "chat",
                                              "max_tokens", "temperature", "top_k",         "top_p",
                                              "seed",       "timeout_ms"};
  const size_t before = problems.size();
  auto bad = [&](const std::string& field, const json& found, const std::string& expected) {
    problems.push_back(where + "field '" + field + "': found " + describe(found) + "; expected " +
                       expected);
  };
  for (const auto& [key, value] : j.items()) {
    if (!known.count(key)) {
      bad(key, value,
          "no such field (fields: id, prompt, prompt_tokens, chat, max_tokens, temperature, "
          "top_k, top_p, seed, timeout_ms)");
    }
  }
  Job job;
  job.id = "line-" + std::to_string(line_no);
  if (j.contains("id")) {
    if (j["id"].is_string() && !j["id"].get<std::string>().empty()) {
      job.id = j["id"].get<std::string>();
    } else {
      bad("id", j["id"], "a non-empty string");
    }
  }
  if (!ids.insert(job.id).second) bad("id", job.id, "an id used once");
  auto& req = job.request;
  const bool has_text = j.contains("prompt");
  const bool has_tokens = j.contains("prompt_tokens");
  if (has_text == has_tokens) {
    problems.push_back(
        where +
        (has_text ? "both 'prompt' and 'prompt_tokens'" : "neither 'prompt' nor 'prompt_tokens'") +
        "; expected exactly one of them");
  }
  if (has_text) {
    if (j["prompt"].is_string() && !j["prompt"].get<std::string>().empty()) {
      req.set_prompt(j["prompt"].get<std::string>());
    } else {
      bad("prompt", j["prompt"], "a non-empty string");
    }
  }
  if (has_tokens) {
    const json& t = j["prompt_tokens"];
    bool ok = t.is_array() && !t.empty();
    for (size_t i = 0; ok && i < t.size(); ++i)
      ok = t[i].is_number_integer() && t[i].get<int64_t>() >= 0 && t[i].get<int64_t>() < (1 << 30);
    if (ok) {
      for (const json& id : t)
        req.add_prompt_tokens(id.get<int32_t>());
    } else {
      bad("prompt_tokens", t, "a non-empty array of token ids (integers >= 0)");
    }
  }
  auto unsigned_field = [&](const char* name, uint64_t max) -> std::optional<uint64_t> {
    if (!j.contains(name)) return std::nullopt;
    const json& v = j[name];
    if (v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<uint64_t>() <= max) {
      return v.get<uint64_t>();
    }
    bad(name, v, "an integer in 0.." + std::to_string(max));
    return std::nullopt;
  };
  auto number_field = [&](const char* name, double lo, double hi) -> std::optional<double> {
    if (!j.contains(name)) return std::nullopt;
    const json& v = j[name];
    if (v.is_number() && v.get<double>() >= lo && v.get<double>() <= hi) return v.get<double>();
    bad(name, v, "a number in " + json(lo).dump() + ".." + json(hi).dump());
    return std::nullopt;
  };
  req.set_max_tokens(
      static_cast<uint32_t>(unsigned_field("max_tokens", UINT32_MAX).value_or(default_max_tokens)));
  if (auto v = number_field("temperature", 0, 100)) req.set_temperature(static_cast<float>(*v));
  if (auto v = unsigned_field("top_k", UINT32_MAX)) req.set_top_k(static_cast<uint32_t>(*v));
  if (auto v = number_field("top_p", 0, 1)) req.set_top_p(static_cast<float>(*v));
  if (auto v = unsigned_field("seed", UINT64_MAX)) req.set_seed(*v);
  if (auto v = unsigned_field("timeout_ms", UINT32_MAX))
    req.set_timeout_ms(static_cast<uint32_t>(*v));
  if (j.contains("chat")) {
    if (j["chat"].is_boolean()) {
      req.set_chat(j["chat"].get<bool>());
    } else {
      bad("chat", j["chat"], "true or false");
    }
  }
  if (problems.size() != before) return std::nullopt;
  return job;
}

// The progress line: "[#######.............] 35/100 jobs, 1 failed, 4.2 jobs/s, ETA 15 s".
class Progress {
 public:
  explicit Progress(size_t total) : total_(total), tty_(isatty(2) == 1) {}

  void update(size_t done, size_t failed, bool final) {
    const auto now = std::chrono::steady_clock::now();
    // Not a terminal (a log): a line every 10% or 5 s and the last one.
    if (!tty_ && !final && done * 10 / std::max<size_t>(total_, 1) == last_decile_ &&
        now - last_line_ < std::chrono::seconds(5)) {
      return;
    }
    last_decile_ = done * 10 / std::max<size_t>(total_, 1);
    last_line_ = now;
    const double secs = std::chrono::duration<double>(now - start_).count();
    const double rate = secs > 0 ? static_cast<double>(done) / secs : 0;
    constexpr size_t kWidth = 30;
    const size_t filled = total_ == 0 ? kWidth : done * kWidth / total_;
    std::string bar(filled, '#');
    bar.resize(kWidth, '.');
    char eta[32] = "";
    if (!final && rate > 0) {
      std::snprintf(eta, sizeof eta, ", ETA %.0f s", static_cast<double>(total_ - done) / rate);
    }
    std::fprintf(stderr, "%s[%s] %zu/%zu jobs, %zu failed, %.1f jobs/s%s%s", tty_ ? "\r" : "",
                 bar.c_str(), done, total_, failed, rate, eta, tty_ && !final ? "" : "\n");
    std::fflush(stderr);
  }

 private:
  size_t total_;
  bool tty_;
  size_t last_decile_ = 0;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point last_line_ = start_;
};

}  // namespace

int run_jobs(api::ServingClient& client, const JobsOptions& o) {
  std::ifstream in(o.jobs_path);
  if (!in) {
    print_error("--jobs: cannot read " + o.jobs_path);
    return 2;
  }
  std::vector<Job> jobs;
  std::vector<std::string> problems;
  std::set<std::string> ids;
  std::string line;
  for (size_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    if (auto job = parse_job(line, n, o.jobs_path, o.default_max_tokens, ids, problems)) {
      jobs.push_back(std::move(*job));
    }
  }
  if (!problems.empty()) {
    std::string all;
    for (const auto& p : problems)
      all += "\n  " + p;
    print_error(o.jobs_path + ": " + std::to_string(problems.size()) +
                " problem(s), nothing sent:" + all);
    return 2;
  }
  std::FILE* out = stdout;
  if (!o.out_path.empty() && o.out_path != "-") {
    out = std::fopen(o.out_path.c_str(), "w");
    if (!out) {
      print_error("--out: cannot write " + o.out_path);
      return 2;
    }
  }

  std::mutex mu;
  std::map<size_t, std::string> finished;  // index -> result line, until written
  size_t next_to_write = 0, done = 0, failed = 0;
  std::atomic<size_t> next_job{0};
  Progress progress(jobs.size());
  auto worker = [&] {
    for (size_t i; (i = next_job.fetch_add(1)) < jobs.size();) {
      const Job& job = jobs[i];
      std::string request_id;
      auto got = client.generate(job.request, [&](const dserve::v1::GenerateResponse& msg) {
        if (request_id.empty()) request_id = msg.request_id();
        return true;
      });
      json r;
      r["id"] = job.id;
      r["request_id"] = request_id;
      if (got.is_ok()) {
        r["finish_reason"] = got->finish_reason;
        r["text"] = got->text;
        r["tokens"] = got->tokens;
        const auto& u = got->usage;
        r["usage"] = {{"prompt_tokens", u.prompt_tokens()},
                      {"completion_tokens", u.completion_tokens()},
                      {"cached_prompt_tokens", u.cached_prompt_tokens()},
                      {"attempts", u.attempts()},
                      {"time_to_first_token_ms", u.time_to_first_token_ms()},
                      {"total_ms", u.total_ms()}};
      } else {
        r["error"] = {{"code", std::string(status_code_name(got.status().code()))},
                      {"message", got.status().message()}};
      }
      std::lock_guard<std::mutex> lock(mu);
      ++done;
      if (!got.is_ok()) ++failed;
      finished[i] = r.dump(-1, ' ', false, json::error_handler_t::replace);
      // Input order: write every result whose predecessors are all written.
      for (auto it = finished.find(next_to_write); it != finished.end();
           it = finished.find(next_to_write)) {
        std::fputs(it->second.c_str(), out);
        std::fputc('\n', out);
        finished.erase(it);
        ++next_to_write;
      }
      std::fflush(out);
      progress.update(done, failed, false);
    }
  };
  std::vector<std::thread> threads;
  const int n = std::max(1, std::min<int>(o.concurrency, static_cast<int>(jobs.size())));
  threads.reserve(static_cast<size_t>(n));
  for (int t = 0; t < n; ++t)
    threads.emplace_back(worker);
  for (auto& t : threads)
    t.join();
  progress.update(done, failed, true);
  if (out != stdout) std::fclose(out);
  return failed == 0 ? 0 : 1;
}

}  // namespace dserve::cli
