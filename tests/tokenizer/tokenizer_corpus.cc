#include "tokenizer_corpus.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <array>
#include <functional>
#include <nlohmann/json.hpp>
#include <string_view>

#include "dserve/core/random.h"

namespace dserve::tokenizer::testing {
namespace {

using Words = std::vector<std::string_view>;

const Words kEnglish = {"the",
                        "The",
                        "of",
                        "and",
                        "to",
                        "in",
                        "is",
                        "it's",
                        "don't",
                        "I'LL",
                        "you're",
                        "we've",
                        "they'd",
                        "can't",
                        "model",
                        "Tokenizer",
                        "token",
                        "serving",
                        "DeepSeek",
                        "mixture",
                        "experts",
                        "attention",
                        "cache",
                        "prefix",
                        "GPU",
                        "latency",
                        "hello",
                        "world",
                        "HELLO",
                        "Hello",
                        "a",
                        "I",
                        "quick",
                        "brown",
                        "fox",
                        "jumps",
                        "over",
                        "lazy",
                        "dog",
                        "naïve",
                        "café",
                        "résumé",
                        "coöperate",
                        "e-mail",
                        "state-of-the-art",
                        "O'Neil",
                        "rock'n'roll",
                        "x",
                        "ab",
                        "xyzzy",
                        "Mr.",
                        "U.S.A.",
                        "etc.",
                        "i.e.",
                        "CamelCase",
                        "snake_case",
                        "kebab-case",
                        "SCREAMING_CASE",
                        "iPhone",
                        "McDonald's",
                        "l33t",
                        "v2"};

const Words kCode = {
    "int main(int argc, char** argv) {\n  return 0;\n}\n",
    "def f(x):\n    return x ** 2  # square\n",
    "for (size_t i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}",
    "const x = await fetch(`/api/v1/items?id=${id}`);",
    "#include <vector>\n#include \"dserve/model/tokenizer.h\"\n",
    "if (a != b && c >= d || !e) { throw std::runtime_error(\"bad\"); }",
    "SELECT id, name FROM users WHERE age > 21 ORDER BY name DESC;",
    "<div class=\"row\"><a href='https://example.com/x?y=1&z=2'>link</a></div>",
    "{\"key\": [1, 2.5, -3e10, true, null], \"nested\": {\"a\": \"b\"}}",
    "$ ls -la /usr/local/bin | grep -E '^d' > out.txt 2>&1",
    "lambda x: x.strip().lower().split(',')[::-1]",
    "std::unordered_map<std::string, std::vector<int32_t>> m;",
    "    # indented comment\n        deeper = {**kwargs, 'k': v}\n",
    "x+=1;y-=2;z*=3;w/=4;p%=5;q<<=6;r>>=7;s&=8;t|=9;u^=10;",
    "/* block\n * comment\n */\nfn main() -> Result<(), Box<dyn Error>> { Ok(()) }",
    "@decorator\nclass Foo(Bar, metaclass=Meta):\n\tpass\r\n",
    "#!/usr/bin/env bash\nset -euo pipefail\n",
    "a.b.c.d().e[0]->f::g<h>(i)?.j ?? k",
    "..\\..\\Windows\\System32\\drivers\\etc\\hosts",
    "0x7FFFFFFF 0b1010 0o777 1_000_000 3.14f 2.0e-5L"};

const Words kSpaces = {" ",      "  ",     "   ",    "\t",     "\t\t",   "\n",
                       "\r\n",   "\r",     "\n\n",   " \n",    "\n ",    "  \n\n  ",
                       "\u00A0", "\u3000", "\u2028", "\u2029", "\uFEFF", "\u0085",
                       "\v",     "\f",     "\u200B", "\u2003", " \t \t", "\r\n\r\n"};

const Words kPunct = {
    ".",  ",",  "!",  "?",  "...",  "…",  "—",  "–",  "-",  "'",  "\"", "“",  "”",  "‘",   "’",
    "«",  "»",  "(",  ")",  "[",    "]",  "{",  "}",  "<",  ">",  "/",  "\\", "@",  "#",   "$",
    "%",  "^",  "&",  "*",  "_",    "=",  "+",  "|",  "~",  "`",  ";",  ":",  "、", "。",  "，",
    "！", "？", "「", "」", "·",    "•",  "§",  "¶",  "©",  "®",  "™",  "°",  "±",  "×",   "÷",
    "€",  "£",  "¥",  "¢",  "→",    "⇒",  "∀",  "∑",  "√",  "∞",  "≠",  "≤",  "?!", "!!!", "--",
    "::", "->", "=>", "''", "\"\"", "()", "[]", "{}", "<>", "/*", "*/", "//", "#!", ".,;"};

const Words kScripts = {
    "Привет",  "мир",    "Москва",    "Ελληνικά", "αβγδε",    "Ωμέγα",  "مرحبا",    "العالم",
    "שלום",    "עולם",   "नमस्ते",      "दुनिया",    "हिन्दी",    "สวัสดี",   "ภาษาไทย",  "안녕하세요",
    "세계",    "한국어", "გამარჯობა", "Բարեւ",    "வணக்கம்",    "নমস্কার", "Xin chào", "Tiếng Việt",
    "ĐẶNG",    "Łódź",   "Straße",    "ÆØÅ",      "İstanbul", "ǅemal",  "ﬁnance",   "Ⓐⓑⓒ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝐁𝐨𝐥𝐝",   "ｆｕｌｌ",  "ｶﾀｶﾅ",     "ⅰⅱⅲ",      "ꓮꓯ",     "ᚠᚢᚦ",      "ሰላም"};

const Words kAccents = {
    "é",       "e\u0301", "ñ",      "n\u0303",       "ü", "u\u0308",       "ç", "ø",
    "å",       "ß",       "Å",      "A\u030A",       "ệ", "e\u0323\u0302", "ǘ", "ḗ",
    "o\u0338", "a\u20D7", "\u0301", "q\u0307\u0323", "ắ"};

const Words kEmoji = {"😀",
                      "😂",
                      "🥲",
                      "🤖",
                      "🚀",
                      "🔥",
                      "✨",
                      "❤️",
                      "❤",
                      "👍",
                      "👍🏽",
                      "👋🏿",
                      "🧑‍💻",
                      "👨‍👩‍👧‍👦",
                      "🏳️‍🌈",
                      "👩🏾‍❤️‍💋‍👨🏻",
                      "🇺🇸",
                      "🇨🇳",
                      "🇯🇵",
                      "1️⃣",
                      "#️⃣",
                      "☺️",
                      "✌🏼",
                      "🤷‍♀️",
                      "🏃🏻‍♂️",
                      "🐈‍⬛",
                      "🫠",
                      "🧔🏽‍♀️",
                      "©️",
                      "🀄",
                      "🃏"};

const Words kSpecial = {"<｜begin▁of▁sentence｜>",
                        "<｜end▁of▁sentence｜>",
                        "<｜▁pad▁｜>",
                        "<｜User｜>",
                        "<｜Assistant｜>",
                        "<|EOT|>",
                        "<｜fim▁hole｜>",
                        "<｜fim▁begin｜>",
                        "<｜fim▁end｜>",
                        "<｜tool▁calls▁begin｜>",
                        "<｜tool▁calls▁end｜>",
                        "<｜tool▁call▁begin｜>",
                        "<｜tool▁call▁end｜>",
                        "<｜tool▁outputs▁begin｜>",
                        "<｜tool▁outputs▁end｜>",
                        "<｜tool▁output▁begin｜>",
                        "<｜tool▁output▁end｜>",
                        "<｜tool▁sep｜>",
                        "<｜place▁holder▁no▁0｜>",
                        "<｜place▁holder▁no▁799｜>"};

// Near misses of added tokens, which must be encoded as plain text.
const Words kNearSpecial = {
    "<｜User", "｜User｜>", "<|User|>", "<｜user｜>",  "<｜place▁holder▁no▁800｜>", "<｜",
    "｜>",     "<|EOT|",    "<|eot|>",  "< ｜User｜>", "<｜end▁of▁sentence",        "▁",
    "｜"};

void append_utf8(std::string& s, char32_t c);

// Whether PCRE2's Unicode tables (Unicode 14 in PCRE2 10.42) leave `c` unassigned. Node's ICU
// is newer (Unicode 17 in node 20.20), so it sees letters where PCRE2 sees nothing: the two
// tokenizers split such text differently, a difference of Unicode data, not of the tokenizer.
bool unassigned_in_pcre2(char32_t c) {
  static pcre2_code* const kCn = [] {
    int error = 0;
    PCRE2_SIZE offset = 0;
    const std::string_view pattern = "^\\p{Cn}$";
    return pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF,
                         &error, &offset, nullptr);
  }();
  static thread_local pcre2_match_data* const kData = pcre2_match_data_create(1, nullptr);
  std::string s;
  append_utf8(s, c);
  return pcre2_match(kCn, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), 0, 0, kData, nullptr) >=
         0;
}

