#include "dserve/api/openai_server.h"

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "dserve/core/sampling_params.h"
#include "http_limits.h"
#include "job_checks.h"

namespace dserve::api {
namespace {

using nlohmann::json;

int64_t unix_seconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// OpenAI's error object.
struct ApiError {
  int http = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;
  std::string code;
};

json error_body(const ApiError& e) {
  json err = {{"message", e.message}, {"type", e.type}};
  err["param"] = e.param.empty() ? json(nullptr) : json(e.param);
  err["code"] = e.code.empty() ? json(nullptr) : json(e.code);
  return json{{"error", err}};
}

ApiError from_status(const Status& s) {
  ApiError e;
  e.message = s.message();
  switch (s.code()) {
    case StatusCode::kInvalidArgument:
    case StatusCode::kOutOfRange:
      e.http = 400;
      break;
    case StatusCode::kResourceExhausted:
      e.http = 429;
      e.type = "server_overloaded";
      e.code = "queue_full";
      break;
    case StatusCode::kUnavailable:
      e.http = 503;
      e.type = "service_unavailable";
      break;
    case StatusCode::kDeadlineExceeded:
      e.http = 504;
      e.type = "timeout";
      break;
    case StatusCode::kCancelled:
      e.http = 499;
      e.type = "cancelled";
      break;
    case StatusCode::kUnauthenticated:
      e.http = 401;
      e.type = "authentication_error";
      e.code = "invalid_api_key";
      break;
    case StatusCode::kPermissionDenied:
      e.http = 403;
      e.type = "permission_error";
      break;
    default:
      e.http = 500;
      e.type = "server_error";
      break;
  }
  return e;
}

void reply_error(httplib::Response& res, const ApiError& e) {
  res.status = e.http;
  res.set_content(error_body(e).dump(), "application/json");
}

std::optional<std::string_view> authorization_of(const httplib::Request& req) {
  auto it = req.headers.find("Authorization");  // header names are case-insensitive here
  if (it == req.headers.end()) return std::nullopt;
  return std::string_view(it->second);
}

// A refusal of the Authenticator: 401 for credentials, 429 for a per-token limit.
ApiError refusal(const Status& s) {
  ApiError e;
  e.message = s.message();
  if (s.code() == StatusCode::kUnauthenticated) {
    e.http = 401;
    e.type = "authentication_error";
    e.code = "invalid_api_key";
  } else {
    e.http = 429;
    e.type = "rate_limit_exceeded";
    e.code = "rate_limit_exceeded";
  }
  return e;
}

ApiError bad(std::string param, std::string message, std::string code = "") {
  ApiError e;
  e.param = std::move(param);
  e.message = std::move(message);
  e.code = std::move(code);
  return e;
}

std::string type_name(const json& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "a boolean";
  if (v.is_number_integer() || v.is_number_unsigned()) return "an integer";
  if (v.is_number()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_array()) return "an array";
  return "an object";
}

// What one request asks for, after validation.
struct Parsed {
  bool chat = false;
  bool stream = false;
  bool include_usage = false;
  actors::GenerateJob job;
};

}  // namespace

class OpenAiServer::Impl {
 public:
  Impl(actors::Gateway& gateway, const tokenizer::Tokenizer& tokenizer, OpenAiOptions options)
      : gateway_(gateway), tokenizer_(tokenizer), options_(std::move(options)) {}

