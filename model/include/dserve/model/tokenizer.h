#pragma once
// DeepSeek's byte-level BPE tokenizer, read from a Hugging Face `tokenizer.json`, and the
// DeepSeek chat format. Encoding agrees id for id with the `@lenml/tokenizers` JavaScript
// tokenizer (the test oracle, tools/tokenizer-oracle/), which follows HF `tokenizers`.
//
// Supported `tokenizer.json` shape (anything else is refused by `load` with Unimplemented):
// normalizer null or an empty Sequence; pre_tokenizer a Sequence of Split (Regex, Isolated)
// and ByteLevel (no prefix space); model BPE without dropout, unk token or suffixes;
// decoder ByteLevel; added tokens without `single_word`.

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "dserve/core/status.h"

namespace dserve::model {

namespace detail {
struct TokenizerState;
}  // namespace detail

// An immutable tokenizer. Cheap to copy (copies share the loaded tables); all methods are
// const and safe to call from many threads at once.
class Tokenizer {
 public:
  // Reads and validates `tokenizer_json_path`. NotFound when the file cannot be opened,
  // InvalidArgument when it is not JSON or lacks a required field (the message names the
  // path and the field), Unimplemented for a component this tokenizer does not support.
  static Result<Tokenizer> load(const std::string& tokenizer_json_path);

  // Text -> ids. Added tokens in the text (e.g. "<｜User｜>") become their own id, as HF
  // does; no BOS/EOS is added. InvalidArgument naming the byte offset when `text` is not
  // valid UTF-8.
  Result<std::vector<int32_t>> encode(std::string_view text) const;

  // Ids -> text. Byte sequences that are not valid UTF-8 (e.g. a character cut at the end)
  // become U+FFFD, as HF does. OutOfRange naming the id and the vocabulary size when an id
  // is negative or >= vocab_size().
  Result<std::string> decode(std::span<const int32_t> ids) const;

  // The raw bytes one token stands for. May be part of a UTF-8 character: stream through
  // StreamDecoder to get complete characters. OutOfRange as for decode().
  Result<std::string> token_bytes(int32_t id) const;

  // Number of ids, added tokens included (ids are 0 .. vocab_size()-1).
  int64_t vocab_size() const;
  int32_t bos_id() const;  // <｜begin▁of▁sentence｜>
  int32_t eos_id() const;  // <｜end▁of▁sentence｜>
  // The id of a token given in its vocabulary spelling (byte-level, e.g. "Ġthe") or the
  // content of an added token; nullopt when there is none.
  std::optional<int32_t> token_to_id(std::string_view token) const;

 private:
  explicit Tokenizer(std::shared_ptr<const detail::TokenizerState> state);
  std::shared_ptr<const detail::TokenizerState> state_;
};

// Turns a stream of ids into text that only ever contains complete UTF-8 characters: the
// bytes of a character split across tokens are held back until the character is complete.
// Holds a reference to the tokenizer, which must outlive it. One per stream; not thread-safe.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer) : tokenizer_(&tokenizer) {}

  // Adds one id; returns the newly completed text (possibly empty). Invalid bytes become
  // U+FFFD. OutOfRange for an id outside the vocabulary (the stream is unchanged).
  Result<std::string> push(int32_t id);
  // Ends the stream: returns what is still held (an incomplete character becomes U+FFFD)
  // and resets the decoder.
  std::string flush();
  // Bytes held back waiting for the rest of a character (at most 3).
  size_t pending_bytes() const { return pending_.size(); }

 private:
  const Tokenizer* tokenizer_;
  std::string pending_;
};

struct ChatMessage {
  std::string role;  // "system", "user", "assistant" or "tool"
  std::string content;
};

// The DeepSeek chat format of the package's tokenizer_config.json chat_template:
// "<｜begin▁of▁sentence｜>" + the system messages joined by "\n\n", then per message
// "<｜User｜>{content}" or "<｜Assistant｜>{content}<｜end▁of▁sentence｜>" (tool results as
// "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>...<｜tool▁output▁end｜>"); with
// `add_generation_prompt` it ends with "<｜Assistant｜>". Other roles add nothing, as in the
// template. Encode the result with Tokenizer::encode (it already starts with BOS).
std::string apply_chat_template(std::span<const ChatMessage> messages, bool add_generation_prompt);

// Where the tokenizer.json is: $DSERVE_TOKENIZER_JSON when set and non-empty, otherwise the
// copy in the oracle package under `source_dir` (the dserve checkout), installed by
// scripts/install-deps.sh. The file is not opened; Tokenizer::load reports a missing file.
std::string default_tokenizer_json_path(std::string_view source_dir);

}  // namespace dserve::model
