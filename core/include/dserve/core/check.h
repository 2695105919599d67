#pragma once
// Invariant checks for programmer errors. A failed check prints the broken condition, the
// place and an optional message, then aborts: these are bugs, never input errors (input errors
// are returned as a Status, see status.h).

#include <string_view>

namespace dserve::detail {
[[noreturn]] void check_failed(const char* condition, const char* file, int line,
                               std::string_view message);
}  // namespace dserve::detail

#define DSERVE_CHECK(cond)                                           \
  do {                                                               \
    if (!(cond)) [[unlikely]]                                        \
      ::dserve::detail::check_failed(#cond, __FILE__, __LINE__, {}); \
  } while (false)

#define DSERVE_CHECK_MSG(cond, msg)                                     \
  do {                                                                  \
    if (!(cond)) [[unlikely]]                                           \
      ::dserve::detail::check_failed(#cond, __FILE__, __LINE__, (msg)); \
  } while (false)