  Result<uint16_t> listen() {
    if (options_.tls.enabled()) {
      // Read here first, so that a missing or unreadable file is named in the error.
      for (const auto& [what, path] :
           {std::pair{"--tls-cert", &options_.tls.cert}, std::pair{"--tls-key", &options_.tls.key},
            std::pair{"--tls-ca", &options_.tls.ca}}) {
        if (path->empty()) continue;
        auto text = read_credential_file(what, *path);
        if (!text.is_ok()) return text.status().with_context("OpenAI HTTP server");
      }
      auto ssl = std::make_unique<httplib::SSLServer>(
          options_.tls.cert.c_str(), options_.tls.key.c_str(),
          options_.tls.ca.empty() ? nullptr : options_.tls.ca.c_str());
      if (!ssl->is_valid()) {
        return invalid_argument(
            "OpenAI HTTP server: TLS cannot start with --tls-cert " + options_.tls.cert +
            " and --tls-key " + options_.tls.key +
            (options_.tls.ca.empty() ? "" : " and --tls-ca " + options_.tls.ca) +
            " (not PEM, or the key does not match the certificate)");
      }
      server_ = std::move(ssl);
    } else {
      server_ = std::make_unique<httplib::Server>();
    }
    httplib::Server& server = *server_;
    // Threads start as connections need them, up to options_.threads; as many accepted
    // connections again may wait for one, the rest wait in the kernel's backlog.
    const auto threads = static_cast<size_t>(std::max(1, options_.threads));
    server.new_task_queue = [threads] { return new BoundedTaskQueue(threads, threads); };
    server.set_socket_options(listen_socket_.options());
    // One request per connection: httplib 0.11 drops a request pipelined behind another on a
    // keep-alive connection (its read buffer goes with the first), so every response closes
    // the connection instead, and a client that pipelined sends the rest again (RFC 9112 9.3.2).
    server.set_keep_alive_max_count(1);
    // Every route wants a valid token when the Authenticator requires one.
    server.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
      if (!options_.auth) return httplib::Server::HandlerResponse::Unhandled;
      auto client = options_.auth->authenticate(authorization_of(req));
      if (client.is_ok()) return httplib::Server::HandlerResponse::Unhandled;
      res.set_header("WWW-Authenticate", "Bearer");
      reply_error(res, refusal(client.status()));
      return httplib::Server::HandlerResponse::Handled;
    });
    server.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
      json body = {{"object", "list"},
                   {"data", json::array({{{"id", options_.model_name},
                                          {"object", "model"},
                                          {"created", started_},
                                          {"owned_by", "dserve"}}})}};
      res.set_content(body.dump(), "application/json");
    });
    // Bodies are read by the handlers, counted as they arrive (httplib bounds only a
    // Content-Length, not a chunked body).
    server.set_payload_max_length(options_.max_body_bytes);
    for (const auto& [path, chat] :
         {std::pair{"/v1/completions", false}, std::pair{"/v1/chat/completions", true}}) {
      server.Post(path, [this, chat = chat](const httplib::Request& req, httplib::Response& res,
                                            const httplib::ContentReader& content) {
        if (auto body = read_body(req, res, content)) handle(req, *body, res, chat);
      });
    }
    server.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
      if (!res.body.empty()) return;
      ApiError e;
      e.http = res.status;
      e.message = res.status == 404 ? "no route " + req.method + " " + req.path +
                                          "; this server serves /v1/completions, "
                                          "/v1/chat/completions and /v1/models"
                                    : "HTTP " + std::to_string(res.status);
      e.code = res.status == 404 ? "unknown_url" : "";
      reply_error(res, e);
    });
    const int port = options_.port == 0
                         ? server.bind_to_any_port(options_.host)
                         : (server.bind_to_port(options_.host, options_.port) ? options_.port : -1);
    if (port <= 0) {
      return unavailable("OpenAI HTTP server: cannot listen on " + options_.host + ":" +
                         std::to_string(options_.port) +
                         " (address in use, or not an address of this host)");
    }
    if (Status backlog = listen_socket_.set_backlog(options_.backlog); !backlog.is_ok())
      return backlog.with_context("OpenAI HTTP server");
    port_ = static_cast<uint16_t>(port);
    thread_ = std::thread([this] { server_->listen_after_bind(); });
    return port_;
  }

  void stop() {
    if (server_) server_->stop();
    if (thread_.joinable()) thread_.join();
  }

  uint16_t port() const { return port_; }

 private:
  std::optional<ApiError> parse(const json& body, bool chat, Parsed& out) const;
  void handle(const httplib::Request& req, const std::string& request_body, httplib::Response& res,
              bool chat);
  // The body of a POST, read through `content` up to options_.max_body_bytes; nullopt (and a
  // 413 reply, closing the connection) past it.
  std::optional<std::string> read_body(const httplib::Request& req, httplib::Response& res,
                                       const httplib::ContentReader& content) const;

  actors::Gateway& gateway_;
  const tokenizer::Tokenizer& tokenizer_;
  OpenAiOptions options_;
  ListenSocket listen_socket_;
  std::unique_ptr<httplib::Server> server_;  // an SSLServer with TLS
  std::thread thread_;
  uint16_t port_ = 0;
  int64_t started_ = unix_seconds();
  std::atomic<uint64_t> next_id_{1};
  // Makes the ids of this process's responses (and so its requests' ids in the logs) unlike
  // those of any other gateway process, or of this one before a restart.
  const std::string id_tag_ = [] {
    std::random_device rd;
    char tag[16];
    std::snprintf(tag, sizeof tag, "%08x", rd());
    return std::string(tag);
  }();
};

