#include "dserve/tokenizer/tokenizer.h"

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "tokenizer_state.h"
#include "tokenizer_text.h"

namespace dserve::tokenizer {

Tokenizer::Tokenizer(std::shared_ptr<const detail::TokenizerState> state)
    : state_(std::move(state)) {}

Result<Tokenizer> Tokenizer::load(const std::string& tokenizer_json_path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(tokenizer_json_path, ec)) {
    return not_found(
        fmt::format("tokenizer file {} does not exist or is not a file", tokenizer_json_path));
  }
  std::ifstream in(tokenizer_json_path, std::ios::binary);
  if (!in) {
    return not_found(fmt::format("cannot open tokenizer file {}: {}", tokenizer_json_path,
                                 std::strerror(errno)));
  }
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return data_loss(fmt::format("cannot read tokenizer file {}", tokenizer_json_path));
  DSERVE_ASSIGN_OR_RETURN(detail::TokenizerState state,
                          detail::parse_tokenizer_json(text.view(), tokenizer_json_path));
  return Tokenizer(std::make_shared<const detail::TokenizerState>(std::move(state)));
}

Result<std::vector<int32_t>> Tokenizer::encode(std::string_view text, SpecialTokens special) const {
  const size_t bad = detail::first_invalid_utf8(text);
  if (bad != detail::kUtf8Valid) {
    return invalid_argument(fmt::format("text is not valid UTF-8 at byte offset {} (byte 0x{:02X})",
                                        bad, static_cast<uint8_t>(text[bad])));
  }
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 1);
  std::vector<detail::TextSection> sections;
  std::vector<detail::TextSpan> words;
  if (special == SpecialTokens::kRecognize) {
    state_->added.split(text, sections);
  } else {
    sections.push_back({0, text.size(), -1});
  }
  for (const detail::TextSection& section : sections) {
    if (section.token >= 0) {
      ids.push_back(state_->added.tokens()[static_cast<size_t>(section.token)].id);
      continue;
    }
    if (section.begin == section.end) continue;
    DSERVE_RETURN_IF_ERROR(state_->pre_tokenizer.split(text, {section.begin, section.end}, words));
    for (const detail::TextSpan& word : words) {
      state_->bpe->encode_word(text.substr(word.begin, word.end - word.begin), ids);
    }
  }
  return ids;
}

Result<std::string> Tokenizer::token_bytes(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= state_->id_bytes.size()) {
    return out_of_range(fmt::format("token id {} is outside the vocabulary of {} ids", id,
                                    state_->id_bytes.size()));
  }
  return state_->id_bytes[static_cast<size_t>(id)];
}

Result<std::string> Tokenizer::decode(std::span<const int32_t> ids) const {
  std::string bytes;
  for (int32_t id : ids) {
    DSERVE_ASSIGN_OR_RETURN(const std::string piece, token_bytes(id));
    bytes += piece;
  }
  std::string text;
  text.reserve(bytes.size());
  detail::append_utf8_lossy(bytes, text);
  return text;
}

int64_t Tokenizer::vocab_size() const {
  return static_cast<int64_t>(state_->id_bytes.size());
}
int32_t Tokenizer::bos_id() const {
  return state_->bos_id;
}
int32_t Tokenizer::eos_id() const {
  return state_->eos_id;
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  if (const auto it = state_->added_ids.find(token); it != state_->added_ids.end()) {
    return it->second;
  }
  if (const auto it = state_->vocab.find(token); it != state_->vocab.end()) return it->second;
  return std::nullopt;
}

Result<std::string> StreamDecoder::push(int32_t id) {
  DSERVE_ASSIGN_OR_RETURN(const std::string bytes, tokenizer_->token_bytes(id));
  pending_ += bytes;
  const size_t held = detail::incomplete_utf8_suffix(pending_);
  std::string text;
  detail::append_utf8_lossy(std::string_view(pending_).substr(0, pending_.size() - held), text);
  pending_.erase(0, pending_.size() - held);
  return text;
}

std::string StreamDecoder::flush() {
  std::string text;
  detail::append_utf8_lossy(pending_, text);
  pending_.clear();
  return text;
}

}  // namespace dserve::tokenizer
