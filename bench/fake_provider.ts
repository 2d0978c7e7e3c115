// A zero-latency fake LLM provider for the benchmark: POST /v1/chat/completions answers in
// OpenAI's SSE format, POST /v1/messages in Anthropic's, both with the same fixed reply of
// REPLY_CHUNKS text chunks, sent as fast as the socket takes them.
//
// A request is tagged by the last `[t=M:key]` marker in its body (the load client puts one in
// every user line). Mode F (or no marker) streams the whole reply at once. Mode H sends the
// first chunk and then holds the stream open, so that a newer request can supersede it; when
// the client closes such a stream early, the fake records when, with performance.now().
//
// Runs in-process (the load client and the tests import startFakeProvider) or alone:
//   bun run bench/fake_provider.ts [port]      (GET /stats shows the counters)
import process from "node:process";
import { createServer } from "node:http";

/** The fixed reply, one chunk per word: 50 chunks. */
export const REPLY_WORDS = (
  "Sure, I can help with that. We have openings on Monday at nine, at half past ten, at one " +
  "in the afternoon and at half past three. Tuesday is fully booked, but Wednesday morning is " +
  "still wide open if that suits you better. Which of these works best for you today?"
).match(/\S+\s*/g)!;
export const REPLY_TEXT = REPLY_WORDS.join("");
export const REPLY_CHUNKS = REPLY_WORDS.length;

export interface FakeStats {
  requests: number;
  openai: number;
  anthropic: number;
  completed: number;
  /** Held streams the client closed before the end. */
  cancelled: number;
  /** Request body bytes received in all. */
  bytesIn: number;
}

export interface FakeProvider {
  port: number;
  /** For OPENAI_BASE_URL (…/v1). */
  openaiBaseUrl: string;
  /** For ANTHROPIC_BASE_URL (no /v1). */
  anthropicBaseUrl: string;
  stats(): FakeStats;
  /** performance.now() when the held stream tagged `key` was closed by the client, once it is;
   * rejects after `timeoutMs`. */
  closedAt(key: string, timeoutMs?: number): Promise<number>;
  /** The parsed body of the last request (only with keepLastBody). */
  lastBody?: Record<string, unknown>;
  close(): Promise<void>;
}

export interface FakeOptions {
  port?: number;
  hostname?: string;
  /** "native" uses Bun.serve / Deno.serve; "node" uses node:http (works on both). */
  impl?: "native" | "node";
  /** How long a held stream stays open before it finishes by itself. */
  holdMs?: number;
  keepLastBody?: boolean;
}

const enc = new TextEncoder();
const SSE_HEADERS = { "content-type": "text/event-stream", "cache-control": "no-cache" };

const openaiChunk = (delta: object, finish: string | null = null) =>
  `data: ${
    JSON.stringify({
      id: "chatcmpl-bench",
      object: "chat.completion.chunk",
      created: 0,
      model: "bench",
      choices: [{ index: 0, delta, finish_reason: finish }],
    })
  }\n\n`;

const claudeEvent = (type: string, data: object = {}) =>
  `event: ${type}\ndata: ${JSON.stringify({ type, ...data })}\n\n`;

/** Each format's reply as [head, rest]: head ends with the first text chunk. */
function replyBodies() {
  const words = REPLY_WORDS;
  const openai = [
    openaiChunk({ role: "assistant", content: "" }) + openaiChunk({ content: words[0] }),
    words.slice(1).map((w) => openaiChunk({ content: w })).join("") + openaiChunk({}, "stop") + "data: [DONE]\n\n",
  ];
  const message = {
    id: "msg_bench",
    type: "message",
    role: "assistant",
    model: "bench",
    content: [],
    stop_reason: null,
    stop_sequence: null,
    usage: { input_tokens: 100, output_tokens: 1 },
  };
  const delta = (text: string) => claudeEvent("content_block_delta", { index: 0, delta: { type: "text_delta", text } });
  const anthropic = [
    claudeEvent("message_start", { message }) +
    claudeEvent("content_block_start", { index: 0, content_block: { type: "text", text: "" } }) +
    delta(words[0]),
    words.slice(1).map(delta).join("") +
    claudeEvent("content_block_stop", { index: 0 }) +
    claudeEvent("message_delta", {
      delta: { stop_reason: "end_turn", stop_sequence: null },
      usage: { output_tokens: words.length },
    }) +
    claudeEvent("message_stop"),
  ];
  return { openai: openai.map((s) => enc.encode(s)), anthropic: anthropic.map((s) => enc.encode(s)) };
}

/** The last `[t=M:key]` tag in a body: mode and key (mode F and no key when there is none). */
export function readTag(body: string): { mode: string; key: string } {
  const at = body.lastIndexOf("[t=");
  if (at < 0) return { mode: "F", key: "" };
  const end = body.indexOf("]", at);
  return { mode: body[at + 3], key: body.slice(at + 5, end < 0 ? at + 5 : end) };
}

