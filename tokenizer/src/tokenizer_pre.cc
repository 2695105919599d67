#include "tokenizer_pre.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <fmt/format.h>

#include "dserve/core/check.h"
#include "tokenizer_text.h"

namespace dserve::tokenizer::detail {
namespace {

// ECMA-262 WhiteSpace and LineTerminator, as the inside of a PCRE2 character class.
constexpr std::string_view kJsSpaceClass =
    R"(\t\n\x0B\f\r \x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}\x{FEFF})";
// JavaScript's '.' without the s flag: anything but a line terminator.
constexpr std::string_view kJsDot = R"([^\n\r\x{2028}\x{2029}])";

bool is_hex(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

std::string pcre2_message(int code) {
  PCRE2_UCHAR buffer[256];
  if (pcre2_get_error_message(code, buffer, sizeof(buffer)) < 0)
    return fmt::format("code {}", code);
  return std::string(reinterpret_cast<const char*>(buffer));
}

// Per-thread match scratch: PCRE2 match data and a JIT stack large enough for long runs of
// letters or spaces (the default 32 KiB machine stack is not).
struct MatchScratch {
  MatchScratch()
      : data(pcre2_match_data_create(1, nullptr)),
        context(pcre2_match_context_create(nullptr)),
        stack(pcre2_jit_stack_create(size_t{32} * 1024, size_t{64} * 1024 * 1024, nullptr)) {
    DSERVE_CHECK(data != nullptr && context != nullptr && stack != nullptr);
    pcre2_jit_stack_assign(context, nullptr, stack);
  }
  ~MatchScratch() {
    pcre2_jit_stack_free(stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(data);
  }
  MatchScratch(const MatchScratch&) = delete;
  MatchScratch& operator=(const MatchScratch&) = delete;

  pcre2_match_data* data;
  pcre2_match_context* context;
  pcre2_jit_stack* stack;
};

MatchScratch& match_scratch() {
  thread_local MatchScratch scratch;
  return scratch;
}

}  // namespace

struct RegexSplit::Code {
  ~Code() { pcre2_code_free(code); }
  pcre2_code* code = nullptr;
  bool jit = false;
};

Result<std::string> translate_js_regex(std::string_view pattern) {
  std::string out;
  out.reserve(pattern.size() + 64);
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char next = pattern[++i];
      if (next == 's') {
        out += in_class ? std::string(kJsSpaceClass) : fmt::format("[{}]", kJsSpaceClass);
      } else if (next == 'S') {
        if (in_class) return unimplemented("\\S inside a character class of a Split regex");
        out += fmt::format("[^{}]", kJsSpaceClass);
      } else if (next == 'u' && i + 1 < pattern.size() && pattern[i + 1] == '{') {
        const size_t close = pattern.find('}', i);
        if (close == std::string_view::npos) return invalid_argument("unterminated \\u{ in regex");
        out += fmt::format("\\x{}", pattern.substr(i + 1, close - i));
        i = close;
      } else if (next == 'u' && i + 4 < pattern.size() && is_hex(pattern[i + 1]) &&
                 is_hex(pattern[i + 2]) && is_hex(pattern[i + 3]) && is_hex(pattern[i + 4])) {
        out += fmt::format("\\x{{{}}}", pattern.substr(i + 1, 4));
        i += 4;
      } else {
        out += '\\';
        out += next;
      }
    } else if (c == '[' && !in_class) {
      in_class = true;
      out += c;
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
    } else if (c == '[') {
      out += "\\[";  // literal in JS; PCRE2 would read "[:" as a POSIX class
    } else if (c == ']' && in_class) {
      in_class = false;
      out += c;
    } else if (c == '.' && !in_class) {
      out += kJsDot;
    } else {
      out += c;
    }
  }
  return out;
}

Result<RegexSplit> RegexSplit::compile(std::string_view pattern) {
  DSERVE_ASSIGN_OR_RETURN(const std::string translated, translate_js_regex(pattern));
  int error = 0;
  PCRE2_SIZE error_offset = 0;
  auto code = std::make_shared<Code>();
  code->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()), translated.size(),
                             PCRE2_UTF | PCRE2_DOLLAR_ENDONLY, &error, &error_offset, nullptr);
  if (code->code == nullptr) {
    return invalid_argument(fmt::format("regex /{}/ does not compile (as PCRE2 /{}/): {} at {}",
                                        pattern, translated, pcre2_message(error), error_offset));
  }
  // Without JIT (a platform PCRE2 lacks it for) the interpreter gives the same matches.
  code->jit = pcre2_jit_compile(code->code, PCRE2_JIT_COMPLETE) == 0;
  return RegexSplit(std::move(code));
}

Status RegexSplit::split(std::string_view text, TextSpan piece, std::vector<TextSpan>& out) const {
  MatchScratch& scratch = match_scratch();
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data() + piece.begin);
  const size_t length = piece.end - piece.begin;
  size_t prev = 0;
  size_t start = 0;
  while (start < length) {
    const int rc = code_->jit ? pcre2_jit_match(code_->code, subject, length, start, 0,
                                                scratch.data, scratch.context)
                              : pcre2_match(code_->code, subject, length, start, PCRE2_NO_UTF_CHECK,
                                            scratch.data, scratch.context);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) return internal_error(fmt::format("PCRE2 match failed: {}", pcre2_message(rc)));
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(scratch.data);
    const size_t match_begin = ovector[0];
    const size_t match_end = ovector[1];
    if (match_begin > prev) out.push_back({piece.begin + prev, piece.begin + match_begin});
    if (match_end > match_begin) {
      out.push_back({piece.begin + match_begin, piece.begin + match_end});
      prev = match_end;
      start = match_end;
    } else {
      // An empty match: step one character on, as JavaScript's matchAll does with the u flag.
      prev = match_end;
      if (match_end >= length) break;
      size_t len = 0;
      decode_utf8_at(text, piece.begin + match_end, len);
      start = match_end + len;
    }
  }
  if (prev < length) out.push_back({piece.begin + prev, piece.end});
  return Status::ok();
}

Status PreTokenizer::split(std::string_view text, TextSpan section,
                           std::vector<TextSpan>& words) const {
  words.assign(1, section);
  std::vector<TextSpan> next;
  for (const RegexSplit& regex : splits_) {
    next.clear();
    for (const TextSpan& piece : words)
      DSERVE_RETURN_IF_ERROR(regex.split(text, piece, next));
    words.swap(next);
  }
  return Status::ok();
}

}  // namespace dserve::tokenizer::detail