std::optional<ApiError> OpenAiServer::Impl::parse(const json& body, bool chat, Parsed& out) const {
  out.chat = chat;
  if (!body.is_object()) return bad("", "the request body must be a JSON object");
  auto field = [&](const char* name) -> const json* {
    auto it = body.find(name);
    return it == body.end() || it->is_null() ? nullptr : &*it;
  };
  // The model.
  const json* model = field("model");
  if (!model)
    return bad("model", "`model` is required (this server serves '" + options_.model_name + "')");
  if (!model->is_string())
    return bad("model", "`model` must be a string, got " + type_name(*model));
  if (model->get<std::string>() != options_.model_name) {
    ApiError e = bad("model",
                     "the model '" + model->get<std::string>() +
                         "' does not exist; this server "
                         "serves '" +
                         options_.model_name + "'",
                     "model_not_found");
    e.http = 404;
    return e;
  }
  // What this server does not do is refused, never silently ignored.
  if (const json* n = field("n"); n && !(n->is_number_integer() && n->get<int64_t>() == 1))
    return bad("n", "only n = 1 is supported, got " + n->dump());
  if (const json* s = field("stop"); s && !(s->is_array() && s->empty()))
    return bad("stop", "stop sequences are not supported");
  for (const char* unsupported : {"best_of", "suffix", "tools", "functions", "tool_choice"}) {
    if (const json* v = field(unsupported); v && !(unsupported == std::string("best_of") &&
                                                   v->is_number_integer() && v->get<int>() == 1))
      return bad(unsupported, std::string("`") + unsupported + "` is not supported");
  }
  if (const json* l = field("logprobs"); l && !(l->is_boolean() && !l->get<bool>()))
    return bad("logprobs", "logprobs are not supported");
  if (const json* e = field("echo"); e && !(e->is_boolean() && !e->get<bool>()))
    return bad("echo", "echo is not supported");

  // The prompt.
  std::vector<int32_t>& ids = out.job.prompt;
  if (chat) {
    const json* messages = field("messages");
    if (!messages || !messages->is_array() || messages->empty())
      return bad("messages", "`messages` must be a non-empty array of {role, content}");
    std::vector<tokenizer::ChatMessage> turns;
    for (size_t i = 0; i < messages->size(); ++i) {
      const json& m = (*messages)[i];
      const std::string where = "messages[" + std::to_string(i) + "]";
      if (!m.is_object()) return bad(where, where + " must be an object");
      auto role = m.find("role");
      auto content = m.find("content");
      if (role == m.end() || !role->is_string())
        return bad(where + ".role", where + ".role must be a string");
      const std::string r = role->get<std::string>();
      if (r != "system" && r != "user" && r != "assistant" && r != "tool") {
        return bad(where + ".role",
                   where + ".role must be system, user, assistant or tool, got '" + r + "'");
      }
      std::string text;
      if (content != m.end() && content->is_string()) {
        text = content->get<std::string>();
      } else if (content != m.end() && content->is_array()) {
        // The content-parts form: only text parts.
        for (const json& part : *content) {
          if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
              !part["text"].is_string())
            return bad(where + ".content", "only text content parts are supported");
          text += part["text"].get<std::string>();
        }
      } else {
        return bad(where + ".content", where + ".content must be a string");
      }
      turns.push_back({r, std::move(text)});
    }
    // The messages' text is text: only the template inserts the chat's control tokens.
    auto encoded = tokenizer::encode_chat(tokenizer_, turns, /*add_generation_prompt=*/true);
    if (!encoded.is_ok())
      return bad("messages", "the messages cannot be tokenized: " + encoded.status().message());
    ids = std::move(encoded).value();
  } else {
    const json* prompt = field("prompt");
    if (!prompt) return bad("prompt", "`prompt` is required");
    const json* text = nullptr;
    if (prompt->is_string()) {
      text = prompt;
    } else if (prompt->is_array() && prompt->size() == 1 && (*prompt)[0].is_string()) {
      text = &(*prompt)[0];
    } else if (prompt->is_array() && !prompt->empty() && (*prompt)[0].is_number_integer()) {
      for (size_t i = 0; i < prompt->size(); ++i) {
        const json& t = (*prompt)[i];
        if (!t.is_number_integer() || t.get<int64_t>() < 0 ||
            t.get<int64_t>() >= tokenizer_.vocab_size())
          return bad("prompt", "prompt[" + std::to_string(i) + "] is not a token id");
        ids.push_back(t.get<int32_t>());
      }
    } else {
      return bad("prompt",
                 "`prompt` must be a string, a one-string array or an array of token ids");
    }
    if (text) {
      auto encoded = tokenizer::encode_prompt(tokenizer_, text->get<std::string>(), /*chat=*/false,
                                              options_.bos_token_id);
      if (!encoded.is_ok())
        return bad("prompt", "the prompt cannot be tokenized: " + encoded.status().message());
      ids = std::move(encoded).value();
    }
  }
  if (ids.empty()) return bad(chat ? "messages" : "prompt", "the prompt is empty");
  if (ids.size() > options_.max_prompt_tokens) {
    return bad(chat ? "messages" : "prompt",
               "the prompt has " + std::to_string(ids.size()) + " tokens; the limit is " +
                   std::to_string(options_.max_prompt_tokens),
               "context_length_exceeded");
  }

  // Sampling and length.
  out.job.max_new_tokens = options_.default_max_tokens;
  for (const char* name : {"max_tokens", "max_completion_tokens"}) {
    if (const json* v = field(name)) {
      if (!v->is_number_integer() || v->get<int64_t>() < 1 ||
          v->get<int64_t>() > options_.max_tokens_limit) {
        return bad(name, std::string("`") + name + "` must be an integer in 1.." +
                             std::to_string(options_.max_tokens_limit) + ", got " + v->dump());
      }
      out.job.max_new_tokens = v->get<uint32_t>();
    }
  }
  out.job.temperature = 1.0f;  // OpenAI's default
  if (const json* v = field("temperature")) {
    if (!v->is_number() || !(v->get<double>() >= 0.0 && v->get<double>() <= 2.0))
      return bad("temperature", "`temperature` must be a number in [0, 2], got " + v->dump());
    out.job.temperature = v->get<float>();
  }
  if (const json* v = field("top_p")) {
    if (!v->is_number() || !(v->get<double>() > 0.0 && v->get<double>() <= 1.0))
      return bad("top_p", "`top_p` must be a number in (0, 1], got " + v->dump());
    out.job.top_p = v->get<float>();
  }
  if (const json* v = field("top_k")) {  // an extension many servers accept
    if (!v->is_number_integer() || v->get<int64_t>() < 0)
      return bad("top_k", "`top_k` must be an integer >= 0, got " + v->dump());
    out.job.top_k = v->get<int64_t>();
  }
  if (const json* v = field("seed")) {
    if (!v->is_number_integer()) return bad("seed", "`seed` must be an integer");
    out.job.seed = static_cast<uint64_t>(v->get<int64_t>());
  }
  // Penalties and logit bias: their types here, their ranges where the sampler defines them.
  for (const auto& [name, target] : {std::pair{"presence_penalty", &out.job.presence_penalty},
                                     std::pair{"frequency_penalty", &out.job.frequency_penalty}}) {
    if (const json* v = field(name)) {
      if (!v->is_number()) return bad(name, std::string("`") + name + "` must be a number");
      *target = v->get<float>();
    }
  }
  if (const json* v = field("logit_bias")) {
    if (!v->is_object() || v->size() > kMaxLogitBiasEntries) {
      return bad("logit_bias", "`logit_bias` must be an object of at most " +
                                   std::to_string(kMaxLogitBiasEntries) +
                                   " token id -> bias entries");
    }
    for (const auto& [key, bias] : v->items()) {
      const bool digits =
          !key.empty() && key.size() <= 9 &&
          std::all_of(key.begin(), key.end(), [](char c) { return c >= '0' && c <= '9'; });
      if (!digits || !bias.is_number()) {
        return bad("logit_bias", "`logit_bias` maps token ids (\"123\") to numbers; got \"" +
                                     key.substr(0, 32) + "\": " + bias.dump().substr(0, 32));
      }
      out.job.logit_bias.emplace_back(std::stoi(key), bias.get<float>());
    }
    std::sort(out.job.logit_bias.begin(), out.job.logit_bias.end());
  }
  if (Status s = check_penalties(out.job, tokenizer_.vocab_size()); !s.is_ok())
    return bad(s.message().substr(0, s.message().find(' ')), s.message());
  if (const json* v = field("response_format")) {
    // Plain text is what every answer is; constrained output (JSON mode, schemas) is not done,
    // and is refused rather than ignored.
    const json* type = v->is_object() && v->contains("type") ? &(*v)["type"] : nullptr;
    if (!type || !type->is_string() || type->get<std::string>() != "text") {
      return bad("response_format",
                 "only `response_format` {\"type\": \"text\"} is supported, got " +
                     v->dump().substr(0, 80));
    }
  }
  if (const json* v = field("stream")) {
    if (!v->is_boolean()) return bad("stream", "`stream` must be a boolean");
    out.stream = v->get<bool>();
  }
  if (const json* v = field("stream_options")) {
    if (!v->is_object()) return bad("stream_options", "`stream_options` must be an object");
    out.include_usage = v->value("include_usage", false);
  }
  return std::nullopt;
}

