#pragma once
// Typed reading of YAML values with every problem collected, never thrown: the one place that
// turns yaml-cpp nodes into integers, strings and lists for the manifest parser.

#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "dserve/cluster/manifest.h"

namespace dserve::cluster::internal {

// Collects the problems of one manifest. Not thread-safe.
class ProblemSink {
 public:
  explicit ProblemSink(std::string file) : file_(std::move(file)) {}
  void add(Location at, std::string field, std::string found, std::string expected);
  std::vector<ManifestProblem> take();  // sorted by line, column
  bool empty() const { return problems_.empty(); }

 private:
  std::string file_;
  std::vector<ManifestProblem> problems_;
};

// The 1-based location of `node`, or `fallback` when yaml-cpp has none (undefined nodes).
Location location_of(const YAML::Node& node, Location fallback);

// How a value reads in a problem: "'text'", "a mapping", "a list", "nothing".
std::string describe(const YAML::Node& node);

// A decimal integer ("12", "-3", "+4"); nothing for anything else or on overflow.
std::optional<int64_t> parse_integer(const std::string& text);

// The nearest of `candidates` to `word` when it is a plausible typo, else empty.
std::string nearest(std::string_view word, const std::vector<std::string>& candidates);

// A mapping being read, with the dotted path of its fields. Reports unknown and duplicate keys
// once at construction. Reads are const: a missing key is never inserted.
class MapReader {
 public:
  // When `node` is not a mapping the problem is reported and every read returns nothing.
  MapReader(const YAML::Node& node, std::string path, Location at, ProblemSink& sink,
            const std::vector<std::string_view>& allowed);

  bool is_map() const { return is_map_; }
  bool has(std::string_view key) const;
  YAML::Node child(std::string_view key) const;
  std::string path(std::string_view key) const;
  Location at() const { return at_; }
  Location at(std::string_view key) const;  // the value's location, else the mapping's

  // Integer in [min, max]. Missing: reported when `required`, else nothing.
  std::optional<int64_t> integer(std::string_view key, int64_t min, int64_t max, bool required,
                                 std::string_view expected_extra = {});
  // A non-empty scalar string.
  std::optional<std::string> string(std::string_view key, bool required);
  // One of `choices`.
  std::optional<std::string> choice(std::string_view key, const std::vector<std::string>& choices,
                                    bool required);
  // A list of non-empty strings (at least one); locations returned in `where`.
  std::optional<std::vector<std::string>> string_list(std::string_view key, bool required,
                                                      std::string_view expected,
                                                      std::vector<Location>* where = nullptr);
  // Reports `key` as missing, at `at` (default: the mapping's location).
  void missing(std::string_view key, std::string_view expected, Location at = {});

 private:
  YAML::Node node_;
  std::string path_;
  Location at_;
  ProblemSink& sink_;
  bool is_map_ = false;
};

}  // namespace dserve::cluster::internal
