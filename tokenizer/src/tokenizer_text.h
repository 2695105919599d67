#pragma once
// Byte-level text primitives of the tokenizer: UTF-8 validation and repair, and the GPT-2
// byte <-> character alphabet that byte-level BPE vocabularies are spelled in.

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace dserve::tokenizer::detail {

inline constexpr size_t kUtf8Valid = static_cast<size_t>(-1);

// Offset of the first byte that does not start or continue a well-formed UTF-8 sequence
// (Unicode 15, table 3-7: no overlongs, no surrogates, nothing past U+10FFFF), or kUtf8Valid.
size_t first_invalid_utf8(std::string_view text);

// Appends `bytes` to `out`, replacing each maximal ill-formed subpart by U+FFFD (the policy
// of the WHATWG decoder and of Rust's from_utf8_lossy, so it matches HF and the JS oracle).
void append_utf8_lossy(std::string_view bytes, std::string& out);

// Length (0..3) of the suffix of `bytes` that is an incomplete but so far well-formed UTF-8
// sequence, i.e. a character that the next bytes may complete.
size_t incomplete_utf8_suffix(std::string_view bytes);

// True for the characters that JavaScript's \s and String.prototype.trim treat as
// whitespace (ECMA-262 WhiteSpace and LineTerminator).
bool is_js_whitespace(char32_t c);

// Decodes the character starting at `text[pos]` of well-formed UTF-8; sets `len` to its size.
char32_t decode_utf8_at(std::string_view text, size_t pos, size_t& len);

// The GPT-2 byte-level alphabet: every byte is spelled as one printable character.
class ByteAlphabet {
 public:
  ByteAlphabet();
  // UTF-8 spelling of the character that stands for `byte`.
  const std::string& spell(uint8_t byte) const { return spelling_[byte]; }
  // Bytes a vocabulary spelling stands for. When a character is outside the alphabet the
  // spelling is returned unchanged, as HF's ByteLevel decoder does.
  std::string unspell(std::string_view spelling) const;

 private:
  std::array<std::string, 256> spelling_;
  std::array<int16_t, 324> byte_of_char_;  // code point -> byte, -1 outside the alphabet
};

}  // namespace dserve::tokenizer::detail
