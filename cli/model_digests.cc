#include "model_digests.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <vector>

#include "dserve/core/files.h"
#include "dserve/core/sha256.h"

namespace dserve::cli {
namespace {

namespace fs = std::filesystem;

constexpr size_t kMaxDigestsFileBytes = size_t{1} << 20;

Result<std::string> file_sha256(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found("cannot read '" + path.string() + "'");
  Sha256 h;
  std::vector<char> buf(size_t{1} << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    if (in.gcount() > 0) h.update(buf.data(), static_cast<size_t>(in.gcount()));
  }
  if (in.bad()) return data_loss("read error in '" + path.string() + "'");
  return h.hex();
}

// What a checkpoint directory holds that a digest manifest must cover.
bool is_checkpoint_file(const std::string& name) {
  return name.ends_with(".safetensors") || name.ends_with(".json");
}

// A file name as a digest line may carry it: one plain name in the directory.
bool plain_name(std::string_view name) {
  return !name.empty() && name != "." && name != ".." &&
         name.find_first_of("/\n\r") == std::string_view::npos;
}

}  // namespace

Result<std::string> write_model_digests(const std::string& dir, const DigestProgress& progress) {
  std::vector<std::pair<std::string, uint64_t>> files;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (!e.is_regular_file() || name == kModelDigestsFile || !plain_name(name)) continue;
    files.emplace_back(name, e.file_size());
  }
  if (ec) return not_found("cannot list the model directory '" + dir + "': " + ec.message());
  std::sort(files.begin(), files.end());
  uint64_t total = 0, done = 0;
  for (const auto& [name, bytes] : files)
    total += bytes;
  std::string text;
  for (const auto& [name, bytes] : files) {
    DSERVE_ASSIGN_OR_RETURN(const std::string digest, file_sha256(fs::path(dir) / name));
    text += digest + "  " + name + "\n";
    done += bytes;
    if (progress) progress(name, bytes, done, total);
  }
  const fs::path final_path = fs::path(dir) / kModelDigestsFile;
  const fs::path partial = final_path.string() + ".partial";
  {
    std::ofstream out(partial, std::ios::binary | std::ios::trunc);
    out << text;
    out.close();
    if (!out) return unavailable("cannot write '" + partial.string() + "'");
  }
  fs::rename(partial, final_path, ec);
  if (ec) return unavailable("cannot rename '" + partial.string() + "': " + ec.message());
  return sha256_hex(text);
}

Result<std::string> verify_model_digests(const std::string& dir, std::string_view pinned,
                                         const DigestProgress& progress) {
  const fs::path list_path = fs::path(dir) / kModelDigestsFile;
  DSERVE_ASSIGN_OR_RETURN(
      const std::string text,
      read_bounded_file(list_path.string(), "digest file", kMaxDigestsFileBytes));
  const std::string where = list_path.string();
  const std::string text_sha256 = sha256_hex(text);
  if (!pinned.empty() && text_sha256 != pinned) {
    return data_loss(where + " has SHA-256 " + text_sha256 + ", not the pinned " +
                     std::string(pinned.substr(0, 64)) + ": the checkpoint is not the one pinned");
  }
  std::map<std::string, std::string> listed;  // name -> digest
  size_t line_no = 0;
  for (size_t at = 0; at < text.size();) {
    size_t end = text.find('\n', at);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(at, end - at);
    at = end + 1;
    ++line_no;
    if (line.empty()) continue;
    const bool hex = line.size() > 66 && std::all_of(line.begin(), line.begin() + 64, [](char c) {
                       return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
                     });
    const std::string name = hex ? line.substr(66) : "";
    if (!hex || line.compare(64, 2, "  ") != 0 || !plain_name(name) || listed.count(name)) {
      return invalid_argument(where + ":" + std::to_string(line_no) +
                              ": expected \"<64 lowercase hex digits>  <file name>\" naming each "
                              "file once");
    }
    listed.emplace(name, line.substr(0, 64));
  }
  std::error_code ec;
  uint64_t total = 0, done = 0;
  for (const auto& [name, digest] : listed)
    total += fs::file_size(fs::path(dir) / name, ec);
  std::vector<std::string> bad;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (e.is_regular_file() && is_checkpoint_file(name) && !listed.count(name))
      bad.push_back(name + " (not listed)");
  }
  for (const auto& [name, digest] : listed) {
    const fs::path path = fs::path(dir) / name;
    if (!fs::is_regular_file(path, ec)) {
      bad.push_back(name + " (missing)");
      continue;
    }
    const uint64_t bytes = fs::file_size(path, ec);
    DSERVE_ASSIGN_OR_RETURN(const std::string actual, file_sha256(path));
    if (actual != digest) bad.push_back(name + " (SHA-256 differs)");
    done += bytes;
    if (progress) progress(name, bytes, done, total);
  }
  if (!bad.empty()) {
    std::sort(bad.begin(), bad.end());
    return data_loss(dir + " does not match " + std::string(kModelDigestsFile) + ": " + bad[0] +
                     (bad.size() > 1 ? " and " + std::to_string(bad.size() - 1) + " more" : ""));
  }
  return std::to_string(listed.size()) + " files, " + std::to_string(total) + " bytes, match " +
         where + " (SHA-256 " + text_sha256 + ")";
}

}  // namespace dserve::cli
