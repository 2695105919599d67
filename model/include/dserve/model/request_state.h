#pragma once
// RequestState: everything the model remembers about one request between forward calls,
// kept as the explicit pools of MODEL-V4.md ("The decode-time state of one request") so that
// later stages can page, copy, ship and snapshot each pool on its own:
//   - the sliding window (last sliding_window - 1 tokens' kv, every layer),
//   - the compressed entries (CSA and HCA layers; prefix-shareable per window),
//   - the indexer keys (CSA layers; prefix-shareable per window),
//   - the compressor state: pending tokens of the open window and, for the overlapping CSA
//     compressors, the previous window's Ca series (snapshot-only state).
// Owned by one request; not thread-safe. Moves are cheap; copies are deep (a snapshot).

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "dserve/kvstore/page_pool.h"
#include "dserve/model/config.h"

namespace dserve::model {

// State of one window compressor: a layer's KV compressor or its indexer's compressor.
struct CompressorState {
  int64_t width = 0;              // channels of one compressed entry
  int64_t series = 1;             // 2 for overlapping (CSA) compressors: [Ca | Cb] per token
  int64_t rate = 0;               // tokens per window
  int64_t entries = 0;            // windows closed so far; the next window starts at entries * rate
  std::vector<float> pending_kv;  // [pending_tokens, series * width] projected kv
  std::vector<float> pending_gate;  // [pending_tokens, series * width] projected gate, no bias
  std::vector<float> overlap_kv;    // CSA: [rate, width] Ca of the last closed window
  std::vector<float> overlap_gate;  // CSA: [rate, width] its gate with the position bias added

  int64_t pending_tokens() const {
    return width == 0 ? 0 : static_cast<int64_t>(pending_kv.size()) / (series * width);
  }
  bool has_overlap() const { return !overlap_kv.empty(); }
};

struct LayerState {
  AttentionKind kind = AttentionKind::kSliding;
  int64_t head_dim = 0;
  int64_t index_head_dim = 0;
  // Pool 1 -- sliding window: kv of the last min(position, sliding_window - 1) tokens,
  // oldest first, [window_tokens, head_dim], RoPE applied.
  std::vector<float> window;
  // Pool 2 -- compressed entries, [entries, head_dim], RoPE applied at each window's start;
  // paged, one page per 128-token block (kvstore::PagedRows).
  kvstore::PagedRows compressed;
  // Pool 3 -- indexer keys (CSA only), [entries, index_head_dim], RoPE applied; paged.
  kvstore::PagedRows index_keys;
  // Snapshot-only compressor state.
  CompressorState kv_compressor;
  CompressorState index_compressor;

  int64_t window_tokens() const {
    return head_dim == 0 ? 0 : static_cast<int64_t>(window.size()) / head_dim;
  }
  int64_t compressed_entries() const { return compressed.rows(); }
};

// The state of the MTP block (speculative decoding) beside a request's: the block's sliding
// window, and the inputs of its rows still to run. The block's row at position q reads the main
// model's hidden state at q - 1 (before the final norm) and the token at q; those rows run when
// the engine drafts (Engine::draft), because the token after the last position is known only
// once it is sampled. The block attends over a sliding window only, and a row's key is a
// function of that row alone, so only the last sliding_window rows ever matter: older inputs are
// dropped, and the window the block ends with is the one a run of every row would leave.
struct MtpState {
  LayerState layer;             // the block's layer: a sliding window
  int64_t next_position = 1;    // the position of the block's next row
  std::vector<float> hidden;    // [*, hidden]: the main model's states at next_position - 1 ..
  std::vector<int32_t> tokens;  // the tokens at next_position ..
};

// The page pools of one model: per layer, the pool of its compressed entries (CSA and HCA
// layers) and of its indexer keys (CSA layers); null where a layer has none. A page holds one
// 128-token block's rows (kBlockTokens / rate of them). Requests of a model and its prefix
// store share these pools, so pages move between them without copies.
struct KvPagePools {
  std::vector<std::shared_ptr<kvstore::PagePool>> compressed;
  std::vector<std::shared_ptr<kvstore::PagePool>> index_keys;

  static KvPagePools create(const ModelConfig& config);
  uint64_t bytes_in_use() const;
};

class RequestState {
 public:
  // A state whose pages come from `pools` (those of the model that will run it).
  RequestState(const ModelConfig& config, const KvPagePools& pools);
  // A state with pools of its own (tests, tools).
  explicit RequestState(const ModelConfig& config);
  // No model's state (no layers): a placeholder to assign a real one to. forward() refuses it.
  RequestState() = default;

  // Tokens consumed so far: the position the next token will take.
  int64_t position() const { return position_; }
  void advance(int64_t tokens) { position_ += tokens; }
  // Back to an earlier position (Model::rewind, after the pools are taken back).
  void rewind_position(int64_t position);

  // The MTP block's state, kept once enable_mtp() was called (an engine that drafts); mtp()
  // only then.
  bool has_mtp() const { return mtp_.has_value(); }
  MtpState& mtp();
  const MtpState& mtp() const;
  // Starts the block's state at this position: its first row will be the next position's.
  void enable_mtp(const ModelConfig& config);

  std::vector<LayerState>& layers() { return layers_; }
  const std::vector<LayerState>& layers() const { return layers_; }

  // Bytes held by each pool, for metrics and capacity planning.
  struct PoolBytes {
    size_t window = 0;
    size_t compressed = 0;
    size_t index_keys = 0;
    size_t compressor = 0;
  };
  PoolBytes pool_bytes() const;

 private:
  int64_t position_ = 0;
  std::vector<LayerState> layers_;
  std::optional<MtpState> mtp_;
};

}  // namespace dserve::model