/** Starts the fake provider; resolves once it listens. */
export async function startFakeProvider(options: FakeOptions = {}): Promise<FakeProvider> {
  const bodies = replyBodies();
  const holdMs = options.holdMs ?? 10_000;
  const stats: FakeStats = { requests: 0, openai: 0, anthropic: 0, completed: 0, cancelled: 0, bytesIn: 0 };
  // Close times of held streams, and who waits for them; both forget a key once it is read.
  const closed = new Map<string, number>();
  const waiting = new Map<string, (t: number) => void>();
  const fake = {} as FakeProvider;

  const recordClose = (key: string) => {
    const t = performance.now();
    stats.cancelled++;
    const wake = waiting.get(key);
    if (wake) {
      waiting.delete(key);
      wake(t);
    } else closed.set(key, t);
  };

  // What to send for one request, whatever the server library: head, then rest (now or after
  // holdMs); undefined for an unknown path.
  const route = (path: string, body: string) => {
    const format = path === "/v1/chat/completions" ? "openai" : path === "/v1/messages" ? "anthropic" : undefined;
    if (!format) return undefined;
    stats.requests++;
    stats[format]++;
    stats.bytesIn += body.length;
    if (options.keepLastBody) fake.lastBody = JSON.parse(body);
    const { mode, key } = readTag(body);
    return { parts: bodies[format], hold: mode === "H", key };
  };

  const stats_ = () =>
    new Response(JSON.stringify({ ...stats, timeOrigin: performance.timeOrigin }), {
      headers: { "content-type": "application/json" },
    });

  // One handler for Bun.serve and Deno.serve.
  const handle = async (req: Request): Promise<Response> => {
    const path = new URL(req.url).pathname;
    if (req.method === "GET" && path === "/stats") return stats_();
    if (req.method !== "POST") return new Response("not found", { status: 404 });
    const plan = route(path, await req.text());
    if (!plan) return new Response("not found", { status: 404 });
    const { parts, hold, key } = plan;
    let timer: ReturnType<typeof setTimeout> | undefined;
    let done = false;
    const stream = new ReadableStream<Uint8Array>({
      start(c) {
        c.enqueue(parts[0]);
        const finish = () => {
          if (done) return;
          done = true;
          c.enqueue(parts[1]);
          c.close();
          stats.completed++;
        };
        if (!hold) return finish();
        timer = setTimeout(finish, holdMs);
      },
      cancel() {
        clearTimeout(timer);
        if (done) return;
        done = true;
        if (hold) recordClose(key);
      },
    });
    // Bun may not cancel an idle stream at once; its request signal tells. (Deno's also fires
    // on success, and its stream cancel is prompt, so it is not used there.)
    if (hold && "Bun" in globalThis) {
      req.signal?.addEventListener("abort", () => {
        clearTimeout(timer);
        if (done) return;
        done = true;
        recordClose(key);
      });
    }
    return new Response(stream, { headers: SSE_HEADERS });
  };

  const hostname = options.hostname ?? "127.0.0.1";
  let stop: () => Promise<void>;
  if ((options.impl ?? "native") === "node") {
    const server = createServer((req, res) => {
      if (req.method === "GET" && req.url === "/stats") {
        res.writeHead(200, { "content-type": "application/json" });
        return res.end(JSON.stringify({ ...stats, timeOrigin: performance.timeOrigin }));
      }
      const chunks: Buffer[] = [];
      req.on("data", (c) => chunks.push(c));
      req.on("end", () => {
        const plan = route(req.url ?? "", Buffer.concat(chunks).toString());
        if (!plan) return res.writeHead(404).end();
        const { parts, hold, key } = plan;
        res.writeHead(200, SSE_HEADERS);
        res.write(parts[0]);
        if (!hold) {
          res.end(parts[1]);
          stats.completed++;
          return;
        }
        const timer = setTimeout(() => {
          res.end(parts[1]);
          stats.completed++;
        }, holdMs);
        res.on("close", () => {
          clearTimeout(timer);
          if (!res.writableEnded) recordClose(key);
        });
      });
    });
    await new Promise<void>((resolve) => server.listen(options.port ?? 0, hostname, resolve));
    fake.port = (server.address() as { port: number }).port;
    stop = () => {
      server.closeAllConnections?.();
      return new Promise((resolve) => server.close(() => resolve()));
    };
  } else if ("Bun" in globalThis) {
    type BunServe = (o: unknown) => { port: number; stop(force: boolean): Promise<void> };
    const server = (globalThis as unknown as { Bun: { serve: BunServe } }).Bun.serve({
      port: options.port ?? 0,
      hostname,
      fetch: handle,
      idleTimeout: 0,
      development: false,
    });
    fake.port = server.port;
    stop = () => server.stop(true);
  } else {
    const server = Deno.serve({ port: options.port ?? 0, hostname, onListen() {} }, handle);
    fake.port = server.addr.port;
    stop = () => server.shutdown();
  }

  fake.openaiBaseUrl = `http://${hostname}:${fake.port}/v1`;
  fake.anthropicBaseUrl = `http://${hostname}:${fake.port}`;
  fake.stats = () => ({ ...stats });
  fake.closedAt = (key, timeoutMs = 2000) => {
    const t = closed.get(key);
    if (t !== undefined) {
      closed.delete(key);
      return Promise.resolve(t);
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        waiting.delete(key);
        reject(new Error(`held stream ${key} was not closed within ${timeoutMs} ms`));
      }, timeoutMs);
      waiting.set(key, (t) => (clearTimeout(timer), resolve(t)));
    });
  };
  fake.close = () => stop();
  return fake;
}

if (import.meta.main) {
  const impl = process.argv[3] === "node" ? "node" : "native";
  const fake = await startFakeProvider({ port: Number(process.argv[2] ?? 8090), impl });
  console.log(`fake provider on http://127.0.0.1:${fake.port} (OpenAI: ${fake.openaiBaseUrl}, stats: /stats)`);
}
