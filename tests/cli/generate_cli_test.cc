// `dserve generate` as a user runs it, in real processes: the prefix store persists blocks
// across process restarts, and a run that reuses them prints exactly what a run without the
// store prints.

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <regex>
#include <string>

#include "dserve/kernels/device.h"

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

// `--device cuda:N` where this machine or build has no usable GPU: serve and generate exit 1 at
// start with the probe's reason, before the model loads; a device name nobody knows exits 2.
TEST(DeviceCli, AGpuThisMachineCannotUseIsRefusedAtStartWithTheReason) {
  const dserve::kernels::DeviceInfo probe = dserve::kernels::probe_cuda_device(0);
  if (probe.available) GTEST_SKIP() << "a GPU is here: " << probe.name;
  const fs::path dir = fs::temp_directory_path() / ("dserve-device-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const fs::path err = dir / "stderr.txt";
  const std::string model = (dir / "tiny").string();
  ASSERT_EQ(
      run_dserve({"model", "init", "--preset", "tiny", "--seed", "3", "--out", model}, err).status,
      0);
  for (const char* role : {"prefill", "decode", "colocated"}) {
    const Output serve =
        run_dserve({"serve", "--role", role, "--model", model, "--device", "cuda:0"}, err);
    EXPECT_EQ(serve.status, 1) << role << ": " << serve.err;
    EXPECT_NE(serve.err.find("--device cuda:0: " + probe.why_unavailable), std::string::npos)
        << role << ": " << serve.err;
    EXPECT_EQ(serve.err.find("loaded"), std::string::npos) << serve.err;
  }
  const Output generate =
      run_dserve({"generate", "--model", model, "--prompt", "hi", "--device", "cuda:0"}, err);
  EXPECT_EQ(generate.status, 1) << generate.err;
  EXPECT_NE(generate.err.find(probe.why_unavailable), std::string::npos) << generate.err;
  const Output unknown =
      run_dserve({"serve", "--role", "decode", "--model", model, "--device", "tpu:0"}, err);
  EXPECT_EQ(unknown.status, 2) << unknown.err;
  EXPECT_NE(unknown.err.find("--device: device 'tpu:0': expected cpu, cuda or cuda:N"),
            std::string::npos)
      << unknown.err;
  fs::remove_all(dir);
}

TEST(GenerateCli, BadInputsFailWithAClearMessage) {
  const fs::path err = fs::temp_directory_path() / ("dserve-cli-err-" + std::to_string(::getpid()));
  const Output missing = run_dserve({"generate", "--model", "/nonexistent", "--prompt", "hi"}, err);
  EXPECT_EQ(missing.status, 2);
  EXPECT_NE(missing.err.find("/nonexistent/config.json"), std::string::npos) << missing.err;
  // a co-located step must leave room for prefill next to a full decode batch
  const Output no_room = run_dserve({"serve", "--role", "colocated", "--model", "/nonexistent",
                                     "--max-batch", "64", "--max-step-tokens", "64"},
                                    err);
  EXPECT_EQ(no_room.status, 2);
  EXPECT_NE(no_room.err.find("--max-step-tokens must be more than --max-batch (64"),
            std::string::npos)
      << no_room.err;
  fs::remove(err);
}

// A checkpoint carries its digests: `model init` writes checksums.sha256 and prints its SHA-256;
// `model verify` finds a flipped byte in a weight file (which used to change outputs with no
// error) or a file nobody listed; `serve --model-sha256` refuses such a checkpoint at start.
TEST(ModelVerify, FlippedByteUnlistedFileAndAPinnedServe) {
  const fs::path dir = fs::temp_directory_path() / ("dserve-verify-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const fs::path err = dir / "stderr.txt";
  const std::string model = (dir / "tiny").string();
  const Output init =
      run_dserve({"model", "init", "--preset", "tiny", "--seed", "4", "--out", model}, err);
  ASSERT_EQ(init.status, 0) << init.err;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(init.err, m, std::regex("has SHA-256 ([0-9a-f]{64})"))) << init.err;
  const std::string pinned = m[1];
  ASSERT_TRUE(fs::exists(fs::path(model) / "checksums.sha256"));

  Output v = run_dserve({"model", "verify", "--model", model, "--sha256", pinned}, err);
  EXPECT_EQ(v.status, 0) << v.err;
  EXPECT_NE(v.err.find("files,"), std::string::npos) << v.err;
  v = run_dserve({"model", "verify", "--model", model, "--sha256", std::string(64, '0')}, err);
  EXPECT_EQ(v.status, 1) << v.err;
  EXPECT_NE(v.err.find("not the one pinned"), std::string::npos) << v.err;

  // One flipped byte in the weights.
  fs::path weights;
  for (const auto& e : fs::directory_iterator(model)) {
    if (e.path().extension() == ".safetensors") weights = e.path();
  }
  ASSERT_FALSE(weights.empty());
  const auto flip = [&] {
    std::fstream f(weights, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(fs::file_size(weights) / 2));
    char byte = 0;
    f.get(byte);
    f.seekp(static_cast<std::streamoff>(fs::file_size(weights) / 2));
    f.put(static_cast<char>(byte ^ 0x10));
  };
  flip();
  v = run_dserve({"model", "verify", "--model", model}, err);
  EXPECT_EQ(v.status, 1) << v.err;
  EXPECT_NE(v.err.find(weights.filename().string() + " (SHA-256 differs)"), std::string::npos)
      << v.err;
  const Output serve = run_dserve({"serve", "--role", "prefill", "--model", model, "--listen",
                                   "127.0.0.1:0", "--model-sha256", pinned},
                                  err);
  EXPECT_EQ(serve.status, 2) << serve.err;
  EXPECT_NE(serve.err.find("--model-sha256: "), std::string::npos) << serve.err;
  EXPECT_NE(serve.err.find("(SHA-256 differs)"), std::string::npos) << serve.err;
  flip();  // back as it was
  v = run_dserve({"model", "verify", "--model", model, "--sha256", pinned}, err);
  EXPECT_EQ(v.status, 0) << v.err;

  // A weight file the digests do not cover.
  fs::copy_file(weights, fs::path(model) / "extra.safetensors");
  v = run_dserve({"model", "verify", "--model", model}, err);
  EXPECT_EQ(v.status, 1) << v.err;
  EXPECT_NE(v.err.find("extra.safetensors (not listed)"), std::string::npos) << v.err;
  fs::remove_all(dir);
}

}  // namespace
