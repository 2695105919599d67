#include "tokenizer_added.h"

#include <algorithm>

#include "tokenizer_text.h"

namespace dserve::tokenizer::detail {
namespace {

size_t trim_end(std::string_view text, size_t begin, size_t end) {
  while (end > begin) {
    size_t start = end - 1;
    while (start > begin && (static_cast<uint8_t>(text[start]) & 0xC0) == 0x80)
      --start;
    size_t len = 0;
    if (!is_js_whitespace(decode_utf8_at(text, start, len))) break;
    end = start;
  }
  return end;
}

size_t trim_begin(std::string_view text, size_t begin, size_t end) {
  while (begin < end) {
    size_t len = 0;
    if (!is_js_whitespace(decode_utf8_at(text, begin, len))) break;
    begin += len;
  }
  return begin;
}

}  // namespace

AddedTokenSplitter::AddedTokenSplitter(std::vector<AddedToken> tokens)
    : tokens_(std::move(tokens)) {
  for (size_t t = 0; t < tokens_.size(); ++t) {
    const std::string& content = tokens_[t].content;
    if (content.empty()) continue;
    starts_token_[static_cast<uint8_t>(content[0])] = true;
    int32_t node = 0;
    for (char c : content) {
      const auto byte = static_cast<uint8_t>(c);
      int32_t next = child(node, byte);
      if (next < 0) {
        next = static_cast<int32_t>(trie_.size());
        auto& children = trie_[static_cast<size_t>(node)].children;
        children.insert(std::lower_bound(children.begin(), children.end(),
                                         std::pair<uint8_t, int32_t>{byte, -1}),
                        {byte, next});
        trie_.emplace_back();
      }
      node = next;
    }
    trie_[static_cast<size_t>(node)].token = static_cast<int32_t>(t);
  }
}

int32_t AddedTokenSplitter::child(int32_t node, uint8_t byte) const {
  const auto& children = trie_[static_cast<size_t>(node)].children;
  const auto it =
      std::lower_bound(children.begin(), children.end(), std::pair<uint8_t, int32_t>{byte, -1});
  return (it != children.end() && it->first == byte) ? it->second : -1;
}

int32_t AddedTokenSplitter::longest_at(std::string_view text, size_t pos, size_t& len) const {
  int32_t found = -1;
  int32_t node = 0;
  for (size_t i = pos; i < text.size(); ++i) {
    node = child(node, static_cast<uint8_t>(text[i]));
    if (node < 0) break;
    if (trie_[static_cast<size_t>(node)].token >= 0) {
      found = trie_[static_cast<size_t>(node)].token;
      len = i + 1 - pos;
    }
  }
  return found;
}

void AddedTokenSplitter::split(std::string_view text, std::vector<TextSection>& sections) const {
  sections.clear();
  size_t plain_begin = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t len = 0;
    const int32_t token =
        starts_token_[static_cast<uint8_t>(text[pos])] ? longest_at(text, pos, len) : -1;
    if (token < 0) {
      ++pos;
      continue;
    }
    if (pos > plain_begin) sections.push_back({plain_begin, pos, -1});
    sections.push_back({pos, pos + len, token});
    pos += len;
    plain_begin = pos;
  }
  if (plain_begin < text.size()) sections.push_back({plain_begin, text.size(), -1});

  // lstrip/rstrip trim the neighbouring plain text with JavaScript's trimEnd/trimStart, as the
  // JS oracle does.
  for (size_t i = 0; i < sections.size(); ++i) {
    if (sections[i].token < 0) continue;
    const AddedToken& token = tokens_[static_cast<size_t>(sections[i].token)];
    if (token.lstrip && i > 0 && sections[i - 1].token < 0) {
      TextSection& left = sections[i - 1];
      left.end = trim_end(text, left.begin, left.end);
    }
    if (token.rstrip && i + 1 < sections.size() && sections[i + 1].token < 0) {
      TextSection& right = sections[i + 1];
      right.begin = trim_begin(text, right.begin, right.end);
    }
  }
}

}  // namespace dserve::tokenizer::detail
