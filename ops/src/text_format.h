#pragma once
// Internal: the lexical rules of the Prometheus text format 0.0.4 (names, escaping, numbers).

#include <string>
#include <string_view>

namespace dserve::ops::internal {

// [a-zA-Z_:][a-zA-Z0-9_:]*
bool is_valid_metric_name(std::string_view name);
// [a-zA-Z_][a-zA-Z0-9_]* and not starting with "__" (reserved for Prometheus itself).
bool is_valid_label_name(std::string_view name);

// Label values: backslash, double quote and line feed become \\, \" and \n.
void append_escaped_label_value(std::string& out, std::string_view value);
// Help text: backslash and line feed become \\ and \n.
void append_escaped_help(std::string& out, std::string_view help);
// Shortest text that reads back as the same double; +Inf, -Inf and NaN as Prometheus spells them.
void append_number(std::string& out, double value);

}  // namespace dserve::ops::internal