void append_utf8(std::string& s, char32_t c) {
  if (c < 0x80) {
    s += static_cast<char>(c);
  } else if (c < 0x800) {
    s += static_cast<char>(0xC0 | (c >> 6));
    s += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    s += static_cast<char>(0xE0 | (c >> 12));
    s += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    s += static_cast<char>(0xF0 | (c >> 18));
    s += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    s += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (c & 0x3F));
  }
}

class CorpusWriter {
 public:
  explicit CorpusWriter(uint64_t seed) : rng_(seed) {}

  // One random string of 1..12 fragments of mixed kinds.
  std::string text() {
    std::string s;
    const size_t fragments = 1 + below(12);
    for (size_t i = 0; i < fragments; ++i) {
      fragment(s);
      const uint64_t sep = below(10);
      if (sep < 5) {
        s += ' ';
      } else if (sep < 7) {
        s += pick(kSpaces);
      }
    }
    return s;
  }

 private:
  size_t below(size_t n) { return static_cast<size_t>(rng_.below(n)); }
  std::string_view pick(const Words& w) { return w[below(w.size())]; }
  char32_t in_range(char32_t lo, char32_t hi) {
    return lo + static_cast<char32_t>(below(hi - lo + 1));
  }

  void fragment(std::string& s) {
    switch (below(14)) {
      case 0:
      case 1:
        for (size_t n = 1 + below(12); n > 0; --n) {
          s += pick(kEnglish);
          s += below(6) == 0 ? std::string(pick(kPunct)) : std::string(" ");
        }
        break;
      case 2:
        s += pick(kCode);
        break;
      case 3:
        cjk(s);
        break;
      case 4:
        for (size_t n = 1 + below(5); n > 0; --n)
          s += pick(kEmoji);
        break;
      case 5:
        digits(s);
        break;
      case 6:
        for (size_t n = 1 + below(4); n > 0; --n)
          s += pick(kSpaces);
        break;
      case 7:
        for (size_t n = 1 + below(4); n > 0; --n)
          s += pick(kPunct);
        if (below(2) == 0) s += pick(kEnglish);
        break;
      case 8:
        accents(s);
        break;
      case 9:
        s += pick(kScripts);
        break;
      case 10:
        s += below(4) == 0 ? pick(kNearSpecial) : pick(kSpecial);
        break;
      case 11:
        for (size_t n = 1 + below(8); n > 0; --n)
          append_utf8(s, random_bmp());
        break;
      case 12:
        for (size_t n = 1 + below(6); n > 0; --n)
          append_utf8(s, static_cast<char32_t>(below(0x80)));
        break;
      default:
        s += pick(kEnglish);
        s += pick(kSpecial);
        s += pick(kEnglish);
        break;
    }
  }

