#include <xxhash.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <vector>

#include "dserve/model/checkpoint.h"

namespace dserve::model {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kSamples = 64;
constexpr uint64_t kSampleBytes = uint64_t{64} * 1024;

Status hash_file_part(XXH3_state_t* state, std::ifstream& in, uint64_t offset, uint64_t bytes,
                      const fs::path& path) {
  std::vector<char> buf(static_cast<size_t>(bytes));
  in.seekg(static_cast<std::streamoff>(offset));
  in.read(buf.data(), static_cast<std::streamsize>(bytes));
  if (!in) {
    return data_loss(path.string() + ": cannot read " + std::to_string(bytes) +
                     " bytes at offset " + std::to_string(offset));
  }
  XXH3_128bits_update(state, buf.data(), buf.size());
  return Status::ok();
}

}  // namespace

Result<std::string> checkpoint_fingerprint(const std::string& model_dir) {
  const fs::path dir(model_dir);
  std::vector<fs::path> files{dir / "config.json"};
  std::vector<fs::path> shards;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (entry.path().extension() == ".safetensors") shards.push_back(entry.path());
  }
  if (ec) return not_found(model_dir + ": cannot list: " + ec.message());
  if (shards.empty()) return not_found(model_dir + ": no .safetensors files");
  std::sort(shards.begin(), shards.end());
  XXH3_state_t* state = XXH3_createState();
  XXH3_128bits_reset(state);
  Status status = Status::ok();
  {
    std::ifstream config(files[0], std::ios::binary);
    const uint64_t size = fs::file_size(files[0], ec);
    if (!config || ec) {
      status = not_found(files[0].string() + ": cannot read");
    } else {
      status = hash_file_part(state, config, 0, size, files[0]);
    }
  }
  for (const fs::path& shard : shards) {
    if (!status.is_ok()) break;
    const std::string name = shard.filename().string();
    const uint64_t size = fs::file_size(shard, ec);
    std::ifstream in(shard, std::ios::binary);
    if (ec || !in || size < 8) {
      status = data_loss(shard.string() + ": cannot read its size or header");
      break;
    }
    XXH3_128bits_update(state, name.data(), name.size());
    XXH3_128bits_update(state, &size, sizeof(size));
    uint64_t header_len = 0;
    in.read(reinterpret_cast<char*>(&header_len), sizeof(header_len));
    const uint64_t header_end = std::min(size, 8 + header_len);
    status = hash_file_part(state, in, 0, header_end, shard);
    const uint64_t data = size - header_end;
    for (uint64_t i = 0; status.is_ok() && i < kSamples && data > 0; ++i) {
      const uint64_t bytes = std::min(kSampleBytes, data);
      const uint64_t offset = header_end + (data - bytes) * i / (kSamples - 1);
      status = hash_file_part(state, in, offset, bytes, shard);
    }
  }
  const XXH128_hash_t h = XXH3_128bits_digest(state);
  XXH3_freeState(state);
  DSERVE_RETURN_IF_ERROR(status);
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%016llx%016llx", static_cast<unsigned long long>(h.high64),
                static_cast<unsigned long long>(h.low64));
  return std::string(buf) + "/" + kForwardNumerics;
}

}  // namespace dserve::model
