#pragma once
// OpenAiServer: an OpenAI-compatible HTTP API in front of the Gateway, for the clients people
// already have: POST /v1/completions and /v1/chat/completions (streamed as server-sent events
// with "stream": true, whole otherwise) and GET /v1/models. Bad requests get OpenAI's error
// object ({"error": {"message", "type", "param", "code"}}) with the field named; failures map
// to the matching HTTP status (400, 404, 429, 503, 504). A client that disconnects cancels its
// request on the workers. Listens only on the address it is given, over TLS when given a
// certificate.
//
// With an Authenticator that requires tokens, every route (/v1/models too) wants
// `Authorization: Bearer <token>`; a missing or unknown token gets 401 with type
// "authentication_error" and code "invalid_api_key". The per-token limits answer 429 with
// type "rate_limit_exceeded"; they count completions only.
//
// Differences from OpenAI's service, each refused with a clear error rather than ignored:
// n > 1, best_of, logprobs, echo, suffix, tools/functions, and `stop` sequences. Prompt arrays
// of token ids are accepted; arrays of several strings are not.

#include <cstdint>
#include <memory>
#include <string>

#include "dserve/actors/gateway.h"
#include "dserve/api/auth.h"
#include "dserve/core/status.h"
#include "dserve/tokenizer/tokenizer.h"

namespace dserve::api {

struct OpenAiOptions {
  std::string host = "127.0.0.1";
  uint16_t port = 0;                  // 0: any free port (see port())
  std::string model_name = "dserve";  // what /v1/models lists and responses name
  uint32_t default_max_tokens = 256;  // when a request sets none
  uint32_t max_tokens_limit = 32768;
  uint32_t max_prompt_tokens = 1 << 20;
  int32_t bos_token_id = 0;  // prepended to completion prompts given as text
  // Connections served at once (a stream holds one thread); threads start when needed and
  // end after 30 s idle. As many accepted connections again may wait for a thread.
  int threads = 256;
  int backlog = 1024;  // the listen backlog: connections the kernel holds beyond those
  // A request body larger than this is refused (413) whatever its encoding: a Content-Length
  // over it before the body is read, a chunked body as soon as it passes the bound.
  size_t max_body_bytes = size_t{1} << 20;
  // Tokens and per-token limits (shared with the gRPC API); null: open, no limits.
  std::shared_ptr<Authenticator> auth;
  // HTTPS when cert and key are given; with `ca`, clients must present a certificate it signed.
  TlsFiles tls;
};

class OpenAiServer {
 public:
  // `gateway` and `tokenizer` must outlive the server.
  static Result<std::unique_ptr<OpenAiServer>> start(actors::Gateway& gateway,
                                                     const tokenizer::Tokenizer& tokenizer,
                                                     OpenAiOptions options);
  ~OpenAiServer();  // stops listening, waits for the calls in flight
  OpenAiServer(const OpenAiServer&) = delete;
  OpenAiServer& operator=(const OpenAiServer&) = delete;

  uint16_t port() const;

  class Impl;

 private:
  explicit OpenAiServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dserve::api
