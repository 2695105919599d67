// Reading safetensors: header validation, the memory-mapped file, the sharded directory.

#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

namespace dserve::model {
namespace {

using nlohmann::json;

// Element counts beyond this are rejected: the byte size must fit int64 for any dtype.
constexpr int64_t kMaxElements = int64_t{1} << 60;

std::string where(std::string_view path, std::string_view tensor) {
  std::string s(path);
  if (!tensor.empty()) s += ": tensor `" + std::string(tensor) + "`";
  return s;
}

// A non-negative JSON integer that fits int64, or nullopt.
std::optional<int64_t> non_negative_int(const json& v) {
  if (v.is_number_unsigned()) {
    const auto u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return static_cast<int64_t>(u);
  }
  if (v.is_number_integer()) {
    const auto i = v.get<int64_t>();
    if (i < 0) return std::nullopt;
    return i;
  }
  return std::nullopt;
}

Result<TensorInfo> parse_entry(const std::string& name, const json& v, std::string_view path,
                               int64_t data_size) {
  const std::string at = where(path, name);
  if (!v.is_object()) return invalid_argument(at + ": header entry is not an object");
  const auto dt = v.find("dtype");
  if (dt == v.end() || !dt->is_string()) return invalid_argument(at + ": no string `dtype`");
  const auto dtype = parse_dtype(dt->get_ref<const std::string&>());
  if (!dtype) {
    return invalid_argument(at + ": unknown dtype \"" + dt->get<std::string>() + "\"");
  }
  TensorInfo info;
  info.name = name;
  info.dtype = *dtype;
  const auto sh = v.find("shape");
  if (sh == v.end() || !sh->is_array()) return invalid_argument(at + ": no array `shape`");
  int64_t numel = 1;
  for (const json& d : *sh) {
    const auto dim = non_negative_int(d);
    if (!dim) return invalid_argument(at + ": shape " + sh->dump() + " has a bad dimension");
    if (*dim != 0 && numel > kMaxElements / *dim) {
      return invalid_argument(at + ": shape " + sh->dump() + " overflows");
    }
    numel *= *dim;
    info.shape.push_back(*dim);
  }
  const auto off = v.find("data_offsets");
  if (off == v.end() || !off->is_array() || off->size() != 2) {
    return invalid_argument(at + ": `data_offsets` is not a [begin, end] pair");
  }
  const auto b = non_negative_int((*off)[0]);
  const auto e = non_negative_int((*off)[1]);
  if (!b || !e) return invalid_argument(at + ": bad data_offsets " + off->dump());
  if (*e < *b) return invalid_argument(at + ": data_offsets " + off->dump() + " end before begin");
  if (*e > data_size) {
    return data_loss(at + ": data_offsets " + off->dump() + " run past the data section (" +
                     std::to_string(data_size) + " bytes)");
  }
  info.begin = *b;
  info.end = *e;
  const int64_t want = numel * dtype_size(info.dtype);
  if (info.byte_size() != want) {
    return invalid_argument(at + ": " + std::to_string(info.byte_size()) + " bytes for " +
                            std::string(dtype_name(info.dtype)) + " " +
                            shape_to_string(info.shape) + ", expected " + std::to_string(want));
  }
  return info;
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape)
    n *= d;
  return n;
}

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i)
    s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

const TensorInfo* SafetensorsHeader::find(std::string_view name) const {
  const auto it =
      std::lower_bound(tensors.begin(), tensors.end(), name,
                       [](const TensorInfo& t, std::string_view n) { return t.name < n; });
  return it != tensors.end() && it->name == name ? &*it : nullptr;
}

Result<SafetensorsHeader> parse_safetensors(std::span<const uint8_t> file, std::string_view path) {
  const std::string p(path);
  if (file.size() < 8) {
    return data_loss(p + ": file is " + std::to_string(file.size()) +
                     " bytes, shorter than the 8-byte header length");
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i)
    n = (n << 8) | file[static_cast<size_t>(i)];
  if (n > file.size() - 8) {
    return data_loss(p + ": header length " + std::to_string(n) +
                     " runs past the end of the file (" + std::to_string(file.size()) + " bytes)");
  }
  if (n > kMaxHeaderBytes) {
    return invalid_argument(p + ": header length " + std::to_string(n) + " exceeds the limit of " +
                            std::to_string(kMaxHeaderBytes));
  }
  const auto* text = reinterpret_cast<const char*>(file.data() + 8);
  // nlohmann keeps the last of duplicate keys silently: the callback sees every top-level key.
  std::set<std::string> seen;
  std::string duplicate;
  const json::parser_callback_t on_event = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth == 1 && event == json::parse_event_t::key && parsed.is_string()) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!seen.insert(key).second && duplicate.empty()) duplicate = key;
    }
    return true;
  };
  json root;
  try {
    root = json::parse(text, text + n, on_event);
  } catch (const json::exception& e) {
    return invalid_argument(p + ": malformed JSON header: " + e.what());
  }
  if (!duplicate.empty()) return invalid_argument(where(p, duplicate) + ": duplicate name");
  if (!root.is_object()) return invalid_argument(p + ": the JSON header is not an object");

  SafetensorsHeader header;
  header.data_offset = static_cast<int64_t>(8 + n);
  const auto data_size = static_cast<int64_t>(file.size() - 8 - n);
  for (const auto& [key, value] : root.items()) {
    if (key == "__metadata__") {
      if (!value.is_object()) return invalid_argument(p + ": `__metadata__` is not an object");
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string()) {
          return invalid_argument(p + ": `__metadata__." + mk + "` is not a string");
        }
        header.metadata[mk] = mv.get<std::string>();
      }
      continue;
    }
    DSERVE_ASSIGN_OR_RETURN(TensorInfo info, parse_entry(key, value, p, data_size));
    header.tensors.push_back(std::move(info));
  }
  // root.items() iterates in key order, so `tensors` is sorted by name already.
  std::vector<const TensorInfo*> by_offset;
  for (const auto& t : header.tensors) {
    if (t.byte_size() > 0) by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TensorInfo& a = *by_offset[i - 1];
    const TensorInfo& b = *by_offset[i];
    if (b.begin < a.end) {
      return invalid_argument(where(p, b.name) + ": bytes [" + std::to_string(b.begin) + ", " +
                              std::to_string(b.end) + ") overlap tensor `" + a.name + "` [" +
                              std::to_string(a.begin) + ", " + std::to_string(a.end) + ")");
    }
  }
  return header;
}

