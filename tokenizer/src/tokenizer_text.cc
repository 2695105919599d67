#include "tokenizer_text.h"

namespace dserve::tokenizer::detail {
namespace {

// Length of the sequence `lead` starts, 0 when it cannot start one.
size_t sequence_length(uint8_t lead) {
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) return 2;
  if (lead >= 0xE0 && lead <= 0xEF) return 3;
  if (lead >= 0xF0 && lead <= 0xF4) return 4;
  return 0;
}

// Whether `b` may follow `lead` as the second byte (table 3-7 narrows it for E0, ED, F0, F4).
bool second_byte_ok(uint8_t lead, uint8_t b) {
  switch (lead) {
    case 0xE0:
      return b >= 0xA0 && b <= 0xBF;
    case 0xED:
      return b >= 0x80 && b <= 0x9F;
    case 0xF0:
      return b >= 0x90 && b <= 0xBF;
    case 0xF4:
      return b >= 0x80 && b <= 0x8F;
    default:
      return b >= 0x80 && b <= 0xBF;
  }
}

bool is_continuation(uint8_t b) {
  return b >= 0x80 && b <= 0xBF;
}

// Number of bytes from `pos` that form a well-formed prefix of a sequence (at least 1 when the
// lead is valid), and whether that prefix is the complete sequence.
size_t well_formed_prefix(std::string_view text, size_t pos, bool& complete) {
  const auto lead = static_cast<uint8_t>(text[pos]);
  const size_t need = sequence_length(lead);
  complete = false;
  if (need == 0) return 0;
  size_t have = 1;
  while (have < need && pos + have < text.size()) {
    const auto b = static_cast<uint8_t>(text[pos + have]);
    if (have == 1 ? !second_byte_ok(lead, b) : !is_continuation(b)) break;
    ++have;
  }
  complete = have == need;
  return have;
}

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";

}  // namespace

size_t first_invalid_utf8(std::string_view text) {
  size_t pos = 0;
  while (pos < text.size()) {
    if (static_cast<uint8_t>(text[pos]) < 0x80) {
      ++pos;
      continue;
    }
    bool complete = false;
    const size_t len = well_formed_prefix(text, pos, complete);
    if (!complete) return pos;
    pos += len;
  }
  return kUtf8Valid;
}

void append_utf8_lossy(std::string_view bytes, std::string& out) {
  size_t pos = 0;
  while (pos < bytes.size()) {
    bool complete = false;
    const size_t len = well_formed_prefix(bytes, pos, complete);
    if (complete) {
      out.append(bytes.substr(pos, len));
      pos += len;
    } else {
      out.append(kReplacement);
      pos += len == 0 ? 1 : len;
    }
  }
}

size_t incomplete_utf8_suffix(std::string_view bytes) {
  const size_t n = bytes.size();
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    const size_t pos = n - back;
    const auto b = static_cast<uint8_t>(bytes[pos]);
    if (is_continuation(b)) continue;
    bool complete = false;
    const size_t len = well_formed_prefix(bytes, pos, complete);
    return (!complete && len == back) ? back : 0;
  }
  return 0;
}

bool is_js_whitespace(char32_t c) {
  switch (c) {
    case 0x09:
    case 0x0A:
    case 0x0B:
    case 0x0C:
    case 0x0D:
    case 0x20:
    case 0xA0:
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202F:
    case 0x205F:
    case 0x3000:
    case 0xFEFF:
      return true;
    default:
      return c >= 0x2000 && c <= 0x200A;
  }
}

char32_t decode_utf8_at(std::string_view text, size_t pos, size_t& len) {
  const auto lead = static_cast<uint8_t>(text[pos]);
  len = sequence_length(lead);
  if (len <= 1) {
    len = 1;
    return lead;
  }
  char32_t c = lead & (0x7F >> len);
  for (size_t i = 1; i < len; ++i)
    c = (c << 6) | (static_cast<uint8_t>(text[pos + i]) & 0x3F);
  return c;
}

ByteAlphabet::ByteAlphabet() {
  byte_of_char_.fill(-1);
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    const int c = printable ? b : 256 + extra++;
    byte_of_char_[static_cast<size_t>(c)] = static_cast<int16_t>(b);
    std::string& s = spelling_[static_cast<size_t>(b)];
    if (c < 0x80) {
      s.push_back(static_cast<char>(c));
    } else {
      s.push_back(static_cast<char>(0xC0 | (c >> 6)));
      s.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
  }
}

std::string ByteAlphabet::unspell(std::string_view spelling) const {
  std::string bytes;
  bytes.reserve(spelling.size());
  size_t pos = 0;
  while (pos < spelling.size()) {
    size_t len = 0;
    const char32_t c = decode_utf8_at(spelling, pos, len);
    const int16_t b = c < byte_of_char_.size() ? byte_of_char_[c] : int16_t{-1};
    if (b < 0) return std::string(spelling);
    bytes.push_back(static_cast<char>(b));
    pos += len;
  }
  return bytes;
}

}  // namespace dserve::tokenizer::detail
