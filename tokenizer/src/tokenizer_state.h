#pragma once
// Everything a loaded Tokenizer holds. Built once by the loader (tokenizer_json.cc), then
// shared read-only by all copies of the Tokenizer.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "dserve/core/status.h"
#include "tokenizer_added.h"
#include "tokenizer_bpe.h"
#include "tokenizer_pre.h"

namespace dserve::tokenizer::detail {

struct TokenizerState {
  AddedTokenSplitter added;
  PreTokenizer pre_tokenizer;
  std::optional<BpeModel> bpe;        // always set once loaded
  std::vector<std::string> id_bytes;  // id -> the bytes it decodes to
  StringIdMap vocab;                  // vocabulary spelling -> id
  StringIdMap added_ids;              // added token content -> id
  int32_t bos_id = -1;
  int32_t eos_id = -1;
};

// Parses a tokenizer.json document (already read into memory; `path` only names it in
// errors). Errors as documented for Tokenizer::load.
Result<TokenizerState> parse_tokenizer_json(std::string_view json_text, std::string_view path);

}  // namespace dserve::tokenizer::detail
