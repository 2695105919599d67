// `dserve generate` as a user runs it, in real processes: the prefix store persists blocks
// across process restarts, and a run that reuses them prints exactly what a run without the
// store prints.

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <regex>
#include <string>

namespace {

namespace fs = std::filesystem;

struct Output {
  int status = -1;
  std::string out;
  std::string err;
};

// Runs the dserve binary with `args` (no shell), capturing stdout and stderr.
Output run_dserve(const std::vector<std::string>& args, const fs::path& err_file) {
  std::vector<char*> argv;
  std::string binary = DSERVE_BINARY;
  argv.push_back(binary.data());
  std::vector<std::string> copy = args;
  for (auto& a : copy)
    argv.push_back(a.data());
  argv.push_back(nullptr);
  int out_pipe[2];
  if (::pipe(out_pipe) != 0) return {};
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(out_pipe[1], 1);
    std::FILE* err = std::fopen(err_file.c_str(), "w");
    if (err != nullptr) ::dup2(::fileno(err), 2);
    ::close(out_pipe[0]);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(out_pipe[1]);
  Output o;
  std::array<char, 4096> buf;
  for (ssize_t n; (n = ::read(out_pipe[0], buf.data(), buf.size())) > 0;)
    o.out.append(buf.data(), static_cast<size_t>(n));
  ::close(out_pipe[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  o.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  if (std::FILE* err = std::fopen(err_file.c_str(), "r")) {
    for (size_t n; (n = std::fread(buf.data(), 1, buf.size(), err)) > 0;)
      o.err.append(buf.data(), n);
    std::fclose(err);
  }
  return o;
}

TEST(GenerateCli, PrefixStoreSurvivesRestartsAndChangesNoOutput) {
  const fs::path dir = fs::temp_directory_path() / ("dserve-cli-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const fs::path err = dir / "stderr.txt";
  const std::string model = (dir / "tiny").string();
  const Output init =
      run_dserve({"model", "init", "--preset", "tiny", "--seed", "3", "--out", model}, err);
  ASSERT_EQ(init.status, 0) << init.err;

  std::string prompt;
  for (int i = 0; i < 60; ++i)
    prompt += "Line " + std::to_string(i) + " of a long shared system prompt.\n";
  const std::vector<std::string> common{"generate", "--model",      model, "--prompt",
                                        prompt,     "--max-tokens", "12"};
  auto with_store = common;
  with_store.insert(with_store.end(), {"--kv-store", (dir / "kv").string()});

  const Output cold = run_dserve(common, err);
  ASSERT_EQ(cold.status, 0) << cold.err;
  const Output first = run_dserve(with_store, err);  // a fresh store: computes and keeps
  ASSERT_EQ(first.status, 0) << first.err;
  EXPECT_NE(first.err.find("reused 0 of"), std::string::npos) << first.err;
  const Output second = run_dserve(with_store, err);  // a new process: reuses from RocksDB
  ASSERT_EQ(second.status, 0) << second.err;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(second.err, m, std::regex("reused (\\d+) of (\\d+)")))
      << second.err;
  const int reused = std::stoi(m[1]), total = std::stoi(m[2]);
  EXPECT_GE(reused, 128);
  EXPECT_EQ(reused % 128, 0);
  EXPECT_LT(reused, total);
  EXPECT_EQ(first.out, cold.out);
  EXPECT_EQ(second.out, cold.out);
  fs::remove_all(dir);
}

TEST(GenerateCli, BadInputsFailWithAClearMessage) {
  const fs::path err = fs::temp_directory_path() / ("dserve-cli-err-" + std::to_string(::getpid()));
  const Output missing = run_dserve({"generate", "--model", "/nonexistent", "--prompt", "hi"}, err);
  EXPECT_EQ(missing.status, 2);
  EXPECT_NE(missing.err.find("/nonexistent/config.json"), std::string::npos) << missing.err;
  fs::remove(err);
}

}  // namespace
