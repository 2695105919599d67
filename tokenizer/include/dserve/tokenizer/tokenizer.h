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

namespace dserve::tokenizer {

namespace detail {
struct TokenizerState;
}  // namespace detail

// An immutable tokenizer. Cheap to copy (copies share the loaded tables); all methods are
// const and safe to call from many threads at once.
// Whether text that spells an added token (the special ones such as "<｜end▁of▁sentence｜>"
// and the chat and tool control tokens such as "<｜User｜>", which DeepSeek's tokenizer.json
// does not mark special) becomes that token. Text from users is kAsText: it is encoded as the
// characters it is (tiktoken's encode_ordinary), so nobody can forge a turn of the chat
// template; only the template itself inserts those tokens (encode_chat).
enum class SpecialTokens { kRecognize, kAsText };

class Tokenizer {
 public:
  // Reads and validates `tokenizer_json_path`. NotFound when the file cannot be opened,
  // InvalidArgument when it is not JSON or lacks a required field (the message names the
  // path and the field), Unimplemented for a component this tokenizer does not support.
  static Result<Tokenizer> load(const std::string& tokenizer_json_path);

  // Text -> ids. Added tokens in the text (e.g. "<｜User｜>") become their own id, as HF
  // does, unless `special` is kAsText; no BOS/EOS is added. InvalidArgument naming the byte
  // offset when `text` is not valid UTF-8.
  Result<std::vector<int32_t>> encode(std::string_view text,
                                      SpecialTokens special = SpecialTokens::kRecognize) const;

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

// The ids of that same prompt with the messages' content encoded as text
// (SpecialTokens::kAsText): special tokens come from the template only. Where no content spells
// a special token, the ids equal encode(apply_chat_template(...)). Errors as for encode, and
// InvalidArgument when the tokenizer lacks one of the template's special tokens.
Result<std::vector<int32_t>> encode_chat(const Tokenizer& tokenizer,
                                         std::span<const ChatMessage> messages,
                                         bool add_generation_prompt);

// A text prompt as every entry point (gRPC, OpenAI completions, `dserve generate`) encodes it:
// with `chat`, one user message in the chat template, ready for the answer (encode_chat);
// otherwise `bos_id` and then the text, encoded as text. Errors as for encode_chat.
Result<std::vector<int32_t>> encode_prompt(const Tokenizer& tokenizer, std::string_view text,
                                           bool chat, int32_t bos_id);

// Where the tokenizer.json is: $DSERVE_TOKENIZER_JSON when set and non-empty, otherwise the
// copy in the oracle package under `source_dir` (the dserve checkout), installed by
// scripts/install-deps.sh. The file is not opened; Tokenizer::load reports a missing file.
std::string default_tokenizer_json_path(std::string_view source_dir);

}  // namespace dserve::tokenizer
