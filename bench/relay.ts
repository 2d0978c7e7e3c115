// The raw relay: the least a Retell custom-LLM server can do, the benchmark's floor. It
// accepts the socket on /llm-websocket/<id>, sends the id-0 greeting, answers pings, and on a
// request forwards the whole transcript as chat messages to the provider with plain fetch
// (no SDK, no validation, no tools), turning the SSE text deltas into response frames. A
// newer request aborts the older fetch.
//
//   deno run --allow-net --allow-env bench/relay.ts     bun run bench/relay.ts
//
// Env: LLM_PROVIDER (openai | anthropic), OPENAI_BASE_URL (…/v1), ANTHROPIC_BASE_URL (no /v1),
// PORT (8080; 0 picks one). It prints "listening <port>".
import process from "node:process";

export interface RelayOptions {
  provider: "openai" | "anthropic";
  /** OpenAI: …/v1; Anthropic: without /v1. */
  baseUrl: string;
  apiKey?: string;
  port?: number;
  hostname?: string;
}

// About as long as the server's persona prompt, so both send similar requests.
const SYSTEM = "You are Ava, the front-desk assistant of Sunrise Dental, on a phone call. ".repeat(12);
const CONFIG = JSON.stringify({ response_type: "config", config: { auto_reconnect: true, call_details: true } });
const GREETING = JSON.stringify({
  response_type: "response",
  response_id: 0,
  content: "Hi! This is Ava at Sunrise Dental. How can I help you today?",
  content_complete: true,
});

interface Socket {
  send(data: string): unknown;
}

/** Starts the relay; returns its port and a stop function. */
export function startRelay(options: RelayOptions): { port: number; close(): Promise<void> } {
  const anthropic = options.provider === "anthropic";
  const url = anthropic ? `${options.baseUrl}/v1/messages` : `${options.baseUrl}/chat/completions`;
  const headers: Record<string, string> = anthropic
    ? { "content-type": "application/json", "x-api-key": options.apiKey ?? "", "anthropic-version": "2023-06-01" }
    : { "content-type": "application/json", authorization: `Bearer ${options.apiKey ?? "none"}` };
  const model = anthropic ? "claude-haiku-4-5" : "gpt-4.1-mini";

  /** The text of one SSE event, in either format. */
  const deltaText = (event: string): string | undefined => {
    const at = event.indexOf("data:");
    if (at < 0) return;
    const data = event.slice(at + 5).trim();
    if (data === "[DONE]") return;
    const json = JSON.parse(data);
    return anthropic
      ? (json.type === "content_block_delta" ? json.delta.text : undefined)
      : json.choices?.[0]?.delta?.content;
  };

  // Streams one reply: transcript in, response frames out, until done or aborted.
  const answer = async (
    ws: Socket,
    id: number,
    transcript: { role: string; content: string }[],
    signal: AbortSignal,
  ) => {
    const messages = [];
    if (!anthropic) messages.push({ role: "system", content: SYSTEM });
    for (const u of transcript) messages.push({ role: u.role === "agent" ? "assistant" : "user", content: u.content });
    if (anthropic && messages[0]?.role !== "user") {
      messages.unshift({ role: "user", content: "(The call has started.)" });
    }
    const body = anthropic
      ? { model, max_tokens: 1024, stream: true, system: SYSTEM, messages }
      : { model, stream: true, messages };
    const res = await fetch(url, { method: "POST", headers, body: JSON.stringify(body), signal });
    const prefix = `{"response_type":"response","response_id":${id},"content":`;
    const decoder = new TextDecoder();
    let buffer = "";
    for await (const bytes of res.body!) {
      buffer += decoder.decode(bytes, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const text = deltaText(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (text && !signal.aborted) ws.send(`${prefix}${JSON.stringify(text)},"content_complete":false}`);
      }
    }
    if (!signal.aborted) ws.send(`${prefix}"","content_complete":true}`);
  };

  /** One call: the socket and the request being answered. */
  class Call {
    private current?: AbortController;
    constructor(private readonly ws: Socket) {}

    open() {
      this.ws.send(CONFIG);
      this.ws.send(GREETING);
    }

    close() {
      this.current?.abort();
    }

    receive(data: string) {
      const frame = JSON.parse(data);
      const type = frame.interaction_type;
      if (type === "ping_pong") {
        this.ws.send(`{"response_type":"ping_pong","timestamp":${frame.timestamp}}`);
      } else if (type === "response_required" || type === "reminder_required") {
        this.current?.abort();
        const controller = this.current = new AbortController();
        answer(this.ws, frame.response_id, frame.transcript ?? [], controller.signal).catch(() => {});
      }
    }
  }

  const isWebSocketPath = (req: Request) => new URL(req.url).pathname.startsWith("/llm-websocket/");
  const port = options.port ?? 0;
  const hostname = options.hostname ?? "127.0.0.1";

  if ("Bun" in globalThis) {
    type BunWs = Socket & { data: { call?: Call } };
    type BunServer = { upgrade(req: Request, o: { data: object }): boolean };
    type BunServe = (o: unknown) => { port: number; stop(force: boolean): Promise<void> };
    const server = (globalThis as unknown as { Bun: { serve: BunServe } }).Bun.serve({
      port,
      hostname,
      development: false,
      fetch(req: Request, server: BunServer) {
        if (isWebSocketPath(req) && server.upgrade(req, { data: {} })) return;
        return new Response("not found", { status: 404 });
      },
      websocket: {
        maxPayloadLength: 64 * 1024 * 1024,
        open(ws: BunWs) {
          (ws.data.call = new Call(ws)).open();
        },
        message(ws: BunWs, message: string) {
          ws.data.call!.receive(message);
        },
        close(ws: BunWs) {
          ws.data.call!.close();
        },
      },
    });
    return { port: server.port, close: () => server.stop(true) };
  }
  const server = Deno.serve({ port, hostname, onListen() {} }, (req) => {
    if (!isWebSocketPath(req)) return new Response("not found", { status: 404 });
    const { socket, response } = Deno.upgradeWebSocket(req);
    const call = new Call(socket);
    socket.onopen = () => call.open();
    socket.onmessage = (e) => call.receive(e.data);
    socket.onclose = () => call.close();
    return response;
  });
  return { port: server.addr.port, close: () => server.shutdown() };
}

if (import.meta.main) {
  const env = process.env;
  const anthropic = env.LLM_PROVIDER === "anthropic";
  const relay = startRelay({
    provider: anthropic ? "anthropic" : "openai",
    baseUrl: anthropic
      ? env.ANTHROPIC_BASE_URL ?? "https://api.anthropic.com"
      : env.OPENAI_BASE_URL ?? "https://api.openai.com/v1",
    apiKey: anthropic ? env.ANTHROPIC_API_KEY : env.OPENAI_API_KEY,
    port: Number(env.PORT ?? 8080),
    hostname: "0.0.0.0",
  });
  console.log(`listening ${relay.port}`);
}
