// Drives a dserve gateway's OpenAI-compatible API with the official `openai` client and prints
// what it saw as one JSON object (tests/serving/openai_test.cc checks it).
//   node check.mjs BASE_URL MODEL PROMPT
import OpenAI from "openai";

const [baseURL, model, prompt] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 60000 });
const out = {};

const models = await client.models.list();
out.models = models.data.map((m) => m.id);

const completion = await client.completions.create({
  model, prompt, max_tokens: 12, temperature: 0,
});
out.completion = { text: completion.choices[0].text, finish: completion.choices[0].finish_reason,
                   usage: completion.usage };

let streamed = "";
let streamFinish = null;
const stream = await client.completions.create({
  model, prompt, max_tokens: 12, temperature: 0, stream: true,
});
for await (const chunk of stream) {
  streamed += chunk.choices[0]?.text ?? "";
  streamFinish = chunk.choices[0]?.finish_reason ?? streamFinish;
}
out.completion_stream = { text: streamed, finish: streamFinish };

const messages = [{ role: "user", content: prompt }];
const chat = await client.chat.completions.create({ model, messages, max_tokens: 10, temperature: 0 });
out.chat = { content: chat.choices[0].message.content, role: chat.choices[0].message.role,
             finish: chat.choices[0].finish_reason };

let chatStreamed = "";
let chatFinish = null;
let usage = null;
const chatStream = await client.chat.completions.create({
  model, messages, max_tokens: 10, temperature: 0, stream: true,
  stream_options: { include_usage: true },
});
for await (const chunk of chatStream) {
  chatStreamed += chunk.choices[0]?.delta?.content ?? "";
  chatFinish = chunk.choices[0]?.finish_reason ?? chatFinish;
  if (chunk.usage) usage = chunk.usage;
}
out.chat_stream = { content: chatStreamed, finish: chatFinish, usage };

async function failure(call) {
  try {
    await call();
    return { status: 0 };
  } catch (e) {
    return { status: e.status ?? -1, message: e.error?.message ?? String(e), param: e.error?.param ?? null,
             type: e.error?.type ?? null };
  }
}
out.wrong_model = await failure(() => client.completions.create({ model: "no-such-model", prompt }));
out.bad_temperature = await failure(() =>
  client.chat.completions.create({ model, messages, temperature: 7 }));
out.unsupported_n = await failure(() => client.completions.create({ model, prompt, n: 3 }));

console.log(JSON.stringify(out));