  void cjk(std::string& s) {
    for (size_t n = 1 + below(16); n > 0; --n) {
      switch (below(8)) {
        case 0:
          append_utf8(s, in_range(0x3041, 0x3096));
          break;  // hiragana
        case 1:
          append_utf8(s, in_range(0x30A1, 0x30FA));
          break;  // katakana
        case 2:
          append_utf8(s, in_range(0xAC00, 0xD7A3));
          break;  // hangul
        case 3:
          append_utf8(s, in_range(0x3400, 0x4DBF));
          break;  // extension A
        case 4:
          append_utf8(s, in_range(0x20000, 0x2A6DF));
          break;  // extension B
        case 5:
          append_utf8(s, in_range(0x3000, 0x303F));
          break;  // CJK punctuation
        case 6:
          append_utf8(s, in_range(0x9F00, 0x9FFF));
          break;  // around the 0x9FA5 edge
        default:
          append_utf8(s, in_range(0x4E00, 0x9FA5));
          break;
      }
    }
  }

  void digits(std::string& s) {
    static const Words kUnicodeDigits = {"٣٤٥", "３４５", "१२३", "²³", "½", "Ⅻ", "①②", "๓", "߀"};
    switch (below(4)) {
      case 0:
        s += pick(kUnicodeDigits);
        break;
      case 1:
        for (size_t n = 1 + below(4); n > 0; --n) {
          s += std::to_string(rng_.next() % 100000);
          s += pick({",", ".", "-", ":", "/", "e-", "x", "%"});
        }
        break;
      default:
        for (size_t n = 1 + below(40); n > 0; --n)
          s += static_cast<char>('0' + below(10));
        break;
    }
  }

