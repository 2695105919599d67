// Drives a dserve gateway that wants a token with the official `openai` client, using API_KEY:
// the model list, a completion and a streamed chat completion. Prints what it saw as one JSON
// object (tests/serving/auth_test.cc checks it): each call's result, or the error the client
// raised (its class, HTTP status, and OpenAI error type and code). For HTTPS, give the CA that
// signed the gateway's certificate in NODE_EXTRA_CA_CERTS.
//   node auth.mjs BASE_URL MODEL API_KEY
import OpenAI from "openai";

const [baseURL, model, apiKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 60000 });

async function attempt(call) {
  try {
    return { ok: true, value: await call() };
  } catch (e) {
    return { ok: false, kind: e.constructor?.name ?? "Error", status: e.status ?? -1,
             type: e.error?.type ?? null, code: e.error?.code ?? null,
             message: e.error?.message ?? String(e) };
  }
}

const out = {};
out.models = await attempt(async () => (await client.models.list()).data.map((m) => m.id));
out.completion = await attempt(async () => {
  const c = await client.completions.create({
    model, prompt: "The quick brown fox", max_tokens: 8, temperature: 0,
  });
  return c.choices[0].text;
});
out.chat_stream = await attempt(async () => {
  let text = "";
  const stream = await client.chat.completions.create({
    model, messages: [{ role: "user", content: "hello" }], max_tokens: 8, temperature: 0,
    stream: true,
  });
  for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
  return text;
});
console.log(JSON.stringify(out));
