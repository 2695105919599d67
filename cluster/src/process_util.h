#pragma once
// Small things the launcher, the node agent and the Slurm job share (launcher.cc).

#include <sys/types.h>

#include <cstdint>
#include <string>

namespace dserve::cluster::internal {

// Field 22 of a /proc/<pid>/stat line (start time in clock ticks) and field 3 (the state
// letter); 0 for an empty or malformed line.
uint64_t parse_stat(const std::string& line, char* state = nullptr);
// The same for a process of this machine; 0 when it does not exist.
uint64_t start_ticks_of(pid_t pid, char* state = nullptr);
// `s` as one word for sh.
std::string sh_quote(const std::string& s);

}  // namespace dserve::cluster::internal
