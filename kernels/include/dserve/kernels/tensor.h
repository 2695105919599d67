#pragma once
// Tensor: a dense, row-major fp32 array with a shape, owned by value. It is the currency of
// the CPU reference backend: weights are dequantized into it at load, activations live in it.

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <vector>

#include "dserve/core/check.h"

namespace dserve {

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::vector<int64_t> shape) : shape_(std::move(shape)) {
    data_.assign(static_cast<size_t>(count(shape_)), 0.0f);
  }
  Tensor(std::initializer_list<int64_t> shape) : Tensor(std::vector<int64_t>(shape)) {}
  Tensor(std::vector<int64_t> shape, std::vector<float> data)
      : shape_(std::move(shape)), data_(std::move(data)) {
    DSERVE_CHECK_MSG(static_cast<int64_t>(data_.size()) == count(shape_),
                     "tensor data size does not match its shape " + shape_string());
  }

  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t dim(size_t i) const {
    DSERVE_CHECK(i < shape_.size());
    return shape_[i];
  }
  size_t rank() const { return shape_.size(); }
  int64_t numel() const { return static_cast<int64_t>(data_.size()); }
  bool empty() const { return data_.empty(); }
  // For a matrix view: the first dimension and the product of the others.
  int64_t rows() const { return shape_.empty() ? 0 : shape_[0]; }
  int64_t cols() const {
    const int64_t r = rows();
    return r == 0 ? 0 : numel() / r;
  }

  float* data() { return data_.data(); }
  const float* data() const { return data_.data(); }
  std::span<float> span() { return data_; }
  std::span<const float> span() const { return data_; }
  float* row(int64_t i) { return data_.data() + i * cols(); }
  const float* row(int64_t i) const { return data_.data() + i * cols(); }
  std::vector<float>& storage() { return data_; }

  std::string shape_string() const {
    std::string s = "[";
    for (size_t i = 0; i < shape_.size(); ++i)
      s += (i ? ", " : "") + std::to_string(shape_[i]);
    return s + "]";
  }
  static int64_t count(const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (int64_t d : shape)
      n *= d;
    return n;
  }

 private:
  std::vector<int64_t> shape_;
  std::vector<float> data_;
};

}  // namespace dserve
