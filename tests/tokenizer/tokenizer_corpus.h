#pragma once
// A deterministic corpus of strings that exercises every path of the tokenizer: ASCII prose
// and code, CJK, emoji (ZWJ sequences, skin tones, flags), digit runs of every length, mixed
// whitespace, punctuation, accents and combining marks, many scripts, added tokens embedded
// in text, and a few long strings. The same seed gives the same strings on every machine.

#include <cstdint>
#include <string>
#include <vector>

namespace dserve::tokenizer::testing {

// At least `count` strings (a fixed set of edge cases first, then seeded random ones); all
// valid UTF-8.
std::vector<std::string> make_tokenizer_corpus(uint64_t seed, size_t count);

// The corpus as a JSON array of strings.
std::string corpus_to_json(const std::vector<std::string>& corpus);

}  // namespace dserve::tokenizer::testing
