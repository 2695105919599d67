#include "dserve/model/state_packing.h"

#include <xxhash.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "dserve/core/check.h"

namespace dserve::model {
namespace {

constexpr char kMagic[4] = {'D', 'S', 'R', 'S'};
// The hand-off's small part (pack_state_without_rows): the same format with every row array
// empty; another magic, so that neither is ever taken for the other.
constexpr char kMagicWithoutRows[4] = {'D', 'S', 'R', 'W'};
constexpr uint32_t kVersion = 2;

// The shapes a state of this model has: two models with equal digests have interchangeable
// states.
uint64_t shape_digest(const ModelConfig& c) {
  std::vector<int64_t> words{
      c.num_layers, c.head_dim, c.index_head_dim, c.sliding_window,
      c.csa_rate,   c.hca_rate, c.rope_head_dim,  1000 + static_cast<int64_t>(c.kv_dtype)};
  for (AttentionKind k : c.layer_types)
    words.push_back(static_cast<int64_t>(k));
  return XXH3_64bits(words.data(), words.size() * sizeof(int64_t));
}

// How a window's rows are packed: fp32, or with fp8 KV as fp8 entries (the values it holds).
kvstore::RowFormat window_format(const ModelConfig& c) {
  return kvstore::RowFormat::entry(c.kv_dtype, c.head_dim, c.rope_head_dim);
}

class Writer {
 public:
  void u32(uint32_t v) { raw(&v, sizeof(v)); }
  void u64(uint64_t v) { raw(&v, sizeof(v)); }
  void floats(const float* data, size_t n) {
    u64(n);
    raw(data, n * sizeof(float));
  }
  void floats(const std::vector<float>& v) { floats(v.data(), v.size()); }
  // A window: floats in fp32; with fp8 KV its rows as fp8 entries (byte count, then the rows),
  // which give back the same values (the window holds values of that format).
  void window(const std::vector<float>& v, const kvstore::RowFormat& f) {
    if (f.encoding == kvstore::RowEncoding::kFp32) {
      floats(v);
      return;
    }
    const auto rows = static_cast<int64_t>(v.size()) / f.width;
    std::vector<std::byte> encoded(static_cast<size_t>(rows * f.row_bytes()));
    kvstore::encode_rows(f, v.data(), rows, encoded.data());
    u64(encoded.size());
    raw(encoded.data(), encoded.size());
  }
  // The rows as their pages hold them (fp32, or encoded): byte count, then the bytes.
  void rows(const kvstore::PagedRows& r) {
    const int64_t row_bytes = r.attached() ? r.format().row_bytes() : 0;
    u64(static_cast<uint64_t>(r.rows() * row_bytes));
    const int64_t per = r.rows_per_page();
    for (int64_t i = 0; i < r.rows(); i += per) {
      raw(r.encoded_row(i), static_cast<size_t>(std::min(per, r.rows() - i) * row_bytes));
    }
  }
  void raw(const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    out.insert(out.end(), b, b + n);
  }
  std::vector<uint8_t> out;
};

class Reader {
 public:
  explicit Reader(std::span<const uint8_t> b) : bytes_(b) {}
  bool u32(uint32_t* v) { return raw(v, sizeof(*v)); }
  bool u64(uint64_t* v) { return raw(v, sizeof(*v)); }
  // An array of exactly `expected` floats (its stored count must say so).
  Status floats(std::vector<float>* v, uint64_t expected, const std::string& what) {
    DSERVE_ASSIGN_OR_RETURN(const uint8_t* at, sized(expected, sizeof(float), "floats", what));
    v->resize(static_cast<size_t>(expected));
    if (expected > 0) std::memcpy(v->data(), at, static_cast<size_t>(expected) * sizeof(float));
    return Status::ok();
  }
  // A window of `rows` rows as Writer::window wrote it.
  Status window(std::vector<float>* v, int64_t rows, const kvstore::RowFormat& f,
                const std::string& what) {
    if (f.encoding == kvstore::RowEncoding::kFp32) {
      return floats(v, static_cast<uint64_t>(rows * f.width), what);
    }
    DSERVE_ASSIGN_OR_RETURN(const uint8_t* at,
                            sized(static_cast<uint64_t>(rows * f.row_bytes()), 1, "bytes", what));
    v->resize(static_cast<size_t>(rows * f.width));
    kvstore::decode_rows(f, reinterpret_cast<const std::byte*>(at), rows, v->data());
    return Status::ok();
  }
  // `count` rows in the format of `rows`' pool, appended to it (a stored byte count must say
  // exactly that many).
  Status encoded_rows(kvstore::PagedRows& rows, int64_t count, const std::string& what) {
    const int64_t row_bytes = rows.attached() ? rows.format().row_bytes() : 0;
    DSERVE_ASSIGN_OR_RETURN(const uint8_t* at,
                            sized(static_cast<uint64_t>(count * row_bytes), 1, "bytes", what));
    if (count > 0) rows.append_encoded(reinterpret_cast<const std::byte*>(at), count);
    return Status::ok();
  }
  bool raw(void* p, size_t n) {
    if (bytes_.size() - at_ < n) return false;
    std::memcpy(p, bytes_.data() + at_, n);
    at_ += n;
    return true;
  }
  size_t remaining() const { return bytes_.size() - at_; }

