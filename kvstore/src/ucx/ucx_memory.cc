// UcxTransport's memory regions: registering caller memory, allocating through UCX, and packing
// the remote keys peers write with.

#include <cstring>
#include <string>
#include <utility>

#include "ucx_transport.h"

namespace dserve::kvstore {

using ucx_detail::ucs_error;

Result<MemoryRegion> UcxTransport::register_memory(void* base, uint64_t bytes) {
  if (base == nullptr || bytes == 0) return invalid_argument("cannot register an empty region");
  ucp_mem_map_params_t params{};
  params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
  params.address = base;
  params.length = bytes;
  ucp_mem_h memh = nullptr;
  std::lock_guard lock(impl_->mu);
  ucs_status_t st = ucp_mem_map(impl_->context, &params, &memh);
  if (st != UCS_OK) {
    return unavailable("cannot register " + std::to_string(bytes) + " bytes: " + ucs_error(st));
  }
  ++impl_->live_regions;
  return make_region(static_cast<std::byte*>(base), bytes, memh);
}

Result<MemoryRegion> UcxTransport::allocate_memory(uint64_t bytes) {
  if (bytes == 0) return invalid_argument("cannot allocate an empty region");
  ucp_mem_map_params_t params{};
  params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                      UCP_MEM_MAP_PARAM_FIELD_FLAGS;
  params.address = nullptr;
  params.length = bytes;
  params.flags = UCP_MEM_MAP_ALLOCATE;
  ucp_mem_h memh = nullptr;
  std::lock_guard lock(impl_->mu);
  ucs_status_t st = ucp_mem_map(impl_->context, &params, &memh);
  if (st != UCS_OK) {
    return unavailable("cannot allocate " + std::to_string(bytes) + " bytes: " + ucs_error(st));
  }
  ucp_mem_attr_t attr{};
  attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
  st = ucp_mem_query(memh, &attr);
  if (st != UCS_OK || attr.length < bytes) {
    ucp_mem_unmap(impl_->context, memh);
    return internal_error("ucp_mem_query: " + ucs_error(st));
  }
  // UCX may hand back recycled or hugepage memory: the contract is zero-filled.
  std::memset(attr.address, 0, bytes);
  ++impl_->live_regions;
  return make_region(static_cast<std::byte*>(attr.address), bytes, memh);
}

void UcxTransport::release_region(std::byte* /*base*/, uint64_t /*bytes*/, void* handle) {
  std::lock_guard lock(impl_->mu);
  ucs_status_t st = ucp_mem_unmap(impl_->context, static_cast<ucp_mem_h>(handle));
  DSERVE_CHECK_MSG(st == UCS_OK, "ucp_mem_unmap: " + ucs_error(st));
  --impl_->live_regions;
}

Result<RemoteRegion> UcxTransport::describe(const MemoryRegion& region) {
  DSERVE_CHECK_MSG(region.transport() == this, "describe() of a region of another transport");
  void* packed = nullptr;
  size_t packed_bytes = 0;
  std::lock_guard lock(impl_->mu);
  ucs_status_t st = ucp_rkey_pack(impl_->context, static_cast<ucp_mem_h>(region.handle()), &packed,
                                  &packed_bytes);
  if (st != UCS_OK) return internal_error("ucp_rkey_pack: " + ucs_error(st));
  RemoteRegion out;
  out.owner_epoch = options_.epoch;
  out.address = reinterpret_cast<uint64_t>(region.data());
  out.bytes = region.bytes();
  const auto* p = static_cast<const uint8_t*>(packed);
  out.rkey.assign(p, p + packed_bytes);
  ucp_rkey_buffer_release(packed);
  return out;
}

}  // namespace dserve::kvstore
