// Reads a Prometheus text exposition (format 0.0.4) from stdin and prints what
// parse-prometheus-text-format makes of it as JSON on stdout: the check of dserve's /metrics
// against a parser dserve did not write (tests/ops/metrics_server_test.cc). A line the parser
// refuses makes it throw: the exit status is then non-zero and the reason is on stderr.
import parsePrometheusTextFormat from 'parse-prometheus-text-format';

let text = '';
process.stdin.setEncoding('utf8');
for await (const chunk of process.stdin) text += chunk;
process.stdout.write(JSON.stringify(parsePrometheusTextFormat(text)) + '\n');
