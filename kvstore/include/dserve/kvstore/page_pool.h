#pragma once
// Paged pools: fixed-size pages of fp32 rows, one pool per (pool kind, layer), and PagedRows,
// a request's growing list of pages in one such pool (its block table for that pool).
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

namespace dserve::kvstore {

class PagePool;

class Page {
 public:
  Page(std::shared_ptr<PagePool> pool, int64_t floats);
  ~Page();
  Page(const Page&) = delete;
  Page& operator=(const Page&) = delete;

  float* data() { return data_.get(); }
  const float* data() const { return data_.get(); }
  int64_t floats() const { return floats_; }
  const PagePool& pool() const { return *pool_; }

 private:
  std::shared_ptr<PagePool> pool_;
  int64_t floats_;
  std::unique_ptr<float[]> data_;
};
using PageRef = std::shared_ptr<Page>;

// Pages of rows_per_page x width floats. Thread-safe.
class PagePool : public std::enable_shared_from_this<PagePool> {
 public:
  static std::shared_ptr<PagePool> create(std::string name, int64_t rows_per_page, int64_t width);

  // A zero-filled page.
  PageRef allocate();

  const std::string& name() const { return name_; }
  int64_t rows_per_page() const { return rows_per_page_; }
  int64_t width() const { return width_; }
  int64_t page_floats() const { return rows_per_page_ * width_; }
  uint64_t page_bytes() const { return static_cast<uint64_t>(page_floats()) * sizeof(float); }
  int64_t pages_in_use() const { return pages_in_use_.load(); }
  uint64_t bytes_in_use() const { return static_cast<uint64_t>(pages_in_use()) * page_bytes(); }

 private:
  friend class Page;
  PagePool(std::string name, int64_t rows_per_page, int64_t width);
  std::string name_;
  int64_t rows_per_page_;
  int64_t width_;
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
  const float* row(int64_t i) const;
  // Copies `count` rows of width() floats in, allocating pages as they fill.
  void append(const float* rows, int64_t count);

  // The block table: page p holds rows [p * rows_per_page, (p + 1) * rows_per_page).
  const std::vector<PageRef>& pages() const { return pages_; }
  // Appends a full page produced elsewhere (a prefix hit); rows() must be a page multiple.
  void append_page(PageRef page);
  // Drops every row from `rows` on (rows must be a page multiple): a request that rolls back.
  void truncate_pages(int64_t rows);
  // The full pages, shared (the last one only when full).
  std::vector<PageRef> full_pages() const;
  uint64_t bytes() const { return pages_.size() * (pool_ ? pool_->page_bytes() : 0); }

 private:
  std::shared_ptr<PagePool> pool_;
  std::vector<PageRef> pages_;
  int64_t rows_ = 0;
};

}  // namespace dserve::kvstore
