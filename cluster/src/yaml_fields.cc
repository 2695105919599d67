#include "yaml_fields.h"

#include <algorithm>
#include <charconv>
#include <set>

namespace dserve::cluster::internal {

void ProblemSink::add(Location at, std::string field, std::string found, std::string expected) {
  problems_.push_back({file_, at, std::move(field), std::move(found), std::move(expected)});
}

std::vector<ManifestProblem> ProblemSink::take() {
  // Stable: problems at one place keep the order they were found in.
  std::stable_sort(problems_.begin(), problems_.end(),
                   [](const ManifestProblem& a, const ManifestProblem& b) {
                     // Problems without a location (whole-file ones) go last.
                     const int la = a.at.line == 0 ? 1 << 30 : a.at.line;
                     const int lb = b.at.line == 0 ? 1 << 30 : b.at.line;
                     return la != lb ? la < lb : a.at.column < b.at.column;
                   });
  return std::move(problems_);
}

Location location_of(const YAML::Node& node, Location fallback) {
  if (!node.IsDefined()) return fallback;
  const YAML::Mark mark = node.Mark();
  if (mark.is_null() || mark.line < 0) return fallback;
  return {mark.line + 1, mark.column + 1};
}

std::string describe(const YAML::Node& node) {
  if (!node.IsDefined() || node.IsNull()) return "nothing";
  if (node.IsMap()) return "a mapping";
  if (node.IsSequence()) return "a list";
  return "'" + node.Scalar() + "'";
}

namespace {

size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j)
    row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

std::string join_quoted(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& s : items)
    out += (out.empty() ? "" : ", ") + s;
  return out;
}

}  // namespace

std::optional<int64_t> parse_integer(const std::string& text) {
  if (text.empty()) return std::nullopt;
  const char* first = text.data();
  if (*first == '+') ++first;
  int64_t value = 0;
  const auto [end, ec] = std::from_chars(first, text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

std::string nearest(std::string_view word, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_distance = std::max<size_t>(2, word.size() / 3) + 1;
  for (const auto& c : candidates) {
    const size_t d = edit_distance(word, c);
    if (d < best_distance) {
      best_distance = d;
      best = c;
    }
  }
  return best;
}

MapReader::MapReader(const YAML::Node& node, std::string map_path, Location at, ProblemSink& sink,
                     const std::vector<std::string_view>& allowed)
    : node_(node), path_(std::move(map_path)), at_(location_of(node, at)), sink_(sink) {
  if (!node.IsDefined() || !node.IsMap()) {
    sink_.add(at_, path_, describe(node), "a mapping");
    return;
  }
  is_map_ = true;
  const std::vector<std::string> keys(allowed.begin(), allowed.end());
  std::set<std::string> seen;
  for (const auto& kv : node) {
    const std::string key = kv.first.Scalar();
    const Location key_at = location_of(kv.first, at_);
    if (std::find(keys.begin(), keys.end(), key) == keys.end()) {
      std::string expected = "one of " + join_quoted(keys);
      if (const std::string guess = nearest(key, keys); !guess.empty()) {
        expected += " (did you mean '" + guess + "'?)";
      }
      sink_.add(key_at, path(key), "unknown key '" + key + "'", expected);
    } else if (!seen.insert(key).second) {
      sink_.add(key_at, path(key), "the key '" + key + "' a second time",
                "each key once per mapping");
    }
  }
}

bool MapReader::has(std::string_view key) const {
  return is_map_ && child(key).IsDefined();
}

YAML::Node MapReader::child(std::string_view key) const {
  if (!is_map_) return YAML::Node(YAML::NodeType::Undefined);
  const YAML::Node& self = node_;
  return self[std::string(key)];
}

std::string MapReader::path(std::string_view key) const {
  return path_.empty() ? std::string(key) : path_ + "." + std::string(key);
}

Location MapReader::at(std::string_view key) const {
  return location_of(child(key), at_);
}

void MapReader::missing(std::string_view key, std::string_view expected, Location at) {
  sink_.add(at.line > 0 ? at : at_, path(key), "nothing (the field is missing)",
            std::string(expected));
}

std::optional<int64_t> MapReader::integer(std::string_view key, int64_t min, int64_t max,
                                          bool required, std::string_view expected_extra) {
  std::string expected = max == INT64_MAX
                             ? "an integer >= " + std::to_string(min)
                             : "an integer in " + std::to_string(min) + ".." + std::to_string(max);
  if (!expected_extra.empty()) expected += " " + std::string(expected_extra);
  if (!has(key)) {
    if (required && is_map_) missing(key, expected);
    return std::nullopt;
  }
  const YAML::Node value = child(key);
  if (!value.IsScalar()) {
    sink_.add(at(key), path(key), describe(value), expected);
    return std::nullopt;
  }
  const auto parsed = parse_integer(value.Scalar());
  if (!parsed) {
    sink_.add(at(key), path(key), describe(value) + " (not an integer)", expected);
    return std::nullopt;
  }
  if (*parsed < min || *parsed > max) {
    sink_.add(at(key), path(key), std::to_string(*parsed), expected);
    return std::nullopt;
  }
  return parsed;
}

std::optional<std::string> MapReader::string(std::string_view key, bool required) {
  if (!has(key)) {
    if (required && is_map_) missing(key, "a string");
    return std::nullopt;
  }
  const YAML::Node value = child(key);
  if (!value.IsScalar() || value.Scalar().empty()) {
    sink_.add(at(key), path(key), describe(value), "a non-empty string");
    return std::nullopt;
  }
  return value.Scalar();
}

std::optional<std::string> MapReader::choice(std::string_view key,
                                             const std::vector<std::string>& choices,
                                             bool required) {
  const std::string expected = "one of " + join_quoted(choices);
  if (!has(key)) {
    if (required && is_map_) missing(key, expected);
    return std::nullopt;
  }
  const YAML::Node value = child(key);
  if (!value.IsScalar() ||
      std::find(choices.begin(), choices.end(), value.Scalar()) == choices.end()) {
    std::string e = expected;
    if (value.IsScalar()) {
      if (const std::string guess = nearest(value.Scalar(), choices); !guess.empty()) {
        e += " (did you mean '" + guess + "'?)";
      }
    }
    sink_.add(at(key), path(key), describe(value), e);
    return std::nullopt;
  }
  return value.Scalar();
}

std::optional<std::vector<std::string>> MapReader::string_list(std::string_view key, bool required,
                                                               std::string_view expected,
                                                               std::vector<Location>* where) {
  if (!has(key)) {
    if (required && is_map_) missing(key, expected);
    return std::nullopt;
  }
  const YAML::Node value = child(key);
  if (!value.IsSequence() || value.size() == 0) {
    sink_.add(at(key), path(key), value.IsSequence() ? "an empty list" : describe(value),
              std::string(expected));
    return std::nullopt;
  }
  std::vector<std::string> out;
  bool ok = true;
  for (size_t i = 0; i < value.size(); ++i) {
    const YAML::Node item = value[i];
    const Location item_at = location_of(item, at(key));
    if (!item.IsScalar() || item.Scalar().empty()) {
      sink_.add(item_at, path(key) + "[" + std::to_string(i) + "]", describe(item),
                "a non-empty string");
      ok = false;
      continue;
    }
    out.push_back(item.Scalar());
    if (where) where->push_back(item_at);
  }
  if (!ok) return std::nullopt;
  return out;
}

}  // namespace dserve::cluster::internal
