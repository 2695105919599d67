// Reads tokenizer.json into a TokenizerState, refusing (with the field named) whatever the
// encoder would not reproduce exactly. nlohmann-json exceptions stop here.

#include <fmt/format.h>

#include <limits>
#include <nlohmann/json.hpp>

#include "tokenizer_state.h"
#include "tokenizer_text.h"

namespace dserve::tokenizer::detail {
namespace {

using Json = nlohmann::json;

constexpr std::string_view kBos = "<｜begin▁of▁sentence｜>";
constexpr std::string_view kEos = "<｜end▁of▁sentence｜>";

std::string type_of(const Json& node) {
  const auto it = node.find("type");
  return (it != node.end() && it->is_string()) ? it->get<std::string>() : std::string("?");
}

// `node[key]` when present and not null.
const Json* member(const Json& node, std::string_view key) {
  if (!node.is_object()) return nullptr;
  const auto it = node.find(key);
  return (it == node.end() || it->is_null()) ? nullptr : &*it;
}

bool flag(const Json& node, std::string_view key, bool fallback) {
  const Json* v = member(node, key);
  return (v != nullptr && v->is_boolean()) ? v->get<bool>() : fallback;
}

bool empty_or_null_string(const Json& node, std::string_view key) {
  const Json* v = member(node, key);
  return v == nullptr || (v->is_string() && v->get_ref<const std::string&>().empty());
}

std::string escape_regex(std::string_view literal) {
  std::string out;
  for (char c : literal) {
    if (std::string_view("\\^$.|?*+()[]{}/-").find(c) != std::string_view::npos) out += '\\';
    out += c;
  }
  return out;
}

Status check_normalizer(const Json& doc) {
  const Json* node = member(doc, "normalizer");
  if (node == nullptr) return Status::ok();
  const Json* list = member(*node, "normalizers");
  if (type_of(*node) == "Sequence" && list != nullptr && list->is_array() && list->empty()) {
    return Status::ok();
  }
  return unimplemented(fmt::format("normalizer of type {}", type_of(*node)));
}

Status parse_pre_tokenizer(const Json& doc, PreTokenizer& pre) {
  const Json* node = member(doc, "pre_tokenizer");
  if (node == nullptr) return unimplemented("a tokenizer without a ByteLevel pre_tokenizer");
  std::vector<const Json*> steps;
  if (type_of(*node) == "Sequence") {
    const Json* list = member(*node, "pretokenizers");
    if (list == nullptr || !list->is_array()) {
      return invalid_argument("pre_tokenizer.pretokenizers must be an array");
    }
    for (const Json& step : *list)
      steps.push_back(&step);
  } else {
    steps.push_back(node);
  }
  for (size_t i = 0; i < steps.size(); ++i) {
    const Json& step = *steps[i];
    const std::string type = type_of(step);
    if (type == "Split") {
      const Json* pattern = member(step, "pattern");
      const Json* regex = pattern != nullptr ? member(*pattern, "Regex") : nullptr;
      const Json* literal = pattern != nullptr ? member(*pattern, "String") : nullptr;
      std::string source;
      if (regex != nullptr && regex->is_string()) {
        source = regex->get<std::string>();
      } else if (literal != nullptr && literal->is_string()) {
        source = escape_regex(literal->get_ref<const std::string&>());
      } else {
        return invalid_argument(fmt::format("pre_tokenizer step {}: Split needs a pattern", i));
      }
      const Json* behavior = member(step, "behavior");
      if (behavior == nullptr || !behavior->is_string() ||
          behavior->get<std::string>() != "Isolated" || flag(step, "invert", false)) {
        return unimplemented(fmt::format("pre_tokenizer step {}: Split other than Isolated", i));
      }
      auto split = RegexSplit::compile(source);
      if (!split.is_ok())
        return split.status().with_context(fmt::format("pre_tokenizer step {}", i));
      pre.add(std::move(split).value());
    } else if (type == "ByteLevel") {
      if (i + 1 != steps.size())
        return unimplemented("a ByteLevel pre_tokenizer before other steps");
      if (flag(step, "add_prefix_space", true)) {
        return unimplemented("ByteLevel pre_tokenizer with add_prefix_space");
      }
      if (flag(step, "use_regex", true)) {
        DSERVE_ASSIGN_OR_RETURN(RegexSplit gpt2, RegexSplit::compile(kGpt2SplitPattern));
        pre.add(std::move(gpt2));
      }
      return Status::ok();
    } else {
      return unimplemented(fmt::format("pre_tokenizer step {} of type {}", i, type));
    }
  }
  return unimplemented("a pre_tokenizer that does not end with ByteLevel");
}

Status parse_added_tokens(const Json& doc, std::vector<AddedToken>& tokens) {
  const Json* list = member(doc, "added_tokens");
  if (list == nullptr) return Status::ok();
  if (!list->is_array()) return invalid_argument("added_tokens must be an array");
  for (size_t i = 0; i < list->size(); ++i) {
    const Json& item = (*list)[i];
    const Json* id = member(item, "id");
    const Json* content = member(item, "content");
    if (id == nullptr || !id->is_number_unsigned() || content == nullptr || !content->is_string() ||
        content->get_ref<const std::string&>().empty()) {
      return invalid_argument(fmt::format("added_tokens[{}] needs an id >= 0 and a content", i));
    }
    if (id->get<uint64_t>() >= static_cast<uint64_t>(std::numeric_limits<int32_t>::max())) {
      return invalid_argument(fmt::format("added_tokens[{}]: id too large", i));
    }
    if (flag(item, "single_word", false)) {
      return unimplemented(fmt::format("added_tokens[{}]: single_word", i));
    }
    tokens.push_back({content->get<std::string>(), id->get<int32_t>(), flag(item, "lstrip", false),
                      flag(item, "rstrip", false), flag(item, "special", false)});
  }
  return Status::ok();
}

Status parse_vocab(const Json& model, StringIdMap& vocab) {
  const Json* node = member(model, "vocab");
  if (node == nullptr || !node->is_object())
    return invalid_argument("model.vocab must be an object");
  vocab.reserve(node->size());
  for (const auto& [token, id] : node->items()) {
    if (!id.is_number_unsigned() ||
        id.get<uint64_t>() >= static_cast<uint64_t>(std::numeric_limits<int32_t>::max())) {
      return invalid_argument(fmt::format("model.vocab[{}] must be an id >= 0", token));
    }
    vocab.emplace(token, id.get<int32_t>());
  }
  return Status::ok();
}

Result<std::unordered_map<uint64_t, BpeMerge>> parse_merges(const Json& model,
                                                            const StringIdMap& vocab) {
  const Json* node = member(model, "merges");
  if (node == nullptr || !node->is_array())
    return invalid_argument("model.merges must be an array");
  std::unordered_map<uint64_t, BpeMerge> merges;
  merges.reserve(node->size());
  for (size_t rank = 0; rank < node->size(); ++rank) {
    const Json& item = (*node)[rank];
    std::string left;
    std::string right;
    if (item.is_string()) {  // "a b" (tokenizers < 0.20)
      const std::string& line = item.get_ref<const std::string&>();
      const size_t space = line.find(' ');
      if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
        return invalid_argument(
            fmt::format("model.merges[{}] \"{}\" is not two tokens", rank, line));
      }
      left = line.substr(0, space);
      right = line.substr(space + 1);
    } else if (item.is_array() && item.size() == 2 && item[0].is_string() && item[1].is_string()) {
      left = item[0].get<std::string>();
      right = item[1].get<std::string>();
    } else {
      return invalid_argument(fmt::format("model.merges[{}] is not a pair of tokens", rank));
    }
    const auto l = vocab.find(left);
    const auto r = vocab.find(right);
    const auto m = vocab.find(left + right);
    if (l == vocab.end() || r == vocab.end() || m == vocab.end()) {
      return invalid_argument(fmt::format(
          "model.merges[{}] ({} {}) uses a token not in model.vocab", rank, left, right));
    }
    // A repeated pair keeps its last rank, as in HF tokenizers and the JS oracle.
    merges[merge_key(l->second, r->second)] = {static_cast<int32_t>(rank), m->second};
  }
  return merges;
}

Status check_model_options(const Json& model) {
  if (member(model, "type") != nullptr && type_of(model) != "BPE") {
    return unimplemented(fmt::format("model of type {}", type_of(model)));
  }
  const Json* dropout = member(model, "dropout");
  if (dropout != nullptr && !(dropout->is_number() && dropout->get<double>() == 0.0)) {
    return unimplemented("BPE dropout");
  }
  if (!empty_or_null_string(model, "continuing_subword_prefix") ||
      !empty_or_null_string(model, "end_of_word_suffix")) {
    return unimplemented("BPE continuing_subword_prefix / end_of_word_suffix");
  }
  return Status::ok();
}

Result<TokenizerState> build_state(const Json& doc) {
  TokenizerState state;
  DSERVE_RETURN_IF_ERROR(check_normalizer(doc));
  DSERVE_RETURN_IF_ERROR(parse_pre_tokenizer(doc, state.pre_tokenizer));
  const Json* decoder = member(doc, "decoder");
  if (decoder == nullptr || type_of(*decoder) != "ByteLevel") {
    return unimplemented(fmt::format("decoder of type {}",
                                     decoder == nullptr ? std::string("null") : type_of(*decoder)));
  }
  const Json* model = member(doc, "model");
  if (model == nullptr || !model->is_object()) return invalid_argument("model must be an object");
  DSERVE_RETURN_IF_ERROR(check_model_options(*model));
  DSERVE_RETURN_IF_ERROR(parse_vocab(*model, state.vocab));
  DSERVE_ASSIGN_OR_RETURN(auto merges, parse_merges(*model, state.vocab));
  std::vector<AddedToken> added;
  DSERVE_RETURN_IF_ERROR(parse_added_tokens(doc, added));

  // Every id from 0 to the largest must stand for exactly one token.
  int32_t max_id = -1;
  for (const auto& [token, id] : state.vocab)
    max_id = std::max(max_id, id);
  for (const AddedToken& token : added)
    max_id = std::max(max_id, token.id);
  const ByteAlphabet alphabet;
  std::vector<std::optional<std::string>> bytes(static_cast<size_t>(max_id + 1));
  StringIdMap whole_words;
  for (const auto& [token, id] : state.vocab) {
    auto& slot = bytes[static_cast<size_t>(id)];
    if (slot.has_value()) return invalid_argument(fmt::format("model.vocab: id {} used twice", id));
    slot = alphabet.unspell(token);
    whole_words.emplace(*slot, id);
  }
  for (const AddedToken& token : added) {
    bytes[static_cast<size_t>(token.id)] = token.content;  // added tokens decode as written
    state.added_ids[token.content] = token.id;
  }
  state.id_bytes.reserve(bytes.size());
  for (size_t id = 0; id < bytes.size(); ++id) {
    if (!bytes[id].has_value()) return invalid_argument(fmt::format("id {} has no token", id));
    state.id_bytes.push_back(std::move(*bytes[id]));
  }

  std::array<int32_t, 256> byte_ids{};
  for (int b = 0; b < 256; ++b) {
    const auto it = state.vocab.find(alphabet.spell(static_cast<uint8_t>(b)));
    if (it == state.vocab.end()) {
      return invalid_argument(
          fmt::format("model.vocab lacks the byte-level token of byte 0x{:02X}", b));
    }
    byte_ids[static_cast<size_t>(b)] = it->second;
  }
  state.bpe.emplace(byte_ids, std::move(merges), std::move(whole_words),
                    flag(*model, "ignore_merges", false));
  state.added = AddedTokenSplitter(std::move(added));

  const auto bos = state.added_ids.find(kBos);
  const auto eos = state.added_ids.find(kEos);
  if (bos == state.added_ids.end() || eos == state.added_ids.end()) {
    return invalid_argument(fmt::format("added_tokens must contain {} and {}", kBos, kEos));
  }
  state.bos_id = bos->second;
  state.eos_id = eos->second;
  return state;
}

}  // namespace

Result<TokenizerState> parse_tokenizer_json(std::string_view json_text, std::string_view path) {
  const std::string where = fmt::format("tokenizer file {}", path);
  Json doc;
  try {
    doc = Json::parse(json_text);
  } catch (const Json::exception& e) {
    return invalid_argument(fmt::format("{} is not valid JSON: {}", where, e.what()));
  }
  if (!doc.is_object()) return invalid_argument(fmt::format("{} is not a JSON object", where));
  try {
    auto state = build_state(doc);
    if (!state.is_ok()) return state.status().with_context(where);
    return state;
  } catch (const std::exception& e) {
    return invalid_argument(fmt::format("{}: {}", where, e.what()));
  }
}

}  // namespace dserve::tokenizer::detail
