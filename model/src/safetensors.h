#pragma once
// safetensors files (internal to model/): a validating, memory-mapped reader of one file, a
// reader of a checkpoint directory (one `model.safetensors` or shards listed by
// `model.safetensors.index.json`), and a streaming writer with deterministic bytes.
//
// File layout: 8-byte little-endian header length N, N bytes of JSON
// {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ...,
//  "__metadata__": {"k": "v"}}, then the data section; offsets are relative to its start.

#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "dserve/core/status.h"
#include "number_formats.h"

namespace dserve::model {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  int64_t begin = 0;  // byte offsets in the data section
  int64_t end = 0;

  int64_t numel() const;
  int64_t byte_size() const { return end - begin; }
};

std::string shape_to_string(const std::vector<int64_t>& shape);

struct SafetensorsHeader {
  std::vector<TensorInfo> tensors;  // sorted by name
  std::map<std::string, std::string> metadata;
  int64_t data_offset = 0;  // 8 + header length: where the data section starts in the file

  const TensorInfo* find(std::string_view name) const;
};

// Hard limit on the JSON header, as in the reference implementation (100 MB).
inline constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// Parses and validates the header of the file image `file` (the whole file: the data section
// is checked against its size). Every failure is a Status naming `path` and, where there is
// one, the tensor: header length past the end, malformed JSON, unknown dtype, bad shape,
// offsets outside the data section or reversed, byte size != numel * dtype size, overlapping
// tensors, duplicate names. Gaps between tensors are allowed. Never throws, never reads
// outside `file`.
Result<SafetensorsHeader> parse_safetensors(std::span<const uint8_t> file, std::string_view path);

// One memory-mapped, validated file. Immutable after open; safe to read from many threads.
class SafetensorsFile {
 public:
  static Result<std::unique_ptr<SafetensorsFile>> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const SafetensorsHeader& header() const { return header_; }
  const TensorInfo* find(std::string_view name) const { return header_.find(name); }
  // The tensor's bytes inside the mapping (valid while this object lives).
  std::span<const uint8_t> bytes(const TensorInfo& info) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  const uint8_t* map_ = nullptr;
  size_t size_ = 0;
  SafetensorsHeader header_;
};

// All tensors of a checkpoint directory. Immutable after open; thread-safe to read.
class SafetensorsSet {
 public:
  struct Entry {
    const SafetensorsFile* file;
    const TensorInfo* info;
  };
  // Opens `<dir>/model.safetensors.index.json` (and every shard its weight_map names) when it
  // exists, else `<dir>/model.safetensors`. Errors: neither exists (NotFound), an invalid
  // file, a tensor the index places in a shard that lacks it, a tensor in two shards.
  static Result<SafetensorsSet> open_dir(const std::string& dir);

  std::optional<Entry> find(std::string_view name) const;
  bool contains(std::string_view name) const { return find(name).has_value(); }
  // The index file or the single file: where "a tensor is missing" was looked for.
  const std::string& source() const { return source_; }
  size_t size() const { return entries_.size(); }

 private:
  std::string source_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::unordered_map<std::string, Entry> entries_;
};

// One tensor to write: its name, type and shape (offsets are assigned by the writer).
struct TensorDecl {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
};

// Header bytes (length prefix included) for `decls` laid out contiguously in name order: the
// JSON has sorted keys and no spaces, padded with spaces to a multiple of 8 bytes, so equal
// inputs give equal bytes. Fills `layout` with the tensors and their offsets, sorted by name.
// Precondition: names are unique.
std::string safetensors_header_bytes(const std::vector<TensorDecl>& decls,
                                     const std::map<std::string, std::string>& metadata,
                                     std::vector<TensorInfo>* layout);

// Streams one file: the header at creation, then the tensors' bytes in name order (in any
// number of append calls), then finish(). Not thread-safe. The file is written to
// `<path>.partial` and renamed on finish, so a failed write leaves no truncated file.
class SafetensorsWriter {
 public:
  static Result<SafetensorsWriter> create(const std::string& path,
                                          const std::vector<TensorDecl>& decls,
                                          const std::map<std::string, std::string>& metadata);
  SafetensorsWriter(SafetensorsWriter&&) noexcept;
  SafetensorsWriter& operator=(SafetensorsWriter&&) noexcept;
  ~SafetensorsWriter();

  const std::vector<TensorInfo>& layout() const { return layout_; }  // sorted, with offsets
  Status append(std::span<const uint8_t> bytes);
  // Errors when fewer or more bytes than the layout needs were appended, or on I/O failure.
  Status finish();

 private:
  SafetensorsWriter() = default;
  std::string path_;
  std::FILE* file_ = nullptr;
  std::vector<TensorInfo> layout_;
  int64_t data_bytes_ = 0;
  int64_t written_ = 0;
};

// Writes a whole file from in-memory tensors (tests, small files).
Status write_safetensors(const std::string& path,
                         const std::vector<std::pair<TensorDecl, std::vector<uint8_t>>>& tensors,
                         const std::map<std::string, std::string>& metadata = {});

}  // namespace dserve::model
