#pragma once
// SHA-256 (OpenSSL's EVP digest): the bundle's manifest and the model checkpoint digests.

#include <cstddef>
#include <string>
#include <string_view>

struct evp_md_ctx_st;  // OpenSSL's EVP_MD_CTX

namespace dserve {

// One SHA-256 computation over data given in pieces.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(const void* data, size_t n);
  std::string hex();  // 64 lowercase hex digits; ends the computation

 private:
  evp_md_ctx_st* ctx_;
};

// "<64 lowercase hex digits>" of SHA-256 over `data`.
std::string sha256_hex(std::string_view data);

}  // namespace dserve
