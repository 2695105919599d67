#pragma once
// Reading small files that come from outside (manifests, token files, certificates, id lists)
// with their size and type checked before any byte is read: a FIFO, a device such as /dev/zero
// or a directory is refused at once instead of blocking or reading without end.

#include <cstddef>
#include <string>
#include <string_view>

#include "dserve/core/status.h"

namespace dserve {

// The whole of `path`, which must be a regular file (symlinks followed) of at most `max_bytes`.
// `what` names the file in messages ("manifest", "token file"). Errors: NOT_FOUND when it
// cannot be opened, INVALID_ARGUMENT when it is not a regular file or is larger than
// `max_bytes` (checked before reading and again while reading, should it grow), DATA_LOSS on a
// read error.
Result<std::string> read_bounded_file(const std::string& path, std::string_view what,
                                      size_t max_bytes);

}  // namespace dserve
