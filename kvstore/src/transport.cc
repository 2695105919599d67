// What every Transport shares: the regions' ownership, the checks a put makes before a byte
// moves, and the digests it returns.

#include <algorithm>
#include <string>

#include "dserve/kvstore/transfer.h"

namespace dserve::kvstore {

// ---- MemoryRegion ----

MemoryRegion::~MemoryRegion() {
  reset();
}

MemoryRegion::MemoryRegion(MemoryRegion&& other) noexcept
    : transport_(other.transport_),
      base_(other.base_),
      bytes_(other.bytes_),
      handle_(other.handle_) {
  other.transport_ = nullptr;
  other.handle_ = nullptr;
}

MemoryRegion& MemoryRegion::operator=(MemoryRegion&& other) noexcept {
  if (this != &other) {
    reset();
    transport_ = other.transport_;
    base_ = other.base_;
    bytes_ = other.bytes_;
    handle_ = other.handle_;
    other.transport_ = nullptr;
    other.handle_ = nullptr;
  }
  return *this;
}

void MemoryRegion::reset() {
  if (transport_ != nullptr) transport_->release_region(base_, bytes_, handle_);
  transport_ = nullptr;
  handle_ = nullptr;
}

// ---- Puts ----

Status check_put_ops(const RemoteRegion& region, std::span<const PutOp> ops) {
  for (size_t i = 0; i < ops.size(); ++i) {
    const PutOp& op = ops[i];
    if (op.remote_offset > region.bytes || op.bytes > region.bytes - op.remote_offset) {
      return invalid_argument("put op " + std::to_string(i) + " [" +
                              std::to_string(op.remote_offset) + ", +" + std::to_string(op.bytes) +
                              ") exceeds the " + std::to_string(region.bytes) +
                              "-byte remote region");
    }
    if (op.bytes > 0 && op.local == nullptr) {
      return invalid_argument("put op " + std::to_string(i) + " has no source");
    }
  }
  if (region.rkey.empty()) return invalid_argument("remote region has no rkey");
  return Status::ok();
}

std::vector<SpanDigest> span_digests(std::span<const PutOp> ops, uint64_t digest_bytes) {
  std::vector<SpanDigest> digests;
  for (const PutOp& op : ops) {
    const auto* local = static_cast<const std::byte*>(op.local);
    const uint64_t step = digest_bytes == 0 ? op.bytes : digest_bytes;
    uint64_t off = 0;
    do {  // a zero-byte op still gets its digest
      const uint64_t n = std::min(step, op.bytes - off);
      digests.push_back(
          {op.remote_offset + off, n, span_checksum(local == nullptr ? nullptr : local + off, n)});
      off += n;
    } while (off < op.bytes);
  }
  return digests;
}

}  // namespace dserve::kvstore