std::optional<std::string> OpenAiServer::Impl::read_body(
    const httplib::Request& req, httplib::Response& res,
    const httplib::ContentReader& content) const {
  const size_t limit = options_.max_body_bytes;
  std::string body;
  bool over = req.get_header_value<uint64_t>("Content-Length") > limit;
  if (!over) {
    content([&](const char* data, size_t n) {
      over = body.size() + n > limit;
      if (!over) body.append(data, n);
      return !over;
    });
  }
  if (!over) return body;
  ApiError e = bad("",
                   "the request body is larger than " + std::to_string(limit) +
                       " bytes, the limit (--http-max-body-bytes)",
                   "request_too_large");
  e.http = 413;
  reply_error(res, e);
  // What is left of the body is never read: the connection cannot carry another request.
  res.set_header("Connection", "close");
  return std::nullopt;
}

void OpenAiServer::Impl::handle(const httplib::Request& req, const std::string& request_body,
                                httplib::Response& res, bool chat) {
  // The client's concurrency slot, held until the reply (a stream: its last event) is sent.
  auto admission = std::make_shared<Admission>();
  if (options_.auth) {
    auto admitted = options_.auth->admit(authorization_of(req));
    if (!admitted.is_ok()) {
      reply_error(res, refusal(admitted.status()));
      return;
    }
    *admission = std::move(admitted).value();
  }
  json body = json::parse(request_body, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) {
    reply_error(res, bad("", "the request body is not valid JSON"));
    return;
  }
  auto parsed = std::make_shared<Parsed>();
  if (auto error = parse(body, chat, *parsed)) {
    reply_error(res, *error);
    return;
  }
  const std::string id = std::string(chat ? "chatcmpl-" : "cmpl-") + id_tag_ + "-" +
                         std::to_string(next_id_.fetch_add(1));
  // The response's id is the request's id in every process's logs.
  parsed->job.request_id = id;
  parsed->job.client = admission->client();
  const int64_t created = unix_seconds();
  const std::string object = chat ? "chat.completion" : "text_completion";
  auto usage_json = [parsed](const actors::GenerateOutcome& out) {
    const auto prompt = static_cast<uint32_t>(parsed->job.prompt.size());
    return json{{"prompt_tokens", prompt},
                {"completion_tokens", out.tokens},
                {"total_tokens", prompt + out.tokens}};
  };

  if (!parsed->stream) {
    tokenizer::StreamDecoder text(tokenizer_);
    std::string content;
    auto on_tokens = [&](std::span<const int32_t> tokens, uint32_t) {
      for (int32_t t : tokens) {
        auto piece = text.push(t);
        if (piece.is_ok()) content += *piece;
      }
    };
    const actors::GenerateOutcome out = gateway_.generate(parsed->job, on_tokens, {});
    if (!out.status.is_ok()) {
      reply_error(res, from_status(out.status));
      return;
    }
    content += text.flush();
    json choice = {{"index", 0}, {"finish_reason", out.finish_reason}};
    if (chat) {
      choice["message"] = {{"role", "assistant"}, {"content", content}};
    } else {
      choice["text"] = content;
      choice["logprobs"] = nullptr;
    }
    json reply = {{"id", id},
                  {"object", object},
                  {"created", created},
                  {"model", options_.model_name},
                  {"choices", json::array({choice})},
                  {"usage", usage_json(out)}};
    res.set_content(reply.dump(), "application/json");
    return;
  }

  // Server-sent events: one "data: {chunk}" per run of tokens, then the finish chunk, the usage
  // chunk when asked for, and "data: [DONE]". A failure after the stream began is an error
  // event, then the end.
  res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider(
      "text/event-stream",
      [this, parsed, id, created, chat, usage_json, admission](size_t, httplib::DataSink& sink) {
        const std::string chunk_object = chat ? "chat.completion.chunk" : "text_completion";
        auto chunk = [&](json delta_or_text, json finish) {
          json choice = {{"index", 0}, {"finish_reason", finish}};
          if (chat) {
            choice["delta"] = std::move(delta_or_text);
          } else {
            choice["text"] = std::move(delta_or_text);
            choice["logprobs"] = nullptr;
          }
          return json{{"id", id},
                      {"object", chunk_object},
                      {"created", created},
                      {"model", options_.model_name},
                      {"choices", json::array({choice})}};
        };
        std::atomic<bool> gone{false};
        auto send = [&](const json& event) {
          const std::string line = "data: " + event.dump() + "\n\n";
          if (!gone && !sink.write(line.data(), line.size())) gone = true;
        };
        if (chat) send(chunk(json{{"role", "assistant"}, {"content", ""}}, nullptr));
        tokenizer::StreamDecoder text(tokenizer_);
        auto on_tokens = [&](std::span<const int32_t> tokens, uint32_t) {
          std::string piece;
          for (int32_t t : tokens) {
            auto p = text.push(t);
            if (p.is_ok()) piece += *p;
          }
          if (piece.empty()) return;
          send(chat ? chunk(json{{"content", piece}}, nullptr) : chunk(piece, nullptr));
        };
        auto cancelled = [&] { return gone.load() || !sink.is_writable(); };
        const actors::GenerateOutcome out = gateway_.generate(parsed->job, on_tokens, cancelled);
        if (out.status.is_ok()) {
          const std::string rest = text.flush();
          if (chat) {
            if (!rest.empty()) send(chunk(json{{"content", rest}}, nullptr));
            send(chunk(json::object(), out.finish_reason));
          } else {
            send(chunk(rest, out.finish_reason));
          }
          if (parsed->include_usage) {
            json usage = chunk(json::object(), nullptr);
            usage["choices"] = json::array();
            usage["usage"] = usage_json(out);
            send(usage);
          }
        } else if (!gone) {
          send(error_body(from_status(out.status)));
        }
        if (!gone) {
          static const std::string done = "data: [DONE]\n\n";
          sink.write(done.data(), done.size());
        }
        sink.done();
        return true;
      });
}

Result<std::unique_ptr<OpenAiServer>> OpenAiServer::start(actors::Gateway& gateway,
                                                          const tokenizer::Tokenizer& tokenizer,
                                                          OpenAiOptions options) {
  auto impl = std::make_unique<Impl>(gateway, tokenizer, std::move(options));
  auto port = impl->listen();
  if (!port.is_ok()) return port.status();
  return std::unique_ptr<OpenAiServer>(new OpenAiServer(std::move(impl)));
}

OpenAiServer::OpenAiServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
OpenAiServer::~OpenAiServer() {
  impl_->stop();
}
uint16_t OpenAiServer::port() const {
  return impl_->port();
}

}  // namespace dserve::api
