#include "dserve/kvstore/page_pool.h"

#include <algorithm>
#include <cstring>

#include "dserve/core/check.h"
#include "dserve/core/status.h"

namespace dserve::kvstore {

Page::Page(std::shared_ptr<PagePool> pool, int64_t bytes, bool uninitialised)
    : pool_(std::move(pool)),
      bytes_(bytes),
      storage_(uninitialised ? new float[static_cast<size_t>((bytes + 3) / 4)]
                             : new float[static_cast<size_t>((bytes + 3) / 4)]()) {
  pool_->pages_in_use_.fetch_add(1);
}

float* Page::as_floats() {
  DSERVE_CHECK_MSG(pool_->format().encoding == RowEncoding::kFp32, "a page of encoded rows");
  return storage_.get();
}

const float* Page::as_floats() const {
  DSERVE_CHECK_MSG(pool_->format().encoding == RowEncoding::kFp32, "a page of encoded rows");
  return storage_.get();
}

Page::~Page() {
  pool_->pages_in_use_.fetch_sub(1);
}

PagePool::PagePool(std::string name, int64_t rows_per_page, RowFormat format)
    : name_(std::move(name)), rows_per_page_(rows_per_page), format_(format) {}

std::shared_ptr<PagePool> PagePool::create(std::string name, int64_t rows_per_page,
                                           RowFormat format) {
  DSERVE_CHECK_MSG(rows_per_page > 0, "a page needs rows");
  if (const Status valid = format.check(); !valid.is_ok()) {
    DSERVE_CHECK_MSG(false, "page pool " + name + ": " + valid.to_string());
  }
  return std::shared_ptr<PagePool>(new PagePool(std::move(name), rows_per_page, format));
}

std::shared_ptr<PagePool> PagePool::create(std::string name, int64_t rows_per_page, int64_t width) {
  return create(std::move(name), rows_per_page, RowFormat::fp32(width));
}

PageRef PagePool::allocate() {
  return std::make_shared<Page>(shared_from_this(), static_cast<int64_t>(page_bytes()));
}

PageRef PagePool::allocate_for_overwrite() {
  return std::make_shared<Page>(shared_from_this(), static_cast<int64_t>(page_bytes()), true);
}

PagedRows::PagedRows(std::shared_ptr<PagePool> pool) : pool_(std::move(pool)) {}

PagedRows::PagedRows(const PagedRows& other)
    : pool_(other.pool_), pages_(other.pages_), rows_(other.rows_) {
  // The open page is private to its request: the copy gets its own.
  if (pool_ && rows_ % pool_->rows_per_page() != 0) {
    PageRef own = pool_->allocate();
    std::memcpy(own->data(), pages_.back()->data(), pool_->page_bytes());
    pages_.back() = std::move(own);
  }
}

PagedRows& PagedRows::operator=(const PagedRows& other) {
  if (this != &other) *this = PagedRows(other);
  return *this;
}

const RowFormat& PagedRows::format() const {
  DSERVE_CHECK_MSG(pool_ != nullptr, "a PagedRows without a pool has no format");
  return pool_->format();
}

const std::byte* PagedRows::encoded_row(int64_t i) const {
  DSERVE_CHECK_MSG(i >= 0 && i < rows_, "paged row index out of range");
  const int64_t per = pool_->rows_per_page();
  return pages_[static_cast<size_t>(i / per)]->data() + (i % per) * pool_->row_bytes();
}

const float* PagedRows::fp32_row(int64_t i) const {
  DSERVE_CHECK_MSG(pool_ != nullptr && pool_->format().encoding == RowEncoding::kFp32,
                   "fp32_row of encoded rows");
  return reinterpret_cast<const float*>(encoded_row(i));
}

void PagedRows::read_rows(int64_t first, int64_t count, float* out) const {
  DSERVE_CHECK_MSG(first >= 0 && count >= 0 && first + count <= rows_, "paged rows out of range");
  const int64_t per = count > 0 ? pool_->rows_per_page() : 1;
  while (count > 0) {
    const int64_t n = std::min(count, per - first % per);
    decode_rows(pool_->format(), encoded_row(first), n, out);
    out += n * pool_->width();
    first += n;
    count -= n;
  }
}

// Writes `count` rows into the pages, opening pages as they fill: `put(n, to)` writes the next
// n rows of its input, encoded, at `to` inside the open page.
template <typename Put>
void PagedRows::fill(int64_t count, Put put) {
  DSERVE_CHECK_MSG(pool_ != nullptr || count == 0, "append to a PagedRows without a pool");
  const int64_t per = count > 0 ? pool_->rows_per_page() : 1;
  while (count > 0) {
    if (rows_ % per == 0) pages_.push_back(pool_->allocate());
    const int64_t at = rows_ % per;
    const int64_t n = std::min(count, per - at);
    DSERVE_CHECK_MSG(pages_.back().use_count() == 1, "writing into a shared page");
    put(n, pages_.back()->data() + at * pool_->row_bytes());
    rows_ += n;
    count -= n;
  }
}

void PagedRows::append(const float* rows, int64_t count) {
  fill(count, [&](int64_t n, std::byte* to) {
    encode_rows(pool_->format(), rows, n, to);
    rows += n * pool_->width();
  });
}

void PagedRows::append_decoded(const float* rows, int64_t count) {
  fill(count, [&](int64_t n, std::byte* to) {
    encode_decoded_rows(pool_->format(), rows, n, to);
    rows += n * pool_->width();
  });
}

void PagedRows::append_encoded(const std::byte* rows, int64_t count) {
  fill(count, [&](int64_t n, std::byte* to) {
    const auto bytes = static_cast<size_t>(n * pool_->row_bytes());
    std::memcpy(to, rows, bytes);
    rows += bytes;
  });
}

void PagedRows::append_page(PageRef page) {
  DSERVE_CHECK_MSG(pool_ != nullptr && rows_ % pool_->rows_per_page() == 0,
                   "a shared page can only follow full pages");
  DSERVE_CHECK_MSG(page != nullptr && page->pool().format() == pool_->format() &&
                       page->size_bytes() == static_cast<int64_t>(pool_->page_bytes()),
                   "page of another format or size");
  pages_.push_back(std::move(page));
  rows_ += pool_->rows_per_page();
}

void PagedRows::truncate_pages(int64_t rows) {
  DSERVE_CHECK_MSG(
      pool_ != nullptr && rows >= 0 && rows <= rows_ && rows % pool_->rows_per_page() == 0,
      "truncate to a page boundary within the rows");
  pages_.resize(static_cast<size_t>(rows / pool_->rows_per_page()));
  rows_ = rows;
}

void PagedRows::truncate(int64_t rows) {
  DSERVE_CHECK_MSG(rows >= 0 && rows <= rows_, "truncate to a row count within the rows");
  if (rows == rows_) return;
  const int64_t per = pool_->rows_per_page();
  pages_.resize(static_cast<size_t>((rows + per - 1) / per));
  rows_ = rows;
  const int64_t open = rows % per;
  if (open == 0) return;
  if (pages_.back().use_count() > 1) {
    PageRef own = pool_->allocate_for_overwrite();
    std::memcpy(own->data(), pages_.back()->data(), pool_->page_bytes());
    pages_.back() = std::move(own);
  }
  const auto kept = static_cast<size_t>(open * pool_->row_bytes());
  std::memset(pages_.back()->data() + kept, 0, pool_->page_bytes() - kept);
}

std::vector<PageRef> PagedRows::full_pages() const {
  if (!pool_) return {};
  const auto full = static_cast<size_t>(rows_ / pool_->rows_per_page());
  return {pages_.begin(), pages_.begin() + static_cast<std::ptrdiff_t>(full)};
}

}  // namespace dserve::kvstore
