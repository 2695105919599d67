#include "control_tls_check.h"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

#include <memory>
#include <string>

#include "dserve/core/files.h"

namespace dserve::actors {
namespace {

std::string openssl_reason() {
  const unsigned long code = ERR_get_error();
  ERR_clear_error();
  if (code == 0) return "no further detail";
  char buf[256];
  ERR_error_string_n(code, buf, sizeof(buf));
  return buf;
}

// PEM files are small; anything larger is not one.
constexpr size_t kMaxPemFileBytes = size_t{1} << 20;

}  // namespace

Status check_control_tls(const ControlTls& tls) {
  if (tls.cert.empty() || tls.key.empty() || tls.ca.empty()) {
    return invalid_argument(
        "control-plane TLS needs a certificate, its key and the cluster CA (all three); got " +
        std::string(tls.cert.empty() ? "no certificate" : "a certificate") + ", " +
        (tls.key.empty() ? "no key" : "a key") + ", " + (tls.ca.empty() ? "no CA" : "a CA"));
  }
  // Through read_bounded_file first: a FIFO or a device would block OpenSSL's reader.
  for (const auto& [what, path] :
       {std::pair{"control-plane TLS certificate", &tls.cert},
        std::pair{"control-plane TLS key", &tls.key}, std::pair{"control-plane TLS CA", &tls.ca}}) {
    if (auto text = read_bounded_file(*path, what, kMaxPemFileBytes); !text.is_ok()) {
      return invalid_argument(text.status().message());
    }
  }
  ERR_clear_error();
  std::unique_ptr<SSL_CTX, decltype(&SSL_CTX_free)> ctx(SSL_CTX_new(TLS_method()), SSL_CTX_free);
  if (!ctx) return internal_error("control-plane TLS: SSL_CTX_new: " + openssl_reason());
  if (SSL_CTX_use_certificate_chain_file(ctx.get(), tls.cert.c_str()) != 1) {
    return invalid_argument("control-plane TLS certificate " + tls.cert +
                            " is not a PEM certificate chain: " + openssl_reason());
  }
  if (SSL_CTX_use_PrivateKey_file(ctx.get(), tls.key.c_str(), SSL_FILETYPE_PEM) != 1) {
    return invalid_argument("control-plane TLS key " + tls.key +
                            " is not the PEM private key of certificate " + tls.cert + ": " +
                            openssl_reason());
  }
  if (SSL_CTX_check_private_key(ctx.get()) != 1) {
    return invalid_argument("control-plane TLS key " + tls.key +
                            " is not the PEM private key of certificate " + tls.cert + ": " +
                            openssl_reason());
  }
  if (SSL_CTX_load_verify_locations(ctx.get(), tls.ca.c_str(), nullptr) != 1) {
    return invalid_argument("control-plane TLS CA " + tls.ca +
                            " is not a PEM certificate: " + openssl_reason());
  }
  // Our own certificate must chain to the CA, or every peer would refuse us.
  std::unique_ptr<X509_STORE_CTX, decltype(&X509_STORE_CTX_free)> verify(X509_STORE_CTX_new(),
                                                                         X509_STORE_CTX_free);
  X509* leaf = SSL_CTX_get0_certificate(ctx.get());
  STACK_OF(X509)* chain = nullptr;
  SSL_CTX_get0_chain_certs(ctx.get(), &chain);
  if (!verify || leaf == nullptr ||
      X509_STORE_CTX_init(verify.get(), SSL_CTX_get_cert_store(ctx.get()), leaf, chain) != 1) {
    return internal_error("control-plane TLS: cannot set up verification: " + openssl_reason());
  }
  if (X509_verify_cert(verify.get()) != 1) {
    return invalid_argument("control-plane TLS certificate " + tls.cert +
                            " is not accepted by CA " + tls.ca + ": " +
                            X509_verify_cert_error_string(X509_STORE_CTX_get_error(verify.get())));
  }
  return Status::ok();
}

}  // namespace dserve::actors
