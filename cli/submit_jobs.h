#pragma once
// `dserve submit --jobs FILE.jsonl`: a batch of requests, one JSON object per line, sent with
// bounded concurrency, progress on stderr, and one JSON result per job written in input order.
//
// A job line: {"id": "...", "prompt": "text" | "prompt_tokens": [ids], "chat": bool,
// "max_tokens": n, "temperature": x, "top_k": n, "top_p": x, "seed": n, "timeout_ms": n};
// only a prompt is required, "id" defaults to "line-<n>". Every line is checked before anything
// is sent; a bad line is reported with its number, the field, what was found and what was
// expected, and nothing runs.
//
// A result line: {"id", "request_id", "finish_reason", "text", "tokens", "usage": {...}} or
// {"id", "request_id", "error": {"code": "UNAVAILABLE", "message": "..."}}. Results are flushed
// as soon as every earlier job has one, so an interrupted batch keeps what finished.

#include <cstdint>
#include <string>

#include "dserve/api/serving_client.h"

namespace dserve::cli {

struct JobsOptions {
  std::string jobs_path;
  std::string out_path;  // "-" or empty: stdout
  int concurrency = 8;
  uint32_t default_max_tokens = 64;
};

// Runs the batch; 0 when every job completed, 1 when some failed, 2 on a bad jobs file.
int run_jobs(api::ServingClient& client, const JobsOptions& options);

}  // namespace dserve::cli