 private:
  // A stored count that must be exactly `expected` items of `item_bytes` (`unit` names them in
  // the error), then those items: where they start; the reader moves past them.
  Result<const uint8_t*> sized(uint64_t expected, size_t item_bytes, const char* unit,
                               const std::string& what) {
    uint64_t n = 0;
    if (!u64(&n)) return data_loss("packed state ends inside " + what);
    if (n != expected) {
      return data_loss("packed state: " + what + " holds " + std::to_string(n) + " " + unit +
                       ", expected " + std::to_string(expected));
    }
    if (n > (bytes_.size() - at_) / item_bytes) {
      return data_loss("packed state ends inside " + what);
    }
    const uint8_t* at = bytes_.data() + at_;
    at_ += static_cast<size_t>(n) * item_bytes;
    return at;
  }

  std::span<const uint8_t> bytes_;
  size_t at_ = 0;
};

void write_compressor(Writer& w, const CompressorState& c) {
  w.u64(static_cast<uint64_t>(c.entries));
  w.floats(c.pending_kv);
  w.floats(c.pending_gate);
  w.floats(c.overlap_kv);
  w.floats(c.overlap_gate);
}

}  // namespace

namespace {

std::vector<uint8_t> pack(const ModelConfig& config, const RequestState& state, bool rows) {
  DSERVE_CHECK_MSG(static_cast<int64_t>(state.layers().size()) == config.num_layers,
                   "pack_state of a state of another model");
  Writer w;
  w.raw(rows ? kMagic : kMagicWithoutRows, sizeof(kMagic));
  w.u32(kVersion);
  w.u64(static_cast<uint64_t>(state.position()));
  w.u64(static_cast<uint64_t>(config.num_layers));
  w.u64(shape_digest(config));
  const auto window = window_format(config);
  for (const LayerState& s : state.layers()) {
    w.window(s.window, window);
    if (rows) {
      w.rows(s.compressed);
      w.rows(s.index_keys);
    } else {
      w.u64(0);
      w.u64(0);
    }
    write_compressor(w, s.kv_compressor);
    write_compressor(w, s.index_compressor);
  }
  w.u64(XXH3_64bits(w.out.data(), w.out.size()));
  return std::move(w.out);
}

size_t packed_bytes(const ModelConfig& config, int64_t position, bool with_rows) {
  DSERVE_CHECK_MSG(position >= 0, "packed_state_bytes of a negative position");
  constexpr uint64_t kCount = sizeof(uint64_t);  // every array is preceded by its size
  auto floats = [](int64_t n) { return kCount + static_cast<uint64_t>(n) * sizeof(float); };
  auto paged = [with_rows](int64_t n, const kvstore::RowFormat& f) {
    return kCount + (with_rows ? static_cast<uint64_t>(n * f.row_bytes()) : 0);
  };
  auto rows = [](int64_t n, const kvstore::RowFormat& f) {
    return kCount + static_cast<uint64_t>(n * f.row_bytes());
  };
  const auto window = window_format(config);
  const auto entry =
      kvstore::RowFormat::entry(config.kv_dtype, config.head_dim, config.rope_head_dim);
  const auto key = kvstore::RowFormat::index_key(config.kv_dtype, config.index_head_dim);
  // A compressor as write_compressor writes it (the shapes RequestState's constructor gives).
  auto compressor = [&](int64_t width, int64_t series, int64_t rate) {
    const int64_t closed = rate > 0 ? position / rate : 0;
    const int64_t pending = rate > 0 ? position % rate : 0;
    const int64_t overlap = series == 2 && closed > 0 ? rate * width : 0;
    return sizeof(uint64_t) + 2 * floats(pending * series * width) + 2 * floats(overlap);
  };
  uint64_t bytes = sizeof(kMagic) + sizeof(uint32_t) + 3 * sizeof(uint64_t);
  for (AttentionKind kind : config.layer_types) {
    const int64_t rate = config.compress_rate(kind);
    const int64_t entries = rate > 0 ? position / rate : 0;
    bytes += rows(std::min<int64_t>(position, config.sliding_window - 1), window);
    bytes += paged(entries, entry);
    if (kind == AttentionKind::kCompressed) {
      bytes += paged(entries, key);
      bytes += compressor(config.head_dim, 2, rate) + compressor(config.index_head_dim, 2, rate);
    } else if (kind == AttentionKind::kHeavy) {
      bytes += floats(0) + compressor(config.head_dim, 1, rate) + compressor(0, 1, 0);
    } else {
      bytes += floats(0) + 2 * compressor(0, 1, 0);
    }
  }
  return static_cast<size_t>(bytes + sizeof(uint64_t));  // the trailing checksum
}

Result<RequestState> unpack(const ModelConfig& config, const KvPagePools& pools,
                            std::span<const uint8_t> bytes, bool with_rows) {
  if (bytes.size() < sizeof(kMagic) + 4 + size_t{3} * 8 + 8) {
    return data_loss("packed state of " + std::to_string(bytes.size()) + " bytes is too short");
  }
  const size_t body = bytes.size() - sizeof(uint64_t);
  uint64_t checksum = 0;
  std::memcpy(&checksum, bytes.data() + body, sizeof(checksum));
  if (checksum != XXH3_64bits(bytes.data(), body)) {
    return data_loss("packed state: checksum mismatch (" + std::to_string(bytes.size()) +
                     " bytes)");
  }
  Reader r(bytes.first(body));
  char magic[4];
  uint32_t version = 0;
  uint64_t position = 0, layers = 0, digest = 0;
  r.raw(magic, sizeof(magic));
  r.u32(&version);
  r.u64(&position);
  r.u64(&layers);
  r.u64(&digest);
  if (std::memcmp(magic, with_rows ? kMagic : kMagicWithoutRows, sizeof(kMagic)) != 0) {
    return data_loss(with_rows ? "packed state: bad magic"
                               : "packed state without rows: bad magic");
  }
  if (version != kVersion) {
    return data_loss("packed state: format version " + std::to_string(version) + ", expected " +
                     std::to_string(kVersion));
  }
  if (layers != static_cast<uint64_t>(config.num_layers) || digest != shape_digest(config)) {
    return data_loss("packed state: made by a model of other shapes (" + std::to_string(layers) +
                     " layers)");
  }
  const auto pos = static_cast<int64_t>(position);
  const auto window_rows_format = window_format(config);
  RequestState state(config, pools);
  state.advance(pos);
  for (size_t l = 0; l < state.layers().size(); ++l) {
    LayerState& s = state.layers()[l];
    const std::string at = "layer " + std::to_string(l) + " ";
    const int64_t window = std::min<int64_t>(pos, config.sliding_window - 1);
    DSERVE_RETURN_IF_ERROR(r.window(&s.window, window, window_rows_format, at + "window"));
    const int64_t rate = config.compress_rate(s.kind);
    const int64_t entries = rate > 0 ? pos / rate : 0;
    const int64_t index_entries = s.index_keys.attached() ? entries : 0;
    DSERVE_RETURN_IF_ERROR(
        r.encoded_rows(s.compressed, with_rows ? entries : 0, at + "compressed entries"));
    DSERVE_RETURN_IF_ERROR(
        r.encoded_rows(s.index_keys, with_rows ? index_entries : 0, at + "indexer keys"));
    for (CompressorState* c : {&s.kv_compressor, &s.index_compressor}) {
      const std::string what = at + (c == &s.kv_compressor ? "kv" : "indexer") + " compressor";
      uint64_t closed = 0;
      if (!r.u64(&closed)) return data_loss("packed state ends inside " + what);
      const int64_t expect_closed = c->rate > 0 ? pos / c->rate : 0;
      if (static_cast<int64_t>(closed) != expect_closed) {
        return data_loss("packed state: " + what + " closed " + std::to_string(closed) +
                         " windows, expected " + std::to_string(expect_closed));
      }
      c->entries = expect_closed;
      const int64_t pending = c->rate > 0 ? pos % c->rate : 0;
      const int64_t row = c->series * c->width;
      DSERVE_RETURN_IF_ERROR(
          r.floats(&c->pending_kv, static_cast<uint64_t>(pending * row), what + " pending kv"));
      DSERVE_RETURN_IF_ERROR(
          r.floats(&c->pending_gate, static_cast<uint64_t>(pending * row), what + " pending gate"));
      const int64_t overlap = c->series == 2 && expect_closed > 0 ? c->rate * c->width : 0;
      DSERVE_RETURN_IF_ERROR(
          r.floats(&c->overlap_kv, static_cast<uint64_t>(overlap), what + " overlap kv"));
      DSERVE_RETURN_IF_ERROR(
          r.floats(&c->overlap_gate, static_cast<uint64_t>(overlap), what + " overlap gate"));
    }
  }
  if (r.remaining() != 0) {
    return data_loss("packed state: " + std::to_string(r.remaining()) + " bytes left over");
  }
  return state;
}

}  // namespace

std::vector<uint8_t> pack_state(const ModelConfig& config, const RequestState& state) {
  return pack(config, state, true);
}

size_t packed_state_bytes(const ModelConfig& config, int64_t position) {
  return packed_bytes(config, position, true);
}

Result<RequestState> unpack_state(const ModelConfig& config, const KvPagePools& pools,
                                  std::span<const uint8_t> bytes) {
  return unpack(config, pools, bytes, true);
}

std::vector<uint8_t> pack_state_without_rows(const ModelConfig& config, const RequestState& state) {
  return pack(config, state, false);
}

size_t packed_state_without_rows_bytes(const ModelConfig& config, int64_t position) {
  return packed_bytes(config, position, false);
}

Result<RequestState> unpack_state_without_rows(const ModelConfig& config, const KvPagePools& pools,
                                               std::span<const uint8_t> bytes) {
  return unpack(config, pools, bytes, false);
}

}  // namespace dserve::model
