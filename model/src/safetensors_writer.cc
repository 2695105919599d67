// Writing safetensors: deterministic header bytes and a streaming writer.

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <utility>

#include "safetensors.h"

namespace dserve::model {

std::string safetensors_header_bytes(const std::vector<TensorDecl>& decls,
                                     const std::map<std::string, std::string>& metadata,
                                     std::vector<TensorInfo>* layout) {
  std::vector<const TensorDecl*> sorted;
  sorted.reserve(decls.size());
  for (const auto& d : decls)
    sorted.push_back(&d);
  std::sort(sorted.begin(), sorted.end(),
            [](const TensorDecl* a, const TensorDecl* b) { return a->name < b->name; });
  nlohmann::json root = nlohmann::json::object();
  if (!metadata.empty()) root["__metadata__"] = metadata;
  layout->clear();
  int64_t offset = 0;
  for (const TensorDecl* d : sorted) {
    TensorInfo info;
    info.name = d->name;
    info.dtype = d->dtype;
    info.shape = d->shape;
    info.begin = offset;
    info.end = offset + info.numel() * dtype_size(d->dtype);
    offset = info.end;
    DSERVE_CHECK_MSG(root.find(d->name) == root.end(), "duplicate tensor name " + d->name);
    root[d->name] = {{"data_offsets", {info.begin, info.end}},
                     {"dtype", std::string(dtype_name(d->dtype))},
                     {"shape", d->shape}};
    layout->push_back(std::move(info));
  }
  std::string text = root.dump();  // std::map-backed object: keys come out sorted
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) {
    out[static_cast<size_t>(i)] = static_cast<char>(n & 0xFF);
    n >>= 8;
  }
  return out + text;
}

Result<SafetensorsWriter> SafetensorsWriter::create(
    const std::string& path, const std::vector<TensorDecl>& decls,
    const std::map<std::string, std::string>& metadata) {
  SafetensorsWriter w;
  w.path_ = path;
  const std::string header = safetensors_header_bytes(decls, metadata, &w.layout_);
  w.data_bytes_ = w.layout_.empty() ? 0 : w.layout_.back().end;
  const std::string partial = path + ".partial";
  w.file_ = std::fopen(partial.c_str(), "wb");
  if (w.file_ == nullptr) {
    return unavailable(partial + ": cannot create: " + std::strerror(errno));
  }
  if (std::fwrite(header.data(), 1, header.size(), w.file_) != header.size()) {
    return unavailable(partial + ": write failed: " + std::strerror(errno));
  }
  return w;
}

SafetensorsWriter::SafetensorsWriter(SafetensorsWriter&& o) noexcept
    : path_(std::move(o.path_)),
      file_(std::exchange(o.file_, nullptr)),
      layout_(std::move(o.layout_)),
      data_bytes_(o.data_bytes_),
      written_(o.written_) {}

SafetensorsWriter& SafetensorsWriter::operator=(SafetensorsWriter&& o) noexcept {
  if (this != &o) {
    if (file_ != nullptr) std::fclose(file_);
    path_ = std::move(o.path_);
    file_ = std::exchange(o.file_, nullptr);
    layout_ = std::move(o.layout_);
    data_bytes_ = o.data_bytes_;
    written_ = o.written_;
  }
  return *this;
}

SafetensorsWriter::~SafetensorsWriter() {
  if (file_ != nullptr) {
    std::fclose(file_);
    std::error_code ec;
    std::filesystem::remove(path_ + ".partial", ec);  // never finished: leave nothing behind
  }
}

Status SafetensorsWriter::append(std::span<const uint8_t> bytes) {
  DSERVE_CHECK_MSG(file_ != nullptr, "append after finish");
  if (written_ + static_cast<int64_t>(bytes.size()) > data_bytes_) {
    return internal_error(path_ + ": more tensor bytes than the header declares");
  }
  if (bytes.empty()) return Status::ok();
  if (std::fwrite(bytes.data(), 1, bytes.size(), file_) != bytes.size()) {
    return unavailable(path_ + ": write failed: " + std::strerror(errno));
  }
  written_ += static_cast<int64_t>(bytes.size());
  return Status::ok();
}

Status SafetensorsWriter::finish() {
  DSERVE_CHECK_MSG(file_ != nullptr, "finish called twice");
  if (written_ != data_bytes_) {
    return internal_error(path_ + ": " + std::to_string(written_) + " tensor bytes written, the " +
                          "header declares " + std::to_string(data_bytes_));
  }
  const bool ok = std::fflush(file_) == 0;
  const bool closed = std::fclose(file_) == 0;
  file_ = nullptr;
  if (!ok || !closed) return unavailable(path_ + ": write failed: " + std::strerror(errno));
  std::error_code ec;
  std::filesystem::rename(path_ + ".partial", path_, ec);
  if (ec) return unavailable(path_ + ": cannot rename the finished file: " + ec.message());
  return Status::ok();
}

Status write_safetensors(const std::string& path,
                         const std::vector<std::pair<TensorDecl, std::vector<uint8_t>>>& tensors,
                         const std::map<std::string, std::string>& metadata) {
  std::vector<TensorDecl> decls;
  std::map<std::string, const std::vector<uint8_t>*> data;
  for (const auto& [decl, bytes] : tensors) {
    decls.push_back(decl);
    data[decl.name] = &bytes;
  }
  DSERVE_ASSIGN_OR_RETURN(SafetensorsWriter w, SafetensorsWriter::create(path, decls, metadata));
  for (const TensorInfo& t : w.layout()) {
    const std::vector<uint8_t>& bytes = *data[t.name];
    if (static_cast<int64_t>(bytes.size()) != t.byte_size()) {
      return invalid_argument(path + ": tensor `" + t.name + "` has " +
                              std::to_string(bytes.size()) + " bytes, its shape needs " +
                              std::to_string(t.byte_size()));
    }
    DSERVE_RETURN_IF_ERROR(w.append(bytes));
  }
  return w.finish();
}

}  // namespace dserve::model
