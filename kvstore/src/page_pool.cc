#include "dserve/kvstore/page_pool.h"

#include <algorithm>
#include <cstring>

#include "dserve/core/check.h"

namespace dserve::kvstore {

Page::Page(std::shared_ptr<PagePool> pool, int64_t floats)
    : pool_(std::move(pool)), floats_(floats), data_(new float[static_cast<size_t>(floats)]()) {
  pool_->pages_in_use_.fetch_add(1);
}

Page::~Page() {
  pool_->pages_in_use_.fetch_sub(1);
}

PagePool::PagePool(std::string name, int64_t rows_per_page, int64_t width)
    : name_(std::move(name)), rows_per_page_(rows_per_page), width_(width) {}

std::shared_ptr<PagePool> PagePool::create(std::string name, int64_t rows_per_page, int64_t width) {
  DSERVE_CHECK_MSG(rows_per_page > 0 && width > 0, "a page needs rows and width");
  return std::shared_ptr<PagePool>(new PagePool(std::move(name), rows_per_page, width));
}

PageRef PagePool::allocate() {
  return std::make_shared<Page>(shared_from_this(), page_floats());
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

const float* PagedRows::row(int64_t i) const {
  DSERVE_CHECK_MSG(i >= 0 && i < rows_, "paged row index out of range");
  const int64_t per = pool_->rows_per_page();
  return pages_[static_cast<size_t>(i / per)]->data() + (i % per) * pool_->width();
}

void PagedRows::append(const float* rows, int64_t count) {
  DSERVE_CHECK_MSG(pool_ != nullptr || count == 0, "append to a PagedRows without a pool");
  const int64_t per = count > 0 ? pool_->rows_per_page() : 1;
  const int64_t width = count > 0 ? pool_->width() : 0;
  while (count > 0) {
    if (rows_ % per == 0) pages_.push_back(pool_->allocate());
    const int64_t at = rows_ % per;
    const int64_t n = std::min(count, per - at);
    DSERVE_CHECK_MSG(pages_.back().use_count() == 1, "writing into a shared page");
    std::memcpy(pages_.back()->data() + at * width, rows,
                static_cast<size_t>(n * width) * sizeof(float));
    rows += n * width;
    rows_ += n;
    count -= n;
  }
}

void PagedRows::append_page(PageRef page) {
  DSERVE_CHECK_MSG(pool_ != nullptr && rows_ % pool_->rows_per_page() == 0,
                   "a shared page can only follow full pages");
  DSERVE_CHECK_MSG(page != nullptr && page->floats() == pool_->page_floats(),
                   "page of another size");
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

std::vector<PageRef> PagedRows::full_pages() const {
  if (!pool_) return {};
  const auto full = static_cast<size_t>(rows_ / pool_->rows_per_page());
  return {pages_.begin(), pages_.begin() + static_cast<std::ptrdiff_t>(full)};
}

}  // namespace dserve::kvstore
