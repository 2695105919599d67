#pragma once
// Added tokens (tokenizer.json "added_tokens": <｜User｜>, <｜end▁of▁sentence｜>, ...): found in
// the text before pre-tokenization, leftmost first and longest at each place, as HF tokenizers
// and the JS oracle do, and emitted as their own ids.

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace dserve::tokenizer::detail {

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool lstrip = false;  // swallow whitespace to the left
  bool rstrip = false;  // swallow whitespace to the right
  bool special = false;
};

// A section of the text: an added token (`token` >= 0, index into tokens()) or plain text.
struct TextSection {
  size_t begin = 0;
  size_t end = 0;
  int32_t token = -1;
};

class AddedTokenSplitter {
 public:
  AddedTokenSplitter() = default;
  explicit AddedTokenSplitter(std::vector<AddedToken> tokens);

  // Cuts valid UTF-8 `text` into sections, in order. Plain sections are never empty, except
  // that lstrip/rstrip may trim one to nothing.
  void split(std::string_view text, std::vector<TextSection>& sections) const;

  const std::vector<AddedToken>& tokens() const { return tokens_; }

 private:
  struct Node {
    std::vector<std::pair<uint8_t, int32_t>> children;  // byte -> node index, sorted
    int32_t token = -1;                                 // token ending here
  };
  int32_t child(int32_t node, uint8_t byte) const;
  // Index of the longest token that starts at text[pos], or -1; sets `len` to its size.
  int32_t longest_at(std::string_view text, size_t pos, size_t& len) const;

  std::vector<AddedToken> tokens_;
  std::vector<Node> trie_{Node{}};
  std::array<bool, 256> starts_token_{};
};

}  // namespace dserve::tokenizer::detail
