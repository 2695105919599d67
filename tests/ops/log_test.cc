// The event log: exact JSON and text lines, time stamps, escaping, and whole lines from many
// threads into one file.

#include "dserve/ops/log.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

namespace dserve::ops {
namespace {

namespace fs = std::filesystem;

TEST(Log, Rfc3339MillisecondsUtc) {
  EXPECT_EQ(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
  EXPECT_EQ(rfc3339_ms(1700000000123), "2023-11-14T22:13:20.123Z");
  EXPECT_EQ(rfc3339_ms(951782400007), "2000-02-29T00:00:00.007Z");  // a leap day
  EXPECT_EQ(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
}

TEST(Log, ExactJsonLine) {
  Logger log(LogFormat::kJson, "prefill-0");
  EXPECT_EQ(log.format_line(1700000000123, LogLevel::kInfo, "prefill_done", "req-1",
                            {{"prompt_tokens", 300},
                             {"cached_tokens", uint64_t{256}},
                             {"ms", 12.5},
                             {"ok", true},
                             {"decode", "127.0.0.1:7003"},
                             {"delta", -3}}),
            R"({"ts":"2023-11-14T22:13:20.123Z","level":"info","process":"prefill-0",)"
            R"("event":"prefill_done","request_id":"req-1","prompt_tokens":300,)"
            R"("cached_tokens":256,"ms":12.5,"ok":true,"decode":"127.0.0.1:7003","delta":-3})");
  // No request: no request_id key at all.
  EXPECT_EQ(log.format_line(0, LogLevel::kWarn, "started", "", {}),
            R"({"ts":"1970-01-01T00:00:00.000Z","level":"warn","process":"prefill-0",)"
            R"("event":"started"})");
}

TEST(Log, JsonEscapesWhatWouldBreakTheLine) {
  Logger log(LogFormat::kJson, "gw \"main\"");
  const std::string nasty = std::string("a\"b\\c\nd\te") + '\x01' + "\xc3\xa9";  // é stays UTF-8
  const std::string line = log.format_line(5, LogLevel::kError, "finished", nasty,
                                           {{"why", nasty},
                                            {"nan", std::numeric_limits<double>::quiet_NaN()},
                                            {"inf", std::numeric_limits<double>::infinity()}});
  EXPECT_EQ(line.find('\n'), std::string::npos) << line;
  const auto j = nlohmann::json::parse(line);
  EXPECT_EQ(j.at("process"), "gw \"main\"");
  EXPECT_EQ(j.at("level"), "error");
  EXPECT_EQ(j.at("request_id"), nasty);
  EXPECT_EQ(j.at("why"), nasty);
  EXPECT_TRUE(j.at("nan").is_null());
  EXPECT_TRUE(j.at("inf").is_null());
}

TEST(Log, NumbersReadBackExactly) {
  Logger log(LogFormat::kJson, "p");
  for (const double v : {0.1, 1.0 / 3.0, 1e-9, 123456789.125, -2.5e300}) {
    const auto j = nlohmann::json::parse(log.format_line(0, LogLevel::kInfo, "e", "", {{"v", v}}));
    EXPECT_EQ(j.at("v").get<double>(), v);
  }
  const auto j =
      nlohmann::json::parse(log.format_line(0, LogLevel::kInfo, "e", "",
                                            {{"max", std::numeric_limits<uint64_t>::max()},
                                             {"min", std::numeric_limits<int64_t>::min()}}));
  EXPECT_EQ(j.at("max").get<uint64_t>(), std::numeric_limits<uint64_t>::max());
  EXPECT_EQ(j.at("min").get<int64_t>(), std::numeric_limits<int64_t>::min());
}

TEST(Log, ExactTextLineQuotesOnlyWhatNeedsIt) {
  Logger log(LogFormat::kText, "decode-1");
  EXPECT_EQ(
      log.format_line(1700000000123, LogLevel::kInfo, "handoff_refused", "req-2",
                      {{"reason", "stale epoch 7"}, {"tokens", 4}, {"empty", ""}, {"plain", "x"}}),
      "2023-11-14T22:13:20.123Z info decode-1 handoff_refused request_id=req-2 "
      "reason=\"stale epoch 7\" tokens=4 empty=\"\" plain=x");
  EXPECT_EQ(log.format_line(0, LogLevel::kWarn, "started", "", {}),
            "1970-01-01T00:00:00.000Z warn decode-1 started");
}

TEST(Log, ParsesFormatNames) {
  EXPECT_EQ(*parse_log_format("json"), LogFormat::kJson);
  EXPECT_EQ(*parse_log_format("text"), LogFormat::kText);
  const auto bad = parse_log_format("xml");
  ASSERT_FALSE(bad.is_ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("'xml'"), std::string::npos);
}

TEST(Log, OpenFailsWithThePathAndReason) {
  const std::string path = "/nonexistent-dserve-dir/sub/log.jsonl";
  const auto log = Logger::open(LogFormat::kJson, "p", path);
  ASSERT_FALSE(log.is_ok());
  EXPECT_EQ(log.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(log.status().message().find(path), std::string::npos) << log.status().message();
  EXPECT_NE(log.status().message().find("No such file"), std::string::npos)
      << log.status().message();
  EXPECT_EQ(Logger::open(LogFormat::kJson, "", "").status().code(), StatusCode::kInvalidArgument);
}

// Eight threads log 500 lines each into one file: every line is whole JSON, none is lost, and
// each thread's lines keep their order. A second logger appends after the first's lines.
TEST(Log, ConcurrentLinesStayWholeInAFile) {
  const fs::path path =
      fs::temp_directory_path() / ("dserve-log-test-" + std::to_string(::getpid()) + ".jsonl");
  fs::remove(path);
  constexpr int kThreads = 8;
  constexpr int kLines = 500;
  {
    auto log = Logger::open(LogFormat::kJson, "gateway", path.string());
    ASSERT_TRUE(log.is_ok()) << log.status().to_string();
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        for (int i = 0; i < kLines; ++i) {
          (*log)->info("tick", "req-" + std::to_string(t),
                       {{"i", i}, {"padding", std::string(static_cast<size_t>(i % 97), 'x')}});
        }
      });
    }
    for (auto& th : threads)
      th.join();
  }
  {
    auto again = Logger::open(LogFormat::kJson, "gateway", path.string());
    ASSERT_TRUE(again.is_ok());
    (*again)->info("reopened", "");
  }
  std::ifstream in(path);
  std::vector<int> next(kThreads, 0);
  int lines = 0;
  std::string last_event;
  for (std::string line; std::getline(in, line); ++lines) {
    nlohmann::json j;
    ASSERT_NO_THROW(j = nlohmann::json::parse(line)) << "line " << lines << ": " << line;
    last_event = j.at("event");
    if (last_event != "tick") continue;
    const int t = std::stoi(j.at("request_id").get<std::string>().substr(4));
    ASSERT_EQ(j.at("i").get<int>(), next[t]) << "thread " << t << " out of order";
    ++next[t];
  }
  EXPECT_EQ(lines, kThreads * kLines + 1);
  EXPECT_EQ(last_event, "reopened");
  for (int t = 0; t < kThreads; ++t)
    EXPECT_EQ(next[t], kLines);
  fs::remove(path);
}

}  // namespace
}  // namespace dserve::ops
