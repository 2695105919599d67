#pragma once
// Pre-tokenization: the Split steps of tokenizer.json's pre_tokenizer, each a regex that cuts
// every piece into matches and the gaps between them ("Isolated"), applied in order. The
// regexes are written for JavaScript/Oniguruma; they are translated to PCRE2 (UTF mode, JIT)
// with JavaScript's meaning of \s, \S, \uXXXX and '.', so they split as the JS oracle does.

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "dserve/core/status.h"

namespace dserve::tokenizer::detail {

// A piece of the text being tokenized: [begin, end) in bytes.
struct TextSpan {
  size_t begin = 0;
  size_t end = 0;
};

// Rewrites a JavaScript regex into PCRE2 syntax with the same meaning (see file comment).
// Unimplemented for a construct it cannot carry over (\S inside a character class).
Result<std::string> translate_js_regex(std::string_view pattern);

// One compiled Split pattern. Immutable after construction; matching is thread-safe (the
// match scratch is per thread).
class RegexSplit {
 public:
  // `pattern` is in JavaScript syntax. InvalidArgument when it does not compile.
  static Result<RegexSplit> compile(std::string_view pattern);

  // Appends the pieces of text[piece] to `out`: each match and each non-empty gap, in order.
  // `text` must be valid UTF-8. Internal when PCRE2 fails (e.g. a resource limit).
  Status split(std::string_view text, TextSpan piece, std::vector<TextSpan>& out) const;

 private:
  struct Code;
  explicit RegexSplit(std::shared_ptr<const Code> code) : code_(std::move(code)) {}
  std::shared_ptr<const Code> code_;
};

// The pattern HF's ByteLevel pre-tokenizer uses when `use_regex` is true (GPT-2's).
inline constexpr std::string_view kGpt2SplitPattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// The Split steps in order.
class PreTokenizer {
 public:
  void add(RegexSplit split) { splits_.push_back(std::move(split)); }
  // Replaces `words` with the words of text[section]. Internal as for RegexSplit::split.
  Status split(std::string_view text, TextSpan section, std::vector<TextSpan>& words) const;

 private:
  std::vector<RegexSplit> splits_;
};

}  // namespace dserve::tokenizer::detail