  void accents(std::string& s) {
    for (size_t n = 1 + below(6); n > 0; --n) {
      s += pick(kAccents);
      if (below(3) == 0) append_utf8(s, in_range(0x0300, 0x036F));  // stacked combining marks
      if (below(4) == 0) s += pick(kEnglish);
    }
  }

  // Any assigned BMP code point but surrogates and private use (unassigned ones: see
  // unassigned_in_pcre2).
  char32_t random_bmp() {
    for (;;) {
      const char32_t c = in_range(0x20, 0xFFFD);
      if ((c >= 0xD800 && c <= 0xF8FF) || unassigned_in_pcre2(c)) continue;
      return c;
    }
  }

  SplitMix64 rng_;
};

// Fixed edge cases, independent of the seed.
void add_edge_cases(std::vector<std::string>& out) {
  out.emplace_back("");
  for (char32_t c = 0; c < 0x80; ++c)
    out.emplace_back(1, static_cast<char>(c));
  for (size_t n = 1; n <= 64; ++n) {
    out.push_back(std::string(n, '7'));
    out.push_back("x" + std::string(n, '1') + "y");
    out.push_back(std::string(n, ' '));
    out.push_back("word" + std::string(n, ' '));
    out.push_back(std::string(n % 8 + 1, '\t') + std::string(n, ' ') + "x");
  }
  for (std::string_view w : kSpecial) {
    out.emplace_back(w);
    out.push_back("Hi " + std::string(w) + " there");
    out.push_back(std::string(w) + std::string(w));
    out.push_back(" \n" + std::string(w) + "\n ");
  }
  for (std::string_view w : kNearSpecial)
    out.emplace_back(w);
  for (const Words* list : {&kSpaces, &kPunct, &kScripts, &kAccents, &kEmoji, &kCode}) {
    for (std::string_view w : *list)
      out.emplace_back(w);
  }
  out.push_back(
      "<｜begin▁of▁sentence｜>You are "
      "helpful.<｜User｜>Hi!<｜Assistant｜>Hello.<｜end▁of▁sentence｜>");
  out.push_back("trailing spaces   ");
  out.push_back("   leading spaces");
  out.push_back("line one\r\nline two\r\n\r\n  indented\n\ttabbed\n");
  // Long strings: BPE over long words, long regex runs (the PCRE2 JIT stack).
  out.push_back(std::string(6000, 'a'));
  out.push_back(std::string(4000, ' '));
  out.push_back(std::string(9000, '9'));
  out.push_back(std::string(2000, '\n'));
  std::string long_mix;
  for (int i = 0; i < 500; ++i)
    long_mix += "中文字符和English混合🙂 ";
  out.push_back(long_mix);
  std::string long_emoji;
  for (int i = 0; i < 300; ++i)
    long_emoji += "👨‍👩‍👧‍👦";
  out.push_back(long_emoji);
  std::string long_word;
  for (int i = 0; i < 800; ++i)
    long_word += "é";
  out.push_back(long_word);
}

}  // namespace

std::vector<std::string> make_tokenizer_corpus(uint64_t seed, size_t count) {
  std::vector<std::string> out;
  out.reserve(count + 1024);
  add_edge_cases(out);
  CorpusWriter writer(seed);
  while (out.size() < count) {
    std::string s = writer.text();
    out.push_back(std::move(s));
  }
  return out;
}

std::string corpus_to_json(const std::vector<std::string>& corpus) {
  return nlohmann::json(corpus).dump();
}

}  // namespace dserve::tokenizer::testing
