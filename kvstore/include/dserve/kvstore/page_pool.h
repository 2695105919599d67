#pragma once
// Paged pools: fixed-size pages of rows in one RowFormat (row_format.h: fp32, or V4's fp8 entry
// or fp4 indexer key), one pool per (pool kind, layer), and PagedRows, a request's growing list
// of pages in one such pool (its block table for that pool). A page holds its rows encoded,
// back to back; the forward writes rows through PagedRows::append (encoding them) and reads
// them decoded, while the prefix store and the hand-off move pages' bytes as they are.
//
// A page holds the rows one layer produced for one 128-token block (e.g. the 32 compressed
// entries of a CSA layer with rate 4). Pages are reference counted (PageRef): a request's
// PagedRows and the prefix index may hold the same full page, which is then immutable; only
// the last, not yet full page of a request is written, and it is never shared (copying a
// PagedRows copies that page). A page returns its bytes to its pool's account when the last
// reference goes.
//
// Allocation never fails for a running request: capacity limits apply to what the prefix store
// keeps for later (kvstore/prefix_store.h demotes unreferenced pages when over its limit).

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dserve/kvstore/row_format.h"

namespace dserve::kvstore {

class PagePool;

class Page {
 public:
  // Zero-filled unless `uninitialised` (PagePool::allocate_for_overwrite).
  Page(std::shared_ptr<PagePool> pool, int64_t bytes, bool uninitialised = false);
  ~Page();
  Page(const Page&) = delete;
  Page& operator=(const Page&) = delete;

  // The encoded rows (16-byte aligned).
  std::byte* data() { return reinterpret_cast<std::byte*>(storage_.get()); }
  const std::byte* data() const { return reinterpret_cast<const std::byte*>(storage_.get()); }
  int64_t size_bytes() const { return bytes_; }
  // The page as floats: only for a pool of fp32 rows (checked).
  float* as_floats();
  const float* as_floats() const;
  const PagePool& pool() const { return *pool_; }

 private:
  std::shared_ptr<PagePool> pool_;
  int64_t bytes_;
  std::unique_ptr<float[]> storage_;  // floats, so that fp32 pages are real float objects
};
using PageRef = std::shared_ptr<Page>;

// Pages of rows_per_page rows of one format. Thread-safe.
class PagePool : public std::enable_shared_from_this<PagePool> {
 public:
  // Preconditions (checked): rows_per_page > 0, format.check() holds.
  static std::shared_ptr<PagePool> create(std::string name, int64_t rows_per_page,
                                          RowFormat format);
  // A pool of fp32 rows of `width` floats.
  static std::shared_ptr<PagePool> create(std::string name, int64_t rows_per_page, int64_t width);

  // A zero-filled page.
  PageRef allocate();
  // A page whose bytes are not initialised, for a caller that writes every byte of it before
  // anything reads it (a landed hand-off span, a tier's decoded value): saves the zero fill.
  PageRef allocate_for_overwrite();

  const std::string& name() const { return name_; }
  int64_t rows_per_page() const { return rows_per_page_; }
  const RowFormat& format() const { return format_; }
  int64_t width() const { return format_.width; }  // floats of a decoded row
  int64_t row_bytes() const { return format_.row_bytes(); }
  uint64_t page_bytes() const { return static_cast<uint64_t>(rows_per_page_ * row_bytes()); }
  int64_t pages_in_use() const { return pages_in_use_.load(); }
  uint64_t bytes_in_use() const { return static_cast<uint64_t>(pages_in_use()) * page_bytes(); }

 private:
  friend class Page;
  PagePool(std::string name, int64_t rows_per_page, RowFormat format);
  std::string name_;
  int64_t rows_per_page_;
  RowFormat format_;
  std::atomic<int64_t> pages_in_use_{0};
};

// A request's rows in one pool, appended in order and read by index; row i lives in page
// i / rows_per_page. Copies share the full pages and deep-copy the open one.
class PagedRows {
 public:
  PagedRows() = default;
  explicit PagedRows(std::shared_ptr<PagePool> pool);
  PagedRows(const PagedRows& other);
  PagedRows& operator=(const PagedRows& other);
  PagedRows(PagedRows&&) noexcept = default;
  PagedRows& operator=(PagedRows&&) noexcept = default;

  bool attached() const { return pool_ != nullptr; }
  int64_t rows() const { return rows_; }
  int64_t width() const { return pool_ ? pool_->width() : 0; }
  int64_t rows_per_page() const { return pool_ ? pool_->rows_per_page() : 0; }
  const RowFormat& format() const;
  // Row i in fp32, as stored: only for a pool of fp32 rows (checked); rows of one page are
  // contiguous.
  const float* fp32_row(int64_t i) const;
  // Decodes rows [first, first + count) into count * width() floats.
  void read_rows(int64_t first, int64_t count, float* out) const;
  // Encodes `count` rows of width() floats in, allocating pages as they fill.
  void append(const float* rows, int64_t count);
  // Appends `count` rows given decoded (encode_decoded_rows): a device's rows read back.
  void append_decoded(const float* rows, int64_t count);
  // Appends `count` rows already in the pool's format (row_bytes() each): a hand-off.
  void append_encoded(const std::byte* rows, int64_t count);
  // The encoded bytes of row i.
  const std::byte* encoded_row(int64_t i) const;

  // The block table: page p holds rows [p * rows_per_page, (p + 1) * rows_per_page).
  const std::vector<PageRef>& pages() const { return pages_; }
  // Appends a full page produced elsewhere (a prefix hit); rows() must be a page multiple.
  void append_page(PageRef page);
  // Drops every row from `rows` on (rows must be a page multiple): a request that rolls back.
  void truncate_pages(int64_t rows);
  // Drops every row from `rows` on, anywhere: a step's rejected rows. The open page's bytes past
  // the end are zeroed (as a page that never held them) and it is copied first when shared.
  void truncate(int64_t rows);
  // The full pages, shared (the last one only when full).
  std::vector<PageRef> full_pages() const;
  uint64_t bytes() const { return pages_.size() * (pool_ ? pool_->page_bytes() : 0); }

 private:
  template <typename Put>
  void fill(int64_t count, Put put);

  std::shared_ptr<PagePool> pool_;
  std::vector<PageRef> pages_;
  int64_t rows_ = 0;
};

}  // namespace dserve::kvstore
