// The gateway's Prometheus metrics (GatewayOptions::metrics).

#include "gateway_impl.h"

namespace dserve::actors::detail {

GatewayMetrics::GatewayMetrics(ops::MetricsRegistry& r)
    : completed(r.counter("dserve_gateway_requests_total", "Requests that ended, by outcome.",
                          {{"outcome", "completed"}})),
      failed(r.counter("dserve_gateway_requests_total", "Requests that ended, by outcome.",
                       {{"outcome", "failed"}})),
      cancelled(r.counter("dserve_gateway_requests_total", "Requests that ended, by outcome.",
                          {{"outcome", "cancelled"}})),
      refused(r.counter("dserve_gateway_requests_total", "Requests that ended, by outcome.",
                        {{"outcome", "refused"}})),
      replays(r.counter("dserve_gateway_replays_total",
                        "Placements after a request's first (a worker failed).")),
      transfer_bytes(r.counter("dserve_gateway_kv_transfer_bytes_total",
                               "KV state bytes written into decode workers' regions.")),
      ttft(r.histogram("dserve_gateway_time_to_first_token_seconds",
                       "Admission to the first token.", ops::latency_buckets_seconds())),
      tpot(r.histogram("dserve_gateway_time_per_output_token_seconds",
                       "(request duration - time to first token) / (tokens - 1).",
                       ops::latency_buckets_seconds())),
      duration(r.histogram("dserve_gateway_request_duration_seconds",
                           "Admission to the end of a completed request.",
                           ops::latency_buckets_seconds())),
      queue(r.histogram("dserve_gateway_queue_seconds",
                        "Time waiting for admission and for worker room.",
                        ops::latency_buckets_seconds())),
      transfer(r.histogram("dserve_gateway_kv_transfer_seconds",
                           "Time to write one request's KV state into a decode worker.",
                           ops::latency_buckets_seconds())),
      running(r.gauge("dserve_gateway_running_requests", "Requests placed now.")),
      queued(r.gauge("dserve_gateway_queued_requests", "Requests waiting for admission.")) {}

void GatewayMetrics::record(const GenerateOutcome& out, double seconds) {
  switch (out.status.code()) {
    case StatusCode::kOk:
      completed.inc();
      break;
    case StatusCode::kCancelled:
      cancelled.inc();
      break;
    case StatusCode::kResourceExhausted:
      refused.inc();
      break;
    default:
      failed.inc();
      break;
  }
  if (out.attempts > 1) replays.inc(out.attempts - 1);
  if (out.transfer_bytes > 0) {
    transfer_bytes.inc(static_cast<double>(out.transfer_bytes));
    transfer.observe(out.transfer_ms / 1000.0);
  }
  if (!out.status.is_ok()) return;
  queue.observe(out.queue_ms / 1000.0);
  duration.observe(seconds);
  if (out.tokens == 0) return;
  ttft.observe(out.ttft_ms / 1000.0);
  if (out.tokens > 1) tpot.observe((seconds - out.ttft_ms / 1000.0) / (out.tokens - 1));
}

}  // namespace dserve::actors::detail
