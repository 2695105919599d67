#pragma once
// RowPool: runs a row range on the machine's cores, split into contiguous parts. Used by the
// row-by-row products in cpu_ops.cc: each row is computed by the same code whichever thread
// takes it, so the split changes no bit of the result.

#include <cstdint>
#include <functional>

namespace dserve::kernels::cpu::detail {

// Multiply-adds below which a product's part runs on the calling thread alone: smaller parts
// cost more in hand-offs between threads than they save.
inline constexpr int64_t kMinMacsPerPart = int64_t{1} << 18;

// Calls body(begin, end) over parts of [0, rows) on up to one thread per usable core (the
// caller included) and returns when all are done. Runs inline for small work (< 2 parts of
// `min_rows`). Safe to call from several threads; nested calls run inline.
void for_each_row_part(int64_t rows, int64_t min_rows,
                       const std::function<void(int64_t, int64_t)>& body);

}  // namespace dserve::kernels::cpu::detail