Result<std::unique_ptr<SafetensorsFile>> SafetensorsFile::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    const std::string msg = path + ": cannot open: " + std::strerror(err);
    return err == ENOENT ? not_found(msg) : unavailable(msg);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return internal_error(path + ": cannot stat: " + std::strerror(errno));
  }
  const auto size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return data_loss(path + ": file is " + std::to_string(size) +
                     " bytes, shorter than the 8-byte header length");
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);  // the mapping keeps the file open
  if (map == MAP_FAILED) return internal_error(path + ": mmap failed: " + std::strerror(errno));
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->map_ = static_cast<const uint8_t*>(map);
  f->size_ = size;
  DSERVE_ASSIGN_OR_RETURN(f->header_, parse_safetensors({f->map_, f->size_}, path));
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(const_cast<uint8_t*>(map_), size_);
}

std::span<const uint8_t> SafetensorsFile::bytes(const TensorInfo& info) const {
  const auto start = static_cast<size_t>(header_.data_offset + info.begin);
  DSERVE_CHECK(start + static_cast<size_t>(info.byte_size()) <= size_);
  return {map_ + start, static_cast<size_t>(info.byte_size())};
}

Result<SafetensorsSet> SafetensorsSet::open_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  SafetensorsSet set;
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single = fs::path(dir) / "model.safetensors";
  std::error_code ec;
  if (fs::exists(index, ec)) {
    set.source_ = index.string();
    std::ifstream in(index, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    if (!in) return unavailable(set.source_ + ": cannot read");
    json root;
    try {
      root = json::parse(ss.str());
    } catch (const json::exception& e) {
      return invalid_argument(set.source_ + ": malformed JSON: " + e.what());
    }
    const auto wm = root.is_object() ? root.find("weight_map") : root.end();
    if (wm == root.end() || !wm->is_object()) {
      return invalid_argument(set.source_ + ": no `weight_map` object");
    }
    std::map<std::string, size_t> file_ids;
    std::vector<std::pair<std::string, size_t>> placed;
    for (const auto& [name, file] : wm->items()) {
      if (!file.is_string()) {
        return invalid_argument(set.source_ + ": weight_map entry `" + name + "` is not a string");
      }
      const auto fname = file.get<std::string>();
      auto it = file_ids.find(fname);
      if (it == file_ids.end()) {
        DSERVE_ASSIGN_OR_RETURN(auto f, SafetensorsFile::open((fs::path(dir) / fname).string()));
        it = file_ids.emplace(fname, set.files_.size()).first;
        set.files_.push_back(std::move(f));
      }
      placed.emplace_back(name, it->second);
    }
    for (const auto& [name, id] : placed) {
      if (set.files_[id]->find(name) == nullptr) {
        return data_loss(set.source_ + ": tensor `" + name + "` is placed in " +
                         set.files_[id]->path() + ", which lacks it");
      }
    }
  } else if (fs::exists(single, ec)) {
    set.source_ = single.string();
    DSERVE_ASSIGN_OR_RETURN(auto f, SafetensorsFile::open(set.source_));
    set.files_.push_back(std::move(f));
  } else {
    return not_found(dir + ": no model.safetensors or model.safetensors.index.json");
  }
  for (const auto& f : set.files_) {
    for (const auto& t : f->header().tensors) {
      const auto [it, inserted] = set.entries_.emplace(t.name, Entry{f.get(), &t});
      if (!inserted) {
        return invalid_argument(set.source_ + ": tensor `" + t.name + "` is in both " +
                                it->second.file->path() + " and " + f->path());
      }
    }
  }
  return set;
}

std::optional<SafetensorsSet::Entry> SafetensorsSet::find(std::string_view name) const {
  const auto it = entries_.find(std::string(name));
  if (it == entries_.end()) return std::nullopt;
  return it->second;
}

}  // namespace dserve::model
