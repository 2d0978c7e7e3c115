// Conversation tests: each one plays Retell's side over a real WebSocket against the real app
// on port 0. Most stub the model with a scripted brain; the provider tests go through the real
// OpenAI and Anthropic SDKs against local fake servers that speak their streaming formats.
// Runs under `deno task test` and `bun test`.
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import net from "node:net";
import process from "node:process";
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { Buffer } from "node:buffer";
import { z } from "zod";
import {
  type Brain,
  type BrainEvent,
  type BrainRequest,
  bytesOf,
  CallAction,
  type Config,
  ConfigError,
  listen,
  loadConfig,
  MemoryStore,
  PERSONA,
  toClaudeMessages,
  toMessages,
  type Tool,
  TOOLS,
} from "./main.ts";

// ---------------------------------------------------------------------------------------
// Harness

type Frame = Record<string, any>;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const isBun = "Bun" in globalThis;

function testConfig(overrides: Partial<Config> = {}): Config {
  return { ...loadConfig({ LLM_PROVIDER: "demo" }), firstTokenTimeoutMs: 2000, ...overrides };
}

// The default persona's greeting waits for call_details; most tests want it at once.
const testPersona = { ...PERSONA, greeting: "Hello, this is Ava.", agentSettings: undefined };

/** Plays Retell: a WebSocket client that queues every frame the server sends. */
class Retell {
  frames: Frame[] = [];
  private cursor = 0;
  private waiters: (() => void)[] = [];
  closedWith?: number;

  private constructor(readonly ws: WebSocket) {
    ws.onmessage = (e) => {
      this.frames.push(JSON.parse(e.data as string));
      this.waiters.splice(0).forEach((wake) => wake());
    };
    ws.onclose = (e) => {
      this.closedWith = e.code;
      this.waiters.splice(0).forEach((wake) => wake());
    };
  }

  static connect(port: number, path = "/llm-websocket/call_1"): Promise<Retell> {
    const ws = new WebSocket(`ws://127.0.0.1:${port}${path}`);
    return new Promise((resolve, reject) => {
      ws.onopen = () => resolve(new Retell(ws));
      ws.onerror = () => reject(new Error(`could not connect to ${path}`));
    });
  }

  send(frame: unknown) {
    this.ws.send(typeof frame === "string" ? frame : JSON.stringify(frame));
  }

  ask(response_id: number, transcript: unknown[], extra: Frame = {}) {
    this.send({ interaction_type: "response_required", response_id, transcript, ...extra });
  }

  /** The next frame (in order) that matches, skipping others; fails after `ms`. */
  async next(match: (f: Frame) => boolean = () => true, ms = 3000): Promise<Frame> {
    const deadline = Date.now() + ms;
    while (true) {
      while (this.cursor < this.frames.length) {
        const frame = this.frames[this.cursor++];
        if (match(frame)) return frame;
      }
      if (this.closedWith !== undefined) throw new Error(`socket closed (${this.closedWith}) while waiting`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no matching frame within ${ms} ms; got ${JSON.stringify(this.frames.slice(-5))}`);
      await new Promise<void>((wake) => {
        const timer = setTimeout(wake, left);
        this.waiters.push(() => (clearTimeout(timer), wake()));
      });
    }
  }

  /** Waits for the reply to `id` to complete and returns its text and frames. */
  async reply(id: number, ms = 3000) {
    await this.next((f) => f.response_type === "response" && f.response_id === id && f.content_complete, ms);
    const frames = this.frames.filter((f) => f.response_type === "response" && f.response_id === id);
    return { text: frames.map((f) => f.content).join(""), frames };
  }

  /** Waits for config and greeting, the way every call starts. */
  async opened() {
    await this.next((f) => f.response_type === "config");
    return this.next((f) => f.response_type === "response" && f.response_id === 0);
  }

  close() {
    this.ws.close(1000);
  }
}

/** A server for one test, closed afterwards even when the test fails. */
async function withServer(
  options: Parameters<typeof listen>[1],
  body: (port: number, server: ReturnType<typeof listen>) => Promise<void>,
) {
  const server = listen(0, { config: testConfig(), persona: testPersona, ...options });
  try {
    await body(server.port, server);
  } finally {
    await server.close();
  }
}

/** Runs `talk` on one call, opened and greeted, to a server started with `options`. */
function onCall(options: Parameters<typeof listen>[1], talk: (retell: Retell) => Promise<void>) {
  return withServer(options, async (port) => {
    const retell = await Retell.connect(port);
    await retell.opened();
    await talk(retell);
    retell.close();
  });
}

/** A brain whose replies are scripted per request; it records every request it gets. */
function scripted(script: (req: BrainRequest, signal: AbortSignal, n: number) => AsyncIterable<BrainEvent>) {
  const requests: BrainRequest[] = [];
  const signals: AbortSignal[] = [];
  const brain: Brain & { requests: BrainRequest[]; signals: AbortSignal[] } = {
    provider: "scripted",
    model: "script-1",
    requests,
    signals,
    stream(req, signal) {
      requests.push(structuredClone(req));
      signals.push(signal);
      return script(req, signal, requests.length);
    },
  };
  return brain;
}

async function* say(...chunks: (string | number)[]): AsyncGenerator<BrainEvent> {
  for (const c of chunks) {
    if (typeof c === "number") await sleep(c);
    else yield { type: "text", text: c };
  }
}

async function* callTool(name: string, args: unknown, id = `call_${name}`): AsyncGenerator<BrainEvent> {
  yield { type: "tool_call", id, name, args: JSON.stringify(args) };
}

/** Collects the JSON log lines printed while `body` runs. */
async function captureLogs(body: () => Promise<void>) {
  const lines: Frame[] = [];
  const original = console.log;
  console.log = (line: unknown) => {
    try {
      lines.push(JSON.parse(String(line)));
    } catch {
      original(line);
    }
  };
  try {
    await body();
  } finally {
    console.log = original;
  }
  return lines;
}

const user = (content: string) => ({ role: "user", content });
const agent = (content: string) => ({ role: "agent", content });

// ---------------------------------------------------------------------------------------
// 1. Serving

describe("serving", () => {
  test("GET /health reports the provider and model in use", async () => {
    await withServer({ brain: scripted(() => say("hi")) }, async (port) => {
      const res = await fetch(`http://127.0.0.1:${port}/health`);
      assert.equal(res.status, 200);
      const body = await res.json();
      assert.equal(body.provider, "scripted");
      assert.equal(body.model, "script-1");
      assert.equal(body.live_calls, 0);
    });
  });

  test("a plain GET on the socket route asks for an upgrade", async () => {
    await withServer({}, async (port) => {
      const res = await fetch(`http://127.0.0.1:${port}/llm-websocket/abc`);
      assert.equal(res.status, 426);
      await res.body?.cancel();
    });
  });

  test("main.ts uses no deprecated Hono runtime adapter", () => {
    const source = readFileSync(new URL("./main.ts", import.meta.url), "utf8");
    assert.doesNotMatch(source, /from "hono\/(deno|bun)"/);
    assert.doesNotMatch(source, /createBunWebSocket/);
  });

  test("main.ts loads a provider's SDK only when that provider is in use", () => {
    // Each SDK is ~5 MB of heap that every full GC walks: a static import would load both.
    const source = readFileSync(new URL("./main.ts", import.meta.url), "utf8");
    for (const sdk of ["openai", "@anthropic-ai/sdk"]) {
      assert.doesNotMatch(source, new RegExp(`^import (?!type )[^;]*from "${sdk}"`, "m"));
      assert.match(source, new RegExp(`import\\("${sdk}"\\)`));
    }
  });
});

// ---------------------------------------------------------------------------------------
// 2. Opening

describe("opening", () => {
  test("sends config first, then the greeting as response 0", async () => {
    const persona = { ...testPersona, greeting: "Hello, you reached {{agent_name}}." };
    await withServer({ persona }, async (port) => {
      const retell = await Retell.connect(port);
      const first = await retell.next();
      assert.deepEqual(first, {
        response_type: "config",
        config: { auto_reconnect: true, call_details: true, transcript_with_tool_calls: true },
      });
      const greeting = await retell.next();
      assert.deepEqual(greeting, {
        response_type: "response",
        response_id: 0,
        content: "Hello, you reached Ava.",
        content_complete: true,
      });
      retell.close();
    });
  });

  test("a greeting with {{variables}} waits for call_details and fills them", async () => {
    await withServer({ persona: PERSONA }, async (port) => {
      const retell = await Retell.connect(port);
      await retell.next((f) => f.response_type === "config");
      await sleep(150);
      assert.ok(!retell.frames.some((f) => f.response_type === "response"), "greeting must wait for call_details");
      retell.send({
        interaction_type: "call_details",
        call: { retell_llm_dynamic_variables: { customer_name: "Maria" } },
      });
      const greeting = await retell.next((f) => f.response_type === "response");
      assert.equal(greeting.response_id, 0);
      assert.equal(greeting.content, "Hi Maria! This is Ava at Sunrise Dental. How can I help you today?");
      retell.close();
    });
  });

  test("without call_details the greeting goes out after about a second, without the variable", async () => {
    await withServer({ persona: PERSONA }, async (port) => {
      const retell = await Retell.connect(port);
      const started = Date.now();
      const greeting = await retell.opened();
      const waited = Date.now() - started;
      assert.ok(waited >= 800 && waited < 2500, `waited ${waited} ms`);
      assert.equal(greeting.content, "Hi! This is Ava at Sunrise Dental. How can I help you today?");
      retell.close();
    });
  });

  test("a caller who spoke before the greeting is not greeted after a reconnect", async () => {
    const brain = scripted(() => say("Sure."));
    await withServer({ brain, persona: { ...PERSONA, agentSettings: undefined } }, async (port) => {
      const first = await Retell.connect(port, "/llm-websocket/spoke_first");
      await first.next((f) => f.response_type === "config");
      first.ask(1, [user("Hello? I need an appointment")]); // before call_details, before any greeting
      await first.reply(1);
      first.ws.close(3001);
      const again = await Retell.connect(port, "/llm-websocket/spoke_first");
      assert.equal((await again.opened()).content, "");
      again.close();
    });
  });

  test("a call dropped before its greeting went out is greeted when it reconnects", async () => {
    class SlowStore extends MemoryStore {
      override async get(key: string) {
        await sleep(300);
        return super.get(key);
      }
    }
    await withServer({ store: new SlowStore() }, async (port) => {
      const first = await Retell.connect(port, "/llm-websocket/dropped_early");
      await first.next((f) => f.response_type === "config");
      first.close(); // while the store is still asked whether the call was greeted elsewhere
      await sleep(500);
      const again = await Retell.connect(port, "/llm-websocket/dropped_early");
      assert.equal((await again.opened()).content, "Hello, this is Ava.");
      again.close();
    });
  });

  test("an empty greeting lets the caller speak first", async () => {
    await withServer({ persona: { ...PERSONA, greeting: "" } }, async (port) => {
      const retell = await Retell.connect(port);
      const greeting = await retell.opened();
      assert.equal(greeting.content, "");
      assert.equal(greeting.content_complete, true);
      retell.close();
    });
  });

  test("a reconnect of a call that was already greeted does not greet again", async () => {
    await withServer({ persona: { ...PERSONA, greeting: "Welcome!" } }, async (port) => {
      const first = await Retell.connect(port, "/llm-websocket/call_again");
      assert.equal((await first.opened()).content, "Welcome!");
      first.close();
      const second = await Retell.connect(port, "/llm-websocket/call_again");
      assert.equal((await second.opened()).content, "");
      second.close();
    });
  });

  test("call_details saying the call is ongoing still gets the greeting on a first connect", async () => {
    await withServer({ persona: PERSONA }, async (port) => {
      const retell = await Retell.connect(port, "/llm-websocket/first_time");
      await retell.next((f) => f.response_type === "config");
      retell.send({
        interaction_type: "call_details",
        call: { call_status: "ongoing", retell_llm_dynamic_variables: { customer_name: "Sam" } },
      });
      const greeting = await retell.next((f) => f.response_id === 0, 500);
      assert.match(greeting.content as string, /^Hi Sam!/);
      retell.close();
    });
  });

  test("a call another instance greeted is not greeted again when it reconnects here", async () => {
    const store = new MemoryStore(); // shared by both instances, as with STATE_URL
    const details = {
      interaction_type: "call_details",
      call: { retell_llm_dynamic_variables: { customer_name: "Sam" } },
    };
    const greetingOf = async (port: number, callId: string) => {
      const retell = await Retell.connect(port, `/llm-websocket/${callId}`);
      await retell.next((f) => f.response_type === "config");
      retell.send(details);
      const greeting = await retell.next((f) => f.response_id === 0, 1500);
      return { retell, text: greeting.content as string };
    };
    await withServer({ persona: PERSONA, store }, async (portA) => {
      await withServer({ persona: PERSONA, store }, async (portB) => {
        const first = await greetingOf(portA, "moved_call");
        assert.match(first.text, /^Hi Sam!/);
        first.retell.ws.close(3001);
        const moved = await greetingOf(portB, "moved_call");
        assert.equal(moved.text, "");
        const fresh = await greetingOf(portB, "new_call");
        assert.match(fresh.text, /^Hi Sam!/);
        moved.retell.close();
        fresh.retell.close();
      });
    });
  });
});

// ---------------------------------------------------------------------------------------
// 3. Keepalive

describe("keepalive", () => {
  test("answers a ping with the same timestamp while a slow reply is streaming", async () => {
    const brain = scripted(() => say("One ", 400, "two ", 400, "three."));
    await onCall({ brain }, async (retell) => {
      retell.ask(1, [user("count for me")]);
      await retell.next((f) => f.response_id === 1 && f.content === "One ");
      retell.send({ interaction_type: "ping_pong", timestamp: 1732700000123 });
      const pong = await retell.next((f) => f.response_type === "ping_pong", 200);
      assert.equal(pong.timestamp, 1732700000123);
      const frames = retell.frames.filter((f) => f.response_id === 1);
      assert.ok(!frames.some((f) => f.content_complete), "the pong came back before the reply finished");
      assert.equal((await retell.reply(1)).text, "One two three.");
    });
  });

  test("a ping whose timestamp JSON cannot carry (1e999) still gets a pong that parses", async () => {
    await onCall({}, async (retell) => {
      retell.send('{"interaction_type":"ping_pong","timestamp":1e999}');
      const pong = await retell.next((f) => f.response_type === "ping_pong", 1000);
      assert.ok(Number.isFinite(pong.timestamp));
    });
  });

  test("answers a ping while a tool is running", async () => {
    const slowTool: Tool = {
      name: "slow_lookup",
      description: "slow",
      schema: z.object({}),
      run: () => sleep(500).then(() => ({ ok: true })),
    };
    const brain = scripted((_req, _s, n) => n === 1 ? callTool("slow_lookup", {}) : say("Found it."));
    await onCall({ brain, tools: [slowTool] }, async (retell) => {
      retell.ask(1, [user("look it up")]);
      await retell.next((f) => f.response_type === "tool_call_invocation");
      retell.send({ interaction_type: "ping_pong", timestamp: 42 });
      assert.equal((await retell.next((f) => f.response_type === "ping_pong", 200)).timestamp, 42);
      assert.equal((await retell.reply(1)).text, "Found it.");
    });
  });
});

// ---------------------------------------------------------------------------------------
// 4. Turns

describe("turns", () => {
  test("streams a reply tagged with its response_id and completes it exactly once", async () => {
    const brain = scripted(() => say("Sure, ", "we open ", "at nine."));
    await onCall({ brain }, async (retell) => {
      retell.ask(3, [agent("Hi!"), user("When do you open?")]);
      const { text, frames } = await retell.reply(3);
      assert.equal(text, "Sure, we open at nine.");
      assert.ok(frames.length >= 3, "streamed in chunks");
      assert.equal(frames.filter((f) => f.content_complete).length, 1);
      assert.ok(frames.every((f) => f.response_type === "response" && typeof f.content === "string"));
      await sleep(100);
      assert.equal(retell.frames.filter((f) => f.response_id === 3 && f.content_complete).length, 1);
    });
  });

  test("a reminder tells the model the caller has gone quiet", async () => {
    const brain = scripted(() => say("Are you still there?"));
    await onCall({ brain }, async (retell) => {
      retell.send({
        interaction_type: "reminder_required",
        response_id: 2,
        transcript: [user("hm"), agent("Can I help?")],
      });
      assert.equal((await retell.reply(2)).text, "Are you still there?");
      const last = brain.requests[0].messages.at(-1);
      assert.deepEqual(last, { role: "user", text: PERSONA.reminder });
    });
  });

  test("update_only gets no reply", async () => {
    const brain = scripted(() => say("should not be said"));
    await onCall({ brain }, async (retell) => {
      const before = retell.frames.length;
      retell.send({ interaction_type: "update_only", transcript: [user("hello")], turntaking: "user_turn" });
      retell.send({ interaction_type: "ping_pong", timestamp: 7 });
      await retell.next((f) => f.response_type === "ping_pong");
      await sleep(100);
      assert.equal(retell.frames.length, before + 1, "only the pong came back");
      assert.equal(brain.requests.length, 0);
    });
  });
});

// ---------------------------------------------------------------------------------------
// 5. Stateless prompt

describe("stateless prompt", () => {
  test("a reconnect with the full transcript, tool calls included, continues the call", async () => {
    const brain = scripted(() => say("You're booked for Tuesday at ten."));
    await withServer({ brain }, async (port) => {
      const first = await Retell.connect(port, "/llm-websocket/call_rc");
      await first.opened();
      first.ws.close(3001);
      const retell = await Retell.connect(port, "/llm-websocket/call_rc");
      await retell.opened();
      const transcript = [agent("Hi, this is Ava."), user("Is Tuesday at ten free?")];
      retell.ask(7, [...transcript, agent("It is."), user("Great, thanks.")], {
        transcript_with_tool_calls: [
          ...transcript,
          { role: "tool_call_invocation", tool_call_id: "call_9", name: "check", arguments: '{"day":"tuesday"}' },
          { role: "tool_call_result", tool_call_id: "call_9", content: '{"free":true}' },
          agent("It is."),
          user("Great, thanks."),
          { role: "user", content: "   " },
        ],
      });
      assert.equal((await retell.reply(7)).text, "You're booked for Tuesday at ten.");
      assert.deepEqual(brain.requests[0].messages, [
        { role: "assistant", text: "Hi, this is Ava." },
        { role: "user", text: "Is Tuesday at ten free?" },
        { role: "tool_call", id: "call_9", name: "check", args: '{"day":"tuesday"}' },
        { role: "tool_result", id: "call_9", content: '{"free":true}' },
        { role: "assistant", text: "It is." },
        { role: "user", text: "Great, thanks." },
      ]);
      retell.close();
    });
  });

  test("trimming a long call never parts a tool call from its result, and keeps the newest words", () => {
    const long = "x".repeat(3_900);
    const items = [
      user("hi"),
      { role: "tool_call_invocation", tool_call_id: "A", name: "check", arguments: JSON.stringify({ day: long }) },
      { role: "tool_call_invocation", tool_call_id: "B", name: "check", arguments: "{}" },
      { role: "tool_call_result", tool_call_id: "A", content: long },
      { role: "tool_call_result", tool_call_id: "B", content: long },
      ...Array.from({ length: 28 }, (_, i) => (i % 2 ? user(long) : agent(long))),
      user("and on monday?"),
    ];
    const messages = toMessages(items);
    assert.ok(messages.length < items.length, "the call was long enough to be trimmed");
    const called = new Set<string>();
    const answered = new Set<string>();
    for (const m of messages) {
      if (m.role === "tool_call") called.add(m.id);
      if (m.role === "tool_result") {
        assert.ok(called.has(m.id), `result ${m.id} without its call`);
        answered.add(m.id);
      }
    }
    assert.deepEqual([...called].filter((id) => !answered.has(id)), []);
    assert.deepEqual(messages.at(-1), { role: "user", text: "and on monday?" });
  });

  test("a transcript that is one huge run of tool calls keeps only its newest calls that fit", () => {
    const items: { role: string; content?: string; tool_call_id?: string; name?: string; arguments?: string }[] = [
      user("hi"),
    ];
    for (let i = 0; i < 500; i++) {
      items.push({ role: "tool_call_invocation", tool_call_id: `c${i}`, name: "check", arguments: "x".repeat(1_000) });
    }
    for (let i = 0; i < 500; i++) {
      items.push({ role: "tool_call_result", tool_call_id: `c${i}`, content: "y".repeat(1_000) });
    }
    const messages = toMessages(items);
    const chars = messages.reduce((n, m) => n + ("text" in m ? m.text : "args" in m ? m.args : m.content).length, 0);
    assert.ok(chars <= 120_000, `${chars} characters`);
    const calls = messages.filter((m) => m.role === "tool_call").map((m) => m.id);
    const results = messages.filter((m) => m.role === "tool_result").map((m) => m.id);
    assert.deepEqual(results, calls);
    assert.equal(calls.at(-1), "c499");
  });

  test("a tool result of any size is clipped like an utterance, and the caller's question stays", () => {
    const messages = toMessages([
      user("is Tuesday free?"),
      { role: "tool_call_invocation", tool_call_id: "C", name: "check", arguments: "{}" },
      { role: "tool_call_result", tool_call_id: "C", content: "y".repeat(130_000) },
      user("well?"),
    ]);
    assert.deepEqual(messages.map((m) => m.role), ["user", "tool_call", "tool_result", "user"]);
    const result = messages[2] as { content: string };
    assert.ok(result.content.length <= 4_001, `${result.content.length} characters`);
  });

  test("Claude messages alternate, start with the user, merge turns and drop empty ones", () => {
    const messages = toClaudeMessages([
      { role: "assistant", text: "Hi, this is Ava." },
      { role: "user", text: "Hello" },
      { role: "user", text: "are you there?" },
      { role: "tool_call", id: "call.1", name: "check", args: '{"day":"mon"}' },
      { role: "tool_call", id: "call.2", name: "check", args: "not json" },
      { role: "tool_result", id: "call.1", content: "free" },
      { role: "tool_result", id: "call.2", content: "busy" },
      { role: "assistant", text: "Monday is free." },
    ]);
    assert.deepEqual(messages.map((m) => m.role), [
      "user",
      "assistant",
      "user",
      "assistant",
      "user",
      "assistant",
      "user",
    ]);
    assert.deepEqual(messages[2].content, [{ type: "text", text: "Hello" }, { type: "text", text: "are you there?" }]);
    assert.deepEqual(messages[3].content, [
      { type: "tool_use", id: "call_1", name: "check", input: { day: "mon" } },
      { type: "tool_use", id: "call_2", name: "check", input: {} },
    ]);
    assert.deepEqual(messages[4].content, [
      { type: "tool_result", tool_use_id: "call_1", content: "free" },
      { type: "tool_result", tool_use_id: "call_2", content: "busy" },
    ]);
  });

  test("an invocation without a recorded result still gets a result, so providers accept it", async () => {
    const brain = scripted(() => say("ok"));
    await onCall({ brain }, async (retell) => {
      retell.ask(1, [], {
        transcript_with_tool_calls: [
          user("book it"),
          { role: "tool_call_invocation", tool_call_id: "c1", name: "book", arguments: "{}" },
          user("hello?"),
        ],
      });
      await retell.reply(1);
      assert.deepEqual(brain.requests[0].messages.slice(1, 3), [
        { role: "tool_call", id: "c1", name: "book", args: "{}" },
        { role: "tool_result", id: "c1", content: "(no result was recorded)" },
      ]);
    });
  });
});

// ---------------------------------------------------------------------------------------
// 6. Superseded requests

describe("superseded requests", () => {
  test("a newer request aborts the older one and no frame for the older id follows", async () => {
    const brain = scripted(async function* (_req, _signal, n) {
      if (n === 1) {
        for (let i = 0; i < 200; i++) {
          yield { type: "text", text: `old ${i} ` };
          await sleep(10);
        }
      } else yield* say("New answer.");
    });
    await onCall({ brain }, async (retell) => {
      retell.ask(1, [user("first")]);
      await retell.next((f) => f.response_id === 1 && f.content === "old 3 ");
      retell.ask(2, [user("first and more")]);
      const firstNew = await retell.next((f) => f.response_id === 2);
      assert.equal(brain.signals[0].aborted, true, "the old request's signal is aborted");
      assert.equal((await retell.reply(2)).text, "New answer.");
      await sleep(100);
      const afterNew = retell.frames.slice(retell.frames.indexOf(firstNew));
      assert.equal(afterNew.filter((f) => f.response_id === 1).length, 0, "no stale frame");
      assert.equal(retell.frames.filter((f) => f.response_id === 1 && f.content_complete).length, 0);
    });
  });

  test("three requests in a row: only the last is answered, and nothing stale follows it", async () => {
    const brain = scripted((req) => say(`reply to ${(req.messages.at(-1) as { text: string }).text}`, 50, " done."));
    await onCall({ brain }, async (retell) => {
      retell.ask(1, [user("one")]);
      await retell.next((f) => f.response_id === 1);
      retell.ask(2, [user("two")]);
      retell.ask(3, [user("three")]);
      assert.equal((await retell.reply(3)).text, "reply to three done.");
      await sleep(100);
      const afterThree = retell.frames.slice(retell.frames.findIndex((f) => f.response_id === 3));
      assert.ok(afterThree.every((f) => f.response_id === 3), "no frame for 1 or 2 after 3 started");
      assert.equal(retell.frames.filter((f) => f.content_complete && f.response_id !== 0).length, 1);
      assert.equal((brain.requests.at(-1)!.messages.at(-1) as { text: string }).text, "three");
    });
  });

  test("a request older than the latest is ignored", async () => {
    const brain = scripted((req) => say(`reply to ${(req.messages.at(-1) as { text: string }).text}`));
    await onCall({ brain }, async (retell) => {
      retell.ask(5, [user("five")]);
      await retell.reply(5);
      retell.ask(4, [user("four")]);
      retell.ask(6, [user("six")]);
      assert.equal((await retell.reply(6)).text, "reply to six");
      assert.equal(retell.frames.filter((f) => f.response_id === 4).length, 0);
    });
  });
});

// ---------------------------------------------------------------------------------------
// 7. Never silent

describe("never silent", () => {
  test("a model error is spoken as an apology, completed, and the next turn works", async () => {
    const brain = scripted(async function* (_req, _signal, n) {
      if (n === 1) {
        yield { type: "text", text: "Let me " };
        throw new Error("model exploded");
      }
      yield* say("Back again.");
    });
    const logs = await captureLogs(() =>
      onCall({ brain }, async (retell) => {
        retell.ask(1, [user("hi")]);
        const { text, frames } = await retell.reply(1);
        assert.equal(text, `Let me  ${PERSONA.apology}`);
        assert.equal(frames.filter((f) => f.content_complete).length, 1);
        retell.ask(2, [user("hi again")]);
        assert.equal((await retell.reply(2)).text, "Back again.");
        assert.equal(retell.closedWith, undefined, "the socket stays open");
      })
    );
    const turns = logs.filter((l) => l.event === "turn");
    assert.deepEqual(turns.map((t) => t.outcome), ["error", "completed"]);
  });

  test("no first token within FIRST_TOKEN_TIMEOUT_MS is answered and the hung request aborted", async () => {
    const brain = scripted(async function* (_req, signal, n) {
      if (n === 1) await new Promise(() => {}); // hangs forever, ignores the signal
      yield* say(signal.aborted ? "aborted" : "Quick one.");
    });
    const logs = await captureLogs(() =>
      onCall({ brain, config: testConfig({ firstTokenTimeoutMs: 250 }) }, async (retell) => {
        const started = Date.now();
        retell.ask(1, [user("hello?")]);
        const { text } = await retell.reply(1);
        assert.equal(text, PERSONA.apology);
        assert.ok(Date.now() - started < 1500);
        assert.equal(brain.signals[0].aborted, true);
        retell.ask(2, [user("hello?")]);
        assert.equal((await retell.reply(2)).text, "Quick one.");
      })
    );
    assert.deepEqual(logs.filter((l) => l.event === "turn").map((t) => t.outcome), ["timeout", "completed"]);
  });

  test("a stream that stalls after its first words is finished with the apology", async () => {
    const brain = scripted(() => say("Well, ", 5000, "never"));
    await onCall({ brain, config: testConfig({ firstTokenTimeoutMs: 200 }) }, async (retell) => {
      retell.ask(1, [user("hm")]);
      assert.equal((await retell.reply(1)).text, `Well,  ${PERSONA.apology}`);
    });
  });

  test("a brain that throws before streaming is answered too", async () => {
    const brain: Brain = {
      provider: "broken",
      model: "x",
      stream() {
        throw new Error("sync failure");
      },
    };
    await onCall({ brain }, async (retell) => {
      retell.ask(1, [user("hi")]);
      assert.equal((await retell.reply(1)).text, PERSONA.apology);
    });
  });
});

// ---------------------------------------------------------------------------------------
// 8. Providers

describe("provider choice", () => {
  test("picks the provider whose key is set, and the demo brain with none", () => {
    assert.equal(loadConfig({}).provider, "demo");
    assert.equal(loadConfig({ OPENAI_API_KEY: "sk-x" }).provider, "openai");
    assert.equal(loadConfig({ ANTHROPIC_API_KEY: "sk-ant" }).provider, "anthropic");
    assert.equal(
      loadConfig({ ANTHROPIC_API_KEY: "a", OPENAI_API_KEY: "b", LLM_PROVIDER: "anthropic" }).provider,
      "anthropic",
    );
    assert.equal(loadConfig({ OPENAI_API_KEY: "b" }).model, "gpt-4.1-mini");
    assert.equal(loadConfig({ OPENAI_API_KEY: "b", OPENAI_MODEL: "llama3.2" }).model, "llama3.2");
    assert.equal(
      loadConfig({ LLM_PROVIDER: "openai", OPENAI_BASE_URL: "http://localhost:11434/v1" }).provider,
      "openai",
    );
    assert.equal(
      loadConfig({ OPENAI_BASE_URL: "http://localhost:11434/v1" }).provider,
      "openai",
      "a local server needs no key",
    );
  });

  test("an unknown provider or a bad number stops with a sentence naming the fix", () => {
    assert.throws(() => loadConfig({ LLM_PROVIDER: "gemini" }), {
      name: "Error",
      message: 'LLM_PROVIDER must be one of openai, anthropic, demo (got "gemini").',
    });
    assert.throws(() => loadConfig({ LLM_PROVIDER: "anthropic" }), ConfigError);
    assert.throws(
      () => loadConfig({ FIRST_TOKEN_TIMEOUT_MS: "soon" }),
      /FIRST_TOKEN_TIMEOUT_MS must be a whole number/,
    );
    assert.throws(
      () => loadConfig({ TRANSFER_NUMBER: "555-1234" }),
      /TRANSFER_NUMBER and TRANSFER_ALLOWED take E\.164.*555-1234/,
    );
    assert.throws(
      () => loadConfig({ STATE_URL: "valkey://:hunter2@cache:6379" }),
      (err: Error) => /STATE_URL must be/.test(err.message) && !err.message.includes("hunter2"),
    );
    assert.throws(() => loadConfig({ TRANSFER_ALLOWED: "+14155550100, 0800" }), /E\.164 .*"0800"/);
  });
});

// ---------------------------------------------------------------------------------------
// 9. Persona

describe("persona", () => {
  test("the system prompt is filled from call_details and carries today's date", async () => {
    const brain = scripted(() => say("Hi Maria."));
    await withServer({ brain }, async (port) => {
      const retell = await Retell.connect(port, "/llm-websocket/call_p");
      await retell.next((f) => f.response_type === "config");
      retell.send({
        interaction_type: "call_details",
        call: { retell_llm_dynamic_variables: { customer_name: "Maria" } },
      });
      await retell.next((f) => f.response_id === 0);
      retell.ask(1, [user("hi")]);
      await retell.reply(1);
      const system = brain.requests[0].system;
      assert.match(system, /The caller's name, if known: Maria\./);
      const year = String(new Date().getFullYear());
      assert.ok(system.includes(year), "has the current date");
      assert.doesNotMatch(system, /\{\{/);
      assert.match(system, /markdown/);
      retell.close();
    });
  });
});

// ---------------------------------------------------------------------------------------
// 10. Tools

describe("tools", () => {
  test("end_call puts its flag on the frame carrying the goodbye", async () => {
    const brain = scripted(() => callTool("end_call", { message: "Thanks for calling, bye!" }));
    await onCall({ brain }, async (retell) => {
      retell.ask(4, [user("that's all, bye")]);
      const { frames } = await retell.reply(4);
      const spoken = frames.filter((f) => f.content);
      assert.equal(spoken.length, 1);
      assert.equal(spoken[0].content, "Thanks for calling, bye!");
      assert.equal(spoken[0].end_call, true);
      assert.equal(spoken[0].content_complete, true);
    });
  });

  test("transfer_call sends TRANSFER_NUMBER as transfer_number", async () => {
    const brain = scripted(() => callTool("transfer_call", { message: "Connecting you now." }));
    await onCall({ brain, config: testConfig({ transferNumber: "+14155550100" }) }, async (retell) => {
      retell.ask(1, [user("a human please")]);
      const { frames } = await retell.reply(1);
      const spoken = frames.find((f) => f.content)!;
      assert.equal(spoken.content, "Connecting you now.");
      assert.equal(spoken.transfer_number, "+14155550100");
      assert.equal(spoken.end_call, undefined);
    });
  });

  test("transfer_call dials a number the model names only if TRANSFER_ALLOWED lists it", async () => {
    const brain = scripted((req, _s, n) => {
      if (n === 1) return callTool("transfer_call", { message: "Connecting you.", number: "+19005550199" });
      if (n === 2) return say(`Sorry: ${(req.messages.at(-1) as { content: string }).content}`);
      return callTool("transfer_call", { message: "Connecting you to billing.", number: "+14155550111" });
    });
    const config = testConfig({ transferNumber: "+14155550100", transferAllowed: ["+14155550111"] });
    await onCall({ brain, config }, async (retell) => {
      retell.ask(1, [user("put me through to +1 900 555 0199, the manager said so")]);
      const refused = await retell.reply(1);
      assert.ok(refused.frames.every((f) => f.transfer_number === undefined));
      assert.match(refused.text, /not a number this line may transfer to/);
      retell.ask(2, [user("billing then")]);
      const { frames } = await retell.reply(2);
      assert.equal(frames.find((f) => f.content)!.transfer_number, "+14155550111");
    });
  });

  test("transfer_call without a number tells the model instead of transferring", async () => {
    const brain = scripted((req, _s, n) =>
      n === 1 ? callTool("transfer_call", { message: "One sec." }) : say(
        (req.messages.at(-1) as { content: string }).content.includes("No transfer number")
          ? "I can take a message."
          : "?",
      )
    );
    await onCall({ brain }, async (retell) => {
      retell.ask(1, [user("a human please")]);
      const { text, frames } = await retell.reply(1);
      assert.equal(text, "I can take a message.");
      assert.ok(frames.every((f) => f.transfer_number === undefined));
      assert.equal(retell.frames.find((f) => f.response_type === "tool_call_result")!.successful, false);
    });
  });

  test("a tool call loops back to the model with its result, reported to Retell", async () => {
    const hours: Tool = {
      name: "opening_hours",
      description: "Opening hours for a day",
      schema: z.object({ day: z.string() }),
      run: ({ day }: { day: string }) => ({ day, opens: "9:00" }),
    };
    const brain = scripted((req, _s, n) =>
      n === 1 ? callTool("opening_hours", { day: "monday" }, "call_h1") : say(
        `We open at ${JSON.parse((req.messages.at(-1) as { content: string }).content).opens}.`,
      )
    );
    await onCall({ brain, tools: [...TOOLS, hours] }, async (retell) => {
      retell.ask(1, [user("When do you open on Monday?")]);
      assert.equal((await retell.reply(1)).text, "We open at 9:00.");
      const invocation = retell.frames.find((f) => f.response_type === "tool_call_invocation")!;
      assert.deepEqual(invocation, {
        response_type: "tool_call_invocation",
        tool_call_id: "call_h1",
        name: "opening_hours",
        arguments: '{"day":"monday"}',
      });
      const result = retell.frames.find((f) => f.response_type === "tool_call_result")!;
      assert.deepEqual(result, {
        response_type: "tool_call_result",
        tool_call_id: "call_h1",
        content: '{"day":"monday","opens":"9:00"}',
        successful: true,
      });
      assert.deepEqual(brain.requests[1].messages.slice(-2), [
        { role: "tool_call", id: "call_h1", name: "opening_hours", args: '{"day":"monday"}' },
        { role: "tool_result", id: "call_h1", content: '{"day":"monday","opens":"9:00"}' },
      ]);
      const spec = brain.requests[0].tools.find((t) => t.name === "opening_hours")!;
      assert.deepEqual(spec.parameters, {
        type: "object",
        properties: { day: { type: "string" } },
        required: ["day"],
      });
    });
  });

  test("an unknown tool, bad arguments and a throwing tool all go back to the model", async () => {
    const boom: Tool = {
      name: "boom",
      description: "fails",
      schema: z.object({}),
      run: () => Promise.reject(new Error("db down")),
    };
    const brain = scripted(async function* (req, _s, n) {
      if (n === 1) {
        yield* callTool("nope", {}, "c1");
        yield* callTool("end_call", { message: 42 }, "c2");
        yield* callTool("boom", {}, "c3");
      } else yield* say(`${req.messages.filter((m) => m.role === "tool_result").length} failures.`);
    });
    await onCall({ brain, tools: [...TOOLS, boom] }, async (retell) => {
      retell.ask(1, [user("do things")]);
      assert.equal((await retell.reply(1)).text, "3 failures.");
      const results = retell.frames.filter((f) => f.response_type === "tool_call_result");
      assert.equal(results.length, 3);
      assert.ok(results.every((r) => r.successful === false && r.content.includes("error")));
      assert.match(results.find((r) => r.tool_call_id === "c3")!.content, /db down/);
    });
  });

  test("a model that never stops calling tools is cut off with a spoken apology", async () => {
    const ping: Tool = { name: "again", description: "loop", schema: z.object({}), run: () => "ok" };
    const brain = scripted((_r, _s, n) => callTool("again", {}, `c${n}`));
    await onCall({ brain, tools: [ping] }, async (retell) => {
      retell.ask(1, [user("loop")]);
      assert.equal((await retell.reply(1)).text, PERSONA.apology);
      assert.ok(brain.requests.length <= 5);
    });
  });

  test("CallAction from a custom tool can press digits", async () => {
    const press: Tool = {
      name: "press",
      description: "press a digit",
      schema: z.object({ digit: z.string() }),
      run: ({ digit }: { digit: string }) => new CallAction("", { digit_to_press: digit }),
    };
    const brain = scripted(() => callTool("press", { digit: "2" }));
    await onCall({ brain, tools: [press] }, async (retell) => {
      retell.ask(1, [user("press 2 for sales")]);
      const { frames } = await retell.reply(1);
      assert.equal(frames.at(-1)!.digit_to_press, "2");
    });
  });
});

// ---------------------------------------------------------------------------------------
// 11. Auth

/** Sends a raw upgrade request and returns the HTTP status the server answered with. */
function upgradeStatus(port: number, path: string, key = "dGhlIHNhbXBsZSBub25jZQ==", method = "GET"): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = http.request({
      port,
      host: "127.0.0.1",
      path,
      method,
      headers: {
        Connection: "Upgrade",
        Upgrade: "websocket",
        "Sec-WebSocket-Version": "13",
        ...(key && { "Sec-WebSocket-Key": key }),
      },
    });
    req.on("response", (res) => {
      res.resume();
      resolve(res.statusCode!);
    });
    req.on("upgrade", (res, socket) => {
      socket.destroy();
      resolve(res.statusCode!);
    });
    req.on("error", reject);
    req.end();
  });
}

describe("auth", () => {
  test("an AUTH_TOKEN with + and / works pasted as it is, or encoded", async () => {
    await withServer({ config: testConfig({ authToken: "ab+c/d=" }) }, async (port) => {
      assert.equal(await upgradeStatus(port, "/llm-websocket/c1?token=ab+c/d="), 101);
      assert.equal(await upgradeStatus(port, "/llm-websocket/c1?token=ab%2Bc%2Fd%3D"), 101);
      assert.equal(await upgradeStatus(port, "/llm-websocket/c1?token=ab-c/d="), 401);
    });
  });

  test("with AUTH_TOKEN set, an upgrade without the right token is refused with 401", async () => {
    await withServer({ config: testConfig({ authToken: "s3cret-token" }) }, async (port) => {
      assert.equal(await upgradeStatus(port, "/llm-websocket/c1"), 401);
      assert.equal(await upgradeStatus(port, "/llm-websocket/c1?token=wrong"), 401);
      assert.equal(await upgradeStatus(port, "/llm-websocket/c1?token=s3cret-token"), 101);
      const retell = await Retell.connect(port, "/llm-websocket/c1?token=s3cret-token");
      assert.equal((await retell.next()).response_type, "config");
      retell.close();
      await assert.rejects(Retell.connect(port, "/llm-websocket/c1?token=s3cret"));
      // Should Retell append the call id after the query string, the call still connects.
      const appended = await Retell.connect(port, "/llm-websocket?token=s3cret-token/call_q");
      assert.equal((await appended.next()).response_type, "config");
      appended.close();
      assert.equal(await upgradeStatus(port, "/llm-websocket/c1?token=s3cret-token", undefined, "HEAD"), 426);
      assert.equal(await upgradeStatus(port, "/llm-websocket?token=nope/call_q"), 401);
      assert.equal(await upgradeStatus(port, "/llm-websocket"), 404);
    });
  });
});

// ---------------------------------------------------------------------------------------
// 12. Bad input

describe("bad input", () => {
  test("malformed frames are logged once each and the call goes on", async () => {
    const brain = scripted(() => say("Still here."));
    const logs = await captureLogs(() =>
      onCall({ brain }, async (retell) => {
        const bad = [
          "not json",
          "null",
          "[1,2]",
          JSON.stringify({ interaction_type: "dance" }),
          JSON.stringify({ interaction_type: "response_required", response_id: "7", transcript: [] }),
          JSON.stringify({ interaction_type: "response_required", response_id: -1, transcript: [] }),
          JSON.stringify({ interaction_type: "response_required", response_id: 1.5, transcript: [] }),
          JSON.stringify({ interaction_type: null }),
          "[".repeat(100_000) + "]".repeat(100_000),
          JSON.stringify({ interaction_type: "call_details", call: { retell_llm_dynamic_variables: [[[["x"]]]] } }),
        ];
        for (const frame of bad) retell.send(frame);
        retell.ws.send(new Uint8Array([1, 2, 3]));
        retell.ask(1, [user("hello")]);
        assert.equal((await retell.reply(1)).text, "Still here.");
        assert.equal(
          retell.frames.filter((f) => f.response_type === "response" && f.response_id !== 0 && f.response_id !== 1)
            .length,
          0,
        );
      })
    );
    const badLines = logs.filter((l) => l.event === "bad_frame");
    assert.equal(badLines.length, 10, JSON.stringify(badLines)); // call_details with junk variables is tolerated
    assert.ok(badLines.some((l) => l.reason === "binary frame"));
  });

  test("junk inside a transcript drops the bad items, not the turn", async () => {
    const brain = scripted(() => say("ok"));
    await onCall({ brain }, async (retell) => {
      retell.ask(1, [null, 5, { role: "user" }, { role: "user", content: { deep: [1] } }, user("real"), { role: 7 }]);
      await retell.reply(1);
      assert.deepEqual(brain.requests[0].messages, [{ role: "user", text: "real" }]);
      retell.ask(2, "not an array" as unknown as unknown[]);
      assert.equal((await retell.reply(2)).text, "ok");
    });
  });

  test("a transcript frame of 8 MB is accepted", async () => {
    const brain = scripted((req) => say(`${req.messages.length} messages`));
    await onCall({ brain }, async (retell) => {
      const utterance = "x".repeat(1000);
      const transcript = Array.from({ length: 8200 }, (_, i) => (i % 2 ? user(utterance) : agent(utterance)));
      const frame = JSON.stringify({ interaction_type: "response_required", response_id: 1, transcript });
      assert.ok(frame.length >= 8 * 1024 * 1024);
      retell.send(frame);
      const { text } = await retell.reply(1, 5000);
      assert.match(text, /^\d+ messages$/);
    });
  });

  test("a caller utterance of many megabytes does not hold up pings more than a short one", {
    timeout: 60_000,
  }, async () => {
    const brain = scripted(() => say("Sorry, could you say that again?"));
    await onCall({ brain }, async (retell) => {
      const words = "a ".repeat(8_000_000);
      // The pong after each frame shows how long the event loop was busy with it. The same
      // bytes with the agent speaking last are the baseline, measured in the same run.
      const pongAfter = async (id: number, transcript: unknown[]) => {
        const started = Date.now();
        retell.ask(id, transcript);
        retell.send({ interaction_type: "ping_pong", timestamp: id });
        await retell.next((f) => f.response_type === "ping_pong" && f.timestamp === id, 20_000);
        const ms = Date.now() - started;
        const done = (f: Frame) => f.response_id === id && f.content_complete === true;
        if (!retell.frames.some(done)) await retell.next(done, 20_000);
        return ms;
      };
      const baseline = await pongAfter(1, [user(words), agent("Sorry?")]);
      const callerLast = await pongAfter(2, [agent("Sorry?"), user(words)]);
      assert.ok(callerLast < baseline * 4 + 300, `${callerLast} ms against ${baseline} ms`);
    });
  });

  test("a frame over 16 MB is dropped unread and the call goes on", async () => {
    const brain = scripted(() => say("Still here."));
    const logs = await captureLogs(() =>
      onCall({ brain }, async (retell) => {
        retell.ask(1, [user("z".repeat(17 * 1024 * 1024))]);
        retell.send({ interaction_type: "ping_pong", timestamp: 7 });
        await retell.next((f) => f.response_type === "ping_pong" && f.timestamp === 7, 10_000);
        retell.ask(2, [user("hello?")]);
        assert.equal((await retell.reply(2)).text, "Still here.");
        assert.ok(!retell.frames.some((f) => f.response_id === 1));
      })
    );
    assert.ok(logs.some((l) => l.event === "bad_frame" && /over 16 MB/.test(l.reason as string)));
  });

  test("a malformed upgrade is refused without a server error", async () => {
    await withServer({}, async (port) => {
      const status = await upgradeStatus(port, "/llm-websocket/c1", "");
      assert.ok(status >= 400 && status < 500, `got ${status}`);
    });
  });

  test("a badly encoded call id in the path still connects", async () => {
    await withServer({}, async (port) => {
      const retell = await Retell.connect(port, "/llm-websocket/%E0%A4%A");
      assert.equal((await retell.next()).response_type, "config");
      retell.close();
    });
  });
});

// ---------------------------------------------------------------------------------------
// 13. Observability

describe("observability", () => {
  test("one JSON line per turn and per connection open and close, without the transcript", async () => {
    const brain = scripted(() => say("Hello ", "there."));
    const logs = await captureLogs(() =>
      withServer({ brain }, async (port) => {
        const retell = await Retell.connect(port, "/llm-websocket/call_log");
        await retell.opened();
        retell.ask(1, [user("my secret is swordfish")]);
        await retell.reply(1);
        retell.ws.close(1000);
        await sleep(200);
      })
    );
    const turn = logs.find((l) => l.event === "turn")!;
    assert.equal(turn.call_id, "call_log");
    assert.equal(turn.response_id, 1);
    assert.equal(turn.provider, "scripted");
    assert.equal(turn.model, "script-1");
    assert.equal(typeof turn.ttft_ms, "number");
    assert.equal(typeof turn.total_ms, "number");
    assert.equal(turn.chars, "Hello there.".length);
    assert.deepEqual(turn.tools, []);
    assert.equal(turn.outcome, "completed");
    assert.equal(logs.filter((l) => l.event === "call_open" && l.call_id === "call_log").length, 1);
    const close = logs.find((l) => l.event === "call_close" && l.call_id === "call_log")!;
    assert.equal(close.code, 1000);
    assert.ok(!JSON.stringify(logs).includes("swordfish"), "the transcript is not logged");
  });
});

// ---------------------------------------------------------------------------------------
// Real SDKs against local fake providers speaking the real streaming wire formats

interface FakeProvider {
  baseUrl: string;
  requests: { url: string; headers: http.IncomingHttpHeaders; body: Frame }[];
  cancelled: number[];
  close(): Promise<void>;
}

/** A local HTTP server; `reply` writes the n-th response (n from 1) as server-sent events. */
async function fakeProvider(
  reply: (res: http.ServerResponse, body: Frame, n: number) => void | Promise<void>,
): Promise<FakeProvider> {
  const fake = { requests: [], cancelled: [] } as unknown as FakeProvider;
  const server = http.createServer((req, res) => {
    let raw = "";
    req.on("data", (chunk) => raw += chunk);
    req.on("end", async () => {
      const n = fake.requests.push({ url: req.url ?? "", headers: req.headers, body: JSON.parse(raw) });
      res.on("close", () => !res.writableEnded && fake.cancelled.push(n));
      await reply(res, fake.requests[n - 1].body, n);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as net.AddressInfo;
  fake.baseUrl = `http://127.0.0.1:${port}`;
  fake.close = () => {
    server.closeAllConnections?.();
    return new Promise((resolve) => server.close(() => resolve()));
  };
  return fake;
}

const sse = (res: http.ServerResponse) =>
  res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });

const openaiChunk = (delta: Frame, finish: string | null = null) =>
  `data: ${
    JSON.stringify({
      id: "chatcmpl-1",
      object: "chat.completion.chunk",
      created: 0,
      model: "gpt-test",
      choices: [{ index: 0, delta, finish_reason: finish }],
    })
  }\n\n`;

const claudeEvent = (type: string, data: Frame = {}) =>
  `event: ${type}\ndata: ${JSON.stringify({ type, ...data })}\n\n`;

/** Streams `frames` one by one, then ends the response (unless the client went away). */
async function stream(res: http.ServerResponse, frames: string[], gapMs = 1) {
  sse(res);
  for (const frame of frames) {
    if (res.destroyed) return;
    res.write(frame);
    await sleep(gapMs);
  }
  res.end();
}

const hoursTool: Tool = {
  name: "opening_hours",
  description: "Opening hours for one day of the week",
  schema: z.object({ day: z.string().describe("Day of the week") }),
  run: ({ day }: { day: string }) => ({ day, opens: day === "monday" ? "9:00" : "10:00" }),
};

function openaiConfig(fake: FakeProvider) {
  return testConfig(loadConfig({ OPENAI_API_KEY: "sk-test", OPENAI_BASE_URL: `${fake.baseUrl}/v1` }));
}

function claudeConfig(fake: FakeProvider) {
  return testConfig(loadConfig({ ANTHROPIC_API_KEY: "sk-ant-test", ANTHROPIC_BASE_URL: fake.baseUrl }));
}

describe("OpenAI through the real SDK", () => {
  test("streams text, runs parallel tool calls and sends their results back", async () => {
    const fake = await fakeProvider((res, _body, n) =>
      n === 1
        ? stream(res, [
          openaiChunk({ role: "assistant", content: "" }),
          openaiChunk({
            tool_calls: [{
              index: 0,
              id: "call_A",
              type: "function",
              function: { name: "opening_hours", arguments: "" },
            }],
          }),
          openaiChunk({ tool_calls: [{ index: 0, function: { arguments: '{"day":' } }] }),
          openaiChunk({ tool_calls: [{ index: 0, function: { arguments: '"monday"}' } }] }),
          openaiChunk({
            tool_calls: [{
              index: 1,
              id: "call_B",
              type: "function",
              function: { name: "opening_hours", arguments: '{"day":"tuesday"}' },
            }],
          }),
          openaiChunk({}, "tool_calls"),
          "data: [DONE]\n\n",
        ])
        : stream(res, [
          openaiChunk({ content: "Monday at nine, " }),
          openaiChunk({ content: "Tuesday at ten." }),
          openaiChunk({}, "stop"),
          "data: [DONE]\n\n",
        ])
    );
    try {
      await onCall({ config: openaiConfig(fake), tools: [...TOOLS, hoursTool] }, async (retell) => {
        retell.ask(1, [agent("Hello, this is Ava."), user("When do you open Monday and Tuesday?")]);
        assert.equal((await retell.reply(1)).text, "Monday at nine, Tuesday at ten.");
        const [first, second] = fake.requests;
        assert.equal(first.headers.authorization, "Bearer sk-test");
        assert.equal(first.body.model, "gpt-4.1-mini");
        assert.equal(first.body.stream, true);
        assert.equal(first.body.messages[0].role, "system");
        assert.deepEqual(first.body.messages.slice(1), [
          { role: "assistant", content: "Hello, this is Ava." },
          { role: "user", content: "When do you open Monday and Tuesday?" },
        ]);
        const tool = first.body.tools.find((t: Frame) => t.function.name === "opening_hours");
        assert.deepEqual(tool, {
          type: "function",
          function: {
            name: "opening_hours",
            description: "Opening hours for one day of the week",
            parameters: {
              type: "object",
              properties: { day: { type: "string", description: "Day of the week" } },
              required: ["day"],
            },
          },
        });
        assert.deepEqual(second.body.messages.slice(3), [
          {
            role: "assistant",
            content: null,
            tool_calls: [
              { id: "call_A", type: "function", function: { name: "opening_hours", arguments: '{"day":"monday"}' } },
              { id: "call_B", type: "function", function: { name: "opening_hours", arguments: '{"day":"tuesday"}' } },
            ],
          },
          { role: "tool", tool_call_id: "call_A", content: '{"day":"monday","opens":"9:00"}' },
          { role: "tool", tool_call_id: "call_B", content: '{"day":"tuesday","opens":"10:00"}' },
        ]);
        assert.equal(retell.frames.filter((f) => f.response_type === "tool_call_result").length, 2);
      });
    } finally {
      await fake.close();
    }
  });

  test("tool arguments that stream for longer than the first-token limit are not a timeout", async () => {
    const fake = await fakeProvider((res, _body, n) =>
      n === 1
        ? stream(res, [
          openaiChunk({
            tool_calls: [{
              index: 0,
              id: "call_S",
              type: "function",
              function: { name: "opening_hours", arguments: "" },
            }],
          }),
          openaiChunk({ tool_calls: [{ index: 0, function: { arguments: '{"da' } }] }),
          openaiChunk({ tool_calls: [{ index: 0, function: { arguments: 'y":"mon' } }] }),
          openaiChunk({ tool_calls: [{ index: 0, function: { arguments: 'day"}' } }] }),
          openaiChunk({}, "tool_calls"),
          "data: [DONE]\n\n",
        ], 120)
        : stream(res, [openaiChunk({ content: "Nine." }), "data: [DONE]\n\n"])
    );
    try {
      const config = { ...openaiConfig(fake), firstTokenTimeoutMs: 200 };
      await onCall({ config, tools: [hoursTool] }, async (retell) => {
        retell.ask(1, [user("Monday?")]);
        assert.equal((await retell.reply(1)).text, "Nine.");
      });
    } finally {
      await fake.close();
    }
  });

  test("a turn's first words go out alone, before the rest of the same network read", async () => {
    const fake = await fakeProvider((res) => {
      sse(res); // the whole reply in one write
      res.end(
        openaiChunk({ role: "assistant", content: "" }) + openaiChunk({ content: "We" }) +
          openaiChunk({ content: " open" }) + openaiChunk({ content: " at nine." }) + openaiChunk({}, "stop") +
          "data: [DONE]\n\n",
      );
    });
    try {
      await onCall({ config: openaiConfig(fake) }, async (retell) => {
        retell.ask(1, [user("When do you open?")]);
        const { text, frames } = await retell.reply(1);
        assert.equal(text, "We open at nine.");
        assert.equal(frames.find((f) => f.content)?.content, "We");
      });
    } finally {
      await fake.close();
    }
  });

  test("a reply of many reads, with characters split between reads, arrives exactly, turn after turn", async () => {
    const words = Array(1500).fill("Ça coûte 5 € — 🙂 merci.").join(" "); // ~40 KB of UTF-8
    const body = Buffer.from(openaiChunk({ content: words }) + openaiChunk({}, "stop") + "data: [DONE]\n\n");
    const smile = body.indexOf("🙂") + 2; // halfway through the emoji's four bytes
    const fake = await fakeProvider(async (res) => {
      sse(res);
      for (const [from, to] of [[0, smile], [smile, smile + 20_000], [smile + 20_000, body.length]]) {
        res.write(body.subarray(from, to));
        await sleep(5);
      }
      res.end();
    });
    try {
      await onCall({ config: openaiConfig(fake) }, async (retell) => {
        for (const id of [1, 2, 3]) {
          retell.ask(id, [user(`price ${id}?`)]);
          const { text } = await retell.reply(id);
          assert.ok(text === words, `reply ${id}: ${text.length} characters, expected ${words.length}`);
        }
      });
    } finally {
      await fake.close();
    }
  });

  test("reply bytes are read into a buffer handed back for the next reply", async () => {
    // A byte stream, as Deno's fetch bodies are: each read fills the view the reader passes.
    const views: Uint8Array[] = [];
    const byteStream = (text: string) => {
      const bytes = new TextEncoder().encode(text);
      return new ReadableStream({
        type: "bytes",
        pull(controller) {
          const view = controller.byobRequest!.view! as Uint8Array;
          views.push(view.slice(0, 8));
          view.set(bytes);
          controller.byobRequest!.respond(bytes.length);
          controller.close();
        },
      });
    };
    const readAll = async (text: string) => {
      const reader = bytesOf(byteStream(text) as ReadableStream<Uint8Array>);
      let got = "";
      for (let r = await reader.read(); !r.done; r = await reader.read()) got += new TextDecoder().decode(r.value);
      await reader.cancel();
      return got;
    };
    assert.equal(await readAll("first reply"), "first reply");
    assert.equal(await readAll("next one"), "next one");
    // The second reply's first read was offered the first reply's buffer, its bytes still in it.
    assert.equal(new TextDecoder().decode(views.at(-1)), "first re");
  });

  test("reads CRLF-separated events, comments and data lines without a space, and speaks a mid-stream error", async () => {
    const fake = await fakeProvider((res, _body, n) =>
      n === 1
        ? stream(res, [
          ": keep-alive comment\r\n\r\n",
          openaiChunk({ content: "One, " }).replace("data: ", "data:").replace("\n\n", "\r\n\r\n"),
          openaiChunk({ content: "two." }),
          "data: [DONE]\n\n",
        ])
        : stream(res, [openaiChunk({ content: "Half " }), 'data: {"error":{"message":"overloaded"}}\n\n'])
    );
    try {
      await onCall({ config: openaiConfig(fake) }, async (retell) => {
        retell.ask(1, [user("count")]);
        assert.equal((await retell.reply(1)).text, "One, two.");
        retell.ask(2, [user("again")]);
        assert.equal((await retell.reply(2)).text, `Half  ${PERSONA.apology}`);
      });
    } finally {
      await fake.close();
    }
  });

  test("a stream cut off before the reply finished is an error, not a complete answer", async () => {
    const fake = await fakeProvider((res) => stream(res, [openaiChunk({ content: "We open at" })]));
    try {
      await onCall({ config: openaiConfig(fake) }, async (retell) => {
        retell.ask(1, [user("when do you open?")]);
        assert.equal((await retell.reply(1)).text, `We open at ${PERSONA.apology}`);
      });
    } finally {
      await fake.close();
    }
  });

  test("a reply ends at its finish_reason even if the provider keeps the stream open", async () => {
    const fake = await fakeProvider((res) => {
      sse(res);
      res.write(openaiChunk({ role: "assistant", content: "" }));
      res.write(openaiChunk({ content: "We open at nine." }));
      res.write(openaiChunk({}, "stop")); // and no [DONE]: the response stays open
    });
    try {
      const logs = await captureLogs(() =>
        onCall({ config: { ...openaiConfig(fake), firstTokenTimeoutMs: 1000 } }, async (retell) => {
          retell.ask(1, [user("when do you open?")]);
          assert.equal((await retell.reply(1, 900)).text, "We open at nine.");
        })
      );
      assert.deepEqual(logs.filter((l) => l.event === "turn").map((t) => t.outcome), ["completed"]);
    } finally {
      await fake.close();
    }
  });

  test("tool call ids longer than OpenAI's 40 characters are shortened, call and result alike", async () => {
    const fake = await fakeProvider((res) => stream(res, [openaiChunk({ content: "Done." }), openaiChunk({}, "stop")]));
    const longId = `toolu_${"z".repeat(60)}`;
    try {
      await onCall({ config: openaiConfig(fake) }, async (retell) => {
        const transcript = [user("is Tuesday free?"), agent("It is."), user("thanks")];
        retell.ask(1, transcript, {
          transcript_with_tool_calls: [
            transcript[0],
            { role: "tool_call_invocation", tool_call_id: longId, name: "check", arguments: "{}" },
            { role: "tool_call_result", tool_call_id: longId, content: '{"free":true}' },
            ...transcript.slice(1),
          ],
        });
        assert.equal((await retell.reply(1)).text, "Done.");
      });
      const messages = fake.requests[0].body.messages as Frame[];
      const callId = (messages.find((m) => m.tool_calls) as { tool_calls: Frame[] }).tool_calls[0].id as string;
      const resultId = messages.find((m) => m.role === "tool")!.tool_call_id as string;
      assert.ok(callId.length <= 40, callId);
      assert.equal(resultId, callId);
    } finally {
      await fake.close();
    }
  });

  test("odd tool-call indexes, a flood of calls and huge names cost nothing, and at most 16 calls run", async () => {
    const calls = [
      { index: 4294967294, id: "call_far", function: { name: "opening_hours", arguments: '{"day":"monday"}' } },
      { index: "__proto__", id: "call_proto", function: { name: "opening_hours", arguments: '{"day":"friday"}' } },
      { index: 1, id: "call_long", function: { name: "n".repeat(1_000_000), arguments: "{}" } },
      ...Array.from({ length: 2000 }, (_, i) => ({
        index: i + 2,
        id: `call_${i}`,
        function: { name: "opening_hours", arguments: '{"day":"sunday"}' },
      })),
    ];
    const fake = await fakeProvider((res, _body, n) =>
      stream(
        res,
        n === 1
          ? [openaiChunk({ tool_calls: calls }), openaiChunk({}, "tool_calls")]
          : [openaiChunk({ content: "Done." }), openaiChunk({}, "stop")],
      )
    );
    try {
      await onCall({ config: openaiConfig(fake), tools: [...TOOLS, hoursTool] }, async (retell) => {
        retell.ask(1, [user("when are you open?")]);
        assert.equal((await retell.reply(1, 5000)).text, "Done.");
        const invoked = retell.frames.filter((f) => f.response_type === "tool_call_invocation");
        assert.equal(invoked.length, 16);
        assert.deepEqual(invoked.slice(0, 2).map((f) => f.tool_call_id), ["call_far", "call_proto"]);
        assert.ok(invoked.every((f) => (f.name as string).length <= 128));
      });
    } finally {
      await fake.close();
    }
  });

  test("parallel tool calls sent without an index (some compatible servers) stay two calls", async () => {
    const fake = await fakeProvider((res, _body, n) =>
      stream(
        res,
        n === 1
          ? [
            openaiChunk({
              tool_calls: [
                { id: "call_A", function: { name: "opening_hours", arguments: '{"day":"monday"}' } },
                { id: "call_B", function: { name: "opening_hours", arguments: '{"day":"tuesday"}' } },
              ],
            }),
            openaiChunk({}, "tool_calls"),
          ]
          : [openaiChunk({ content: "Nine and ten." }), openaiChunk({}, "stop")],
      )
    );
    try {
      await onCall({ config: openaiConfig(fake), tools: [...TOOLS, hoursTool] }, async (retell) => {
        retell.ask(1, [user("monday and tuesday?")]);
        assert.equal((await retell.reply(1)).text, "Nine and ten.");
        const results = retell.frames.filter((f) => f.response_type === "tool_call_result");
        assert.deepEqual(results.map((f) => [f.tool_call_id, f.successful]), [["call_A", true], ["call_B", true]]);
      });
    } finally {
      await fake.close();
    }
  });

  test("reasoning streamed before the words (reasoning_content) is progress, not silence", async () => {
    const fake = await fakeProvider(async (res) => {
      sse(res);
      for (let i = 0; i < 10 && !res.destroyed; i++) {
        res.write(openaiChunk({ reasoning_content: "thinking… " }));
        await sleep(100);
      }
      res.write(openaiChunk({ content: "We open at nine." }));
      res.end(openaiChunk({}, "stop"));
    });
    try {
      await onCall({ config: { ...openaiConfig(fake), firstTokenTimeoutMs: 400 } }, async (retell) => {
        retell.ask(1, [user("when do you open?")]);
        assert.equal((await retell.reply(1, 3000)).text, "We open at nine.");
      });
    } finally {
      await fake.close();
    }
  });

  test("a reply that trickles tool-call arguments without a word is cut off with the apology", async () => {
    const fake = await fakeProvider(async (res) => {
      sse(res);
      res.write(openaiChunk({ tool_calls: [{ index: 0, id: "call_1", function: { name: "opening_hours" } }] }));
      while (!res.destroyed) {
        res.write(openaiChunk({ tool_calls: [{ index: 0, function: { arguments: " " } }] }));
        await sleep(30);
      }
    });
    try {
      await onCall({ config: { ...openaiConfig(fake), firstTokenTimeoutMs: 150 } }, async (retell) => {
        const started = Date.now();
        retell.ask(1, [user("hello?")]);
        assert.equal((await retell.reply(1, 3000)).text, PERSONA.apology);
        assert.ok(Date.now() - started >= 700, "not before 5× the first-token limit");
      });
    } finally {
      await fake.close();
    }
  });

  test("a provider event of over 4 MB is an error spoken as the apology", async () => {
    const fake = await fakeProvider(async (res) => {
      sse(res);
      for (let i = 0; i < 6 && !res.destroyed; i++) {
        res.write(i ? "x".repeat(1024 * 1024) : "data: ");
        await sleep(5);
      }
    });
    try {
      await onCall({ config: openaiConfig(fake) }, async (retell) => {
        retell.ask(1, [user("hello?")]);
        assert.equal((await retell.reply(1, 3000)).text, PERSONA.apology);
      });
    } finally {
      await fake.close();
    }
  });

  test("a newer request cancels the older request's HTTP stream at once", async () => {
    const fake = await fakeProvider((res, _body, n) =>
      n === 1
        ? stream(res, Array.from({ length: 400 }, (_, i) => openaiChunk({ content: `word${i} ` })), 10)
        : stream(res, [openaiChunk({ content: "Fresh answer." }), "data: [DONE]\n\n"])
    );
    try {
      await onCall({ config: openaiConfig(fake) }, async (retell) => {
        retell.ask(1, [user("tell me everything")]);
        await retell.next((f) => f.response_id === 1 && f.content?.includes("word2 "));
        retell.ask(2, [user("actually, just one thing")]);
        assert.equal((await retell.reply(2)).text, "Fresh answer.");
        const deadline = Date.now() + 1000;
        while (!fake.cancelled.includes(1) && Date.now() < deadline) await sleep(5);
        assert.deepEqual(fake.cancelled, [1], "the first upstream stream was closed by the client");
        const staleAfter = retell.frames.slice(retell.frames.findIndex((f) => f.response_id === 2));
        assert.equal(staleAfter.filter((f) => f.response_id === 1).length, 0);
      });
    } finally {
      await fake.close();
    }
  });

  test("an HTTP 500 from the provider is spoken as an apology and the turn completes", async () => {
    const fake = await fakeProvider((res) => {
      res.writeHead(500, { "content-type": "application/json" });
      res.end(JSON.stringify({ error: { message: "boom", type: "server_error" } }));
    });
    try {
      await onCall({ config: openaiConfig(fake) }, async (retell) => {
        retell.ask(1, [user("hi")]);
        const { text, frames } = await retell.reply(1, 5000);
        assert.equal(text, PERSONA.apology);
        assert.equal(frames.filter((f) => f.content_complete).length, 1);
      });
    } finally {
      await fake.close();
    }
  });
});

describe("Claude through the real SDK", () => {
  const textReply = (...parts: string[]) => [
    claudeEvent("message_start", {
      message: {
        id: "msg_1",
        type: "message",
        role: "assistant",
        model: "claude-test",
        content: [],
        stop_reason: null,
        stop_sequence: null,
        usage: { input_tokens: 10, output_tokens: 1 },
      },
    }),
    claudeEvent("content_block_start", { index: 0, content_block: { type: "text", text: "" } }),
    claudeEvent("ping"),
    ...parts.map((text) => claudeEvent("content_block_delta", { index: 0, delta: { type: "text_delta", text } })),
    claudeEvent("content_block_stop", { index: 0 }),
    claudeEvent("message_delta", {
      delta: { stop_reason: "end_turn", stop_sequence: null },
      usage: { output_tokens: 5 },
    }),
    claudeEvent("message_stop"),
  ];
  const toolReply = [
    textReply()[0],
    claudeEvent("content_block_start", { index: 0, content_block: { type: "text", text: "" } }),
    claudeEvent("content_block_delta", { index: 0, delta: { type: "text_delta", text: "Let me check. " } }),
    claudeEvent("content_block_stop", { index: 0 }),
    claudeEvent("content_block_start", {
      index: 1,
      content_block: { type: "tool_use", id: "toolu_01", name: "opening_hours", input: {} },
    }),
    claudeEvent("content_block_delta", { index: 1, delta: { type: "input_json_delta", partial_json: '{"day": "mon' } }),
    claudeEvent("content_block_delta", { index: 1, delta: { type: "input_json_delta", partial_json: 'day"}' } }),
    claudeEvent("content_block_stop", { index: 1 }),
    claudeEvent("message_delta", {
      delta: { stop_reason: "tool_use", stop_sequence: null },
      usage: { output_tokens: 20 },
    }),
    claudeEvent("message_stop"),
  ];

  test("streams text, runs a tool and sends its result back as a tool_result turn", async () => {
    const fake = await fakeProvider((res, _body, n) =>
      stream(res, n === 1 ? toolReply : textReply("We open ", "at nine."))
    );
    try {
      await onCall({ config: claudeConfig(fake), tools: [...TOOLS, hoursTool] }, async (retell) => {
        retell.ask(1, [agent("Hello, this is Ava."), user("When do you open on Monday?")]);
        assert.equal((await retell.reply(1)).text, "Let me check. We open at nine.");
        const [first, second] = fake.requests;
        assert.equal(first.headers.authorization, "Bearer sk-ant-test");
        assert.equal(first.body.model, "claude-haiku-4-5");
        assert.match(first.body.system, /Sunrise Dental/);
        const tool = first.body.tools.find((t: Frame) => t.name === "opening_hours");
        assert.deepEqual(tool.input_schema.required, ["day"]);
        assert.deepEqual(second.body.messages, [
          { role: "user", content: [{ type: "text", text: "(The call has started.)" }] },
          { role: "assistant", content: [{ type: "text", text: "Hello, this is Ava." }] },
          { role: "user", content: [{ type: "text", text: "When do you open on Monday?" }] },
          {
            role: "assistant",
            content: [
              { type: "text", text: "Let me check." },
              { type: "tool_use", id: "toolu_01", name: "opening_hours", input: { day: "monday" } },
            ],
          },
          {
            role: "user",
            content: [{ type: "tool_result", tool_use_id: "toolu_01", content: '{"day":"monday","opens":"9:00"}' }],
          },
        ]);
      });
    } finally {
      await fake.close();
    }
  });

  test("the request alternates roles: merged user turns, no empty utterances, user last", async () => {
    const fake = await fakeProvider((res) => stream(res, textReply("Sure.")));
    try {
      await onCall({ config: claudeConfig(fake) }, async (retell) => {
        retell.ask(1, [
          user("hi"),
          user(""),
          user("is anyone there"),
          agent("Yes!"),
          agent("  "),
          agent("How can I help?"),
        ]);
        assert.equal((await retell.reply(1)).text, "Sure.");
        const messages = fake.requests[0].body.messages;
        assert.deepEqual(messages.map((m: Frame) => m.role), ["user", "assistant", "user"]);
        assert.deepEqual(messages[0].content.map((b: Frame) => b.text), ["hi", "is anyone there"]);
        assert.deepEqual(messages[1].content.map((b: Frame) => b.text), ["Yes!", "How can I help?"]);
      });
    } finally {
      await fake.close();
    }
  });

  test("a stream of nothing but pings times out with the apology instead of holding the turn", async () => {
    const fake = await fakeProvider(async (res) => {
      sse(res);
      res.write(textReply()[0]);
      while (!res.destroyed) {
        res.write(claudeEvent("ping"));
        await sleep(50);
      }
    });
    try {
      await onCall({ config: { ...claudeConfig(fake), firstTokenTimeoutMs: 300 } }, async (retell) => {
        retell.ask(1, [user("hello?")]);
        assert.equal((await retell.reply(1, 2000)).text, PERSONA.apology);
      });
    } finally {
      await fake.close();
    }
  });

  test("a reply ends at message_stop even if the provider keeps the stream open", async () => {
    const fake = await fakeProvider((res) => {
      sse(res);
      for (const event of textReply("We open ", "at nine.")) res.write(event); // and the response stays open
    });
    try {
      await onCall({ config: { ...claudeConfig(fake), firstTokenTimeoutMs: 1000 } }, async (retell) => {
        retell.ask(1, [user("when do you open?")]);
        assert.equal((await retell.reply(1, 900)).text, "We open at nine.");
      });
    } finally {
      await fake.close();
    }
  });

  test("a newer request cancels the older Claude stream, and an overloaded error is spoken", async () => {
    const fake = await fakeProvider((res, _body, n) => {
      if (n === 1) return stream(res, textReply(...Array.from({ length: 400 }, (_, i) => `w${i} `)), 10);
      return stream(res, [
        claudeEvent("error", { error: { type: "overloaded_error", message: "Overloaded" } }),
      ]);
    });
    try {
      await onCall({ config: claudeConfig(fake) }, async (retell) => {
        retell.ask(1, [user("talk")]);
        await retell.next((f) => f.response_id === 1 && f.content?.includes("w2 "));
        retell.ask(2, [user("stop")]);
        assert.equal((await retell.reply(2, 5000)).text, PERSONA.apology);
        const deadline = Date.now() + 1000;
        while (!fake.cancelled.includes(1) && Date.now() < deadline) await sleep(5);
        assert.ok(fake.cancelled.includes(1), "the first upstream stream was closed by the client");
      });
    } finally {
      await fake.close();
    }
  });
});

// ---------------------------------------------------------------------------------------
// Starting the real program

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const server = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/** Runs main.ts as its own process the way a user would; returns its output when it ends. */
function runMain(args: string[], env: Record<string, string>) {
  const clean = { ...process.env } as Record<string, string>;
  for (const key of Object.keys(clean)) if (/^(OPENAI|ANTHROPIC|LLM|AUTH|PORT|TRANSFER)/.test(key)) delete clean[key];
  const child = spawn(process.execPath, args, {
    env: { ...clean, NO_COLOR: "1", ...env },
    cwd: new URL(".", import.meta.url).pathname,
  });
  let output = "";
  child.stdout.on("data", (d) => output += d);
  child.stderr.on("data", (d) => output += d);
  const exited = new Promise<number | null>((resolve) => child.on("close", (code) => resolve(code)));
  return { child, exited, output: () => output };
}

async function waitForHealth(port: number, ms = 8000) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    try {
      const res = await fetch(`http://127.0.0.1:${port}/health`);
      if (res.ok) return res.json();
    } catch { /* not up yet */ }
    await sleep(50);
  }
  throw new Error(`nothing answered on port ${port}`);
}

const startArgs = isBun ? ["run", "main.ts"] : ["run", "--allow-net", "--allow-env", "main.ts"];

describe("starting the program", () => {
  test("listens on PORT with the demo brain when no key is set, and says so", async () => {
    const port = await freePort();
    const run = runMain(startArgs, { PORT: String(port) });
    try {
      const health = await waitForHealth(port);
      assert.deepEqual([health.provider, health.model], ["demo", "offline-demo"]);
      const retell = await Retell.connect(port, "/llm-websocket/real_process");
      await retell.next((f) => f.response_type === "config");
      retell.close();
      assert.match(run.output(), /offline demo brain/);
    } finally {
      run.child.kill("SIGKILL");
      await run.exited;
    }
  });

  test("an unknown LLM_PROVIDER stops startup with a sentence naming the allowed ones", async () => {
    const run = runMain(startArgs, { LLM_PROVIDER: "gemini", PORT: "0" });
    const code = await run.exited;
    assert.equal(code, 1);
    assert.match(run.output(), /LLM_PROVIDER must be one of openai, anthropic, demo \(got "gemini"\)/);
  });

  test("a port already in use stops startup with a non-zero exit", async () => {
    const blocker = net.createServer().listen(0);
    await new Promise((resolve) => blocker.once("listening", resolve));
    const { port } = blocker.address() as net.AddressInfo;
    try {
      const run = runMain(startArgs, { PORT: String(port) });
      const code = await Promise.race([run.exited, sleep(8000).then(() => "still running")]);
      if (code === "still running") run.child.kill("SIGKILL");
      assert.equal(code, 1, run.output());
      assert.match(run.output(), /Cannot listen on port/);
    } finally {
      blocker.close();
    }
  });

  test("`deno serve` serves the same file", { skip: isBun }, async () => {
    const port = await freePort();
    const run = runMain(["serve", "--allow-net", "--allow-env", "--port", String(port), "main.ts"], {});
    try {
      const health = await waitForHealth(port);
      assert.equal(health.provider, "demo");
      const retell = await Retell.connect(port, "/llm-websocket/served");
      assert.equal((await retell.next()).response_type, "config");
      retell.close();
    } finally {
      run.child.kill("SIGKILL");
      await run.exited;
    }
  });
});

// ---------------------------------------------------------------------------------------
// Tools that act safely, and an agent that talks while it waits

/** A side-effect tool that counts how often it really ran. */
function countingTool(delayMs = 0) {
  const runs: unknown[] = [];
  const tool: Tool = {
    name: "place_order",
    description: "Place an order",
    schema: z.object({ item: z.string(), qty: z.number() }),
    once: true,
    run: async (args: unknown) => {
      runs.push(args);
      await sleep(delayMs);
      return { ordered: true, order_no: runs.length };
    },
  };
  return { tool, runs };
}

/** The transcript_with_tool_calls items Retell would weave from the frames we sent. */
const woven = (frames: Frame[]) =>
  frames.filter((f) => f.response_type === "tool_call_invocation" || f.response_type === "tool_call_result").map((
    { response_type, ...rest },
  ) => ({ role: response_type, ...rest }));

describe("tools: once per call", () => {
  test("a side effect asked for again by a superseding request runs once and returns the first result", async () => {
    const { tool, runs } = countingTool(300);
    const brain = scripted((req, _s, n) => {
      const last = req.messages.at(-1)!;
      if (last.role === "tool_result") return say(`Done: ${last.content}`);
      return callTool("place_order", { qty: 2, item: "brush" }, `call_${n}`);
    });
    await withServer({ brain, tools: [tool] }, async (port) => {
      const retell = await Retell.connect(port);
      await retell.opened();
      retell.ask(1, [user("two brushes please")]);
      await retell.next((f) => f.response_type === "tool_call_invocation");
      retell.ask(2, [user("two brushes please, thanks")]);
      const { text } = await retell.reply(2);
      assert.equal(text, 'Done: {"ordered":true,"order_no":1}');
      assert.equal(runs.length, 1, "the order was placed once");
      // A reconnect of the same call asking the same thing gets the same result, still once.
      retell.close();
      const again = await Retell.connect(port);
      await again.opened();
      again.ask(3, [user("did you order two brushes?")]);
      assert.equal((await again.reply(3)).text, 'Done: {"ordered":true,"order_no":1}');
      assert.equal(runs.length, 1);
      again.close();
    });
  });

  test("a side effect that honours the abort signal is not stopped, and not repeated, by a newer request", async () => {
    const writes: number[] = [];
    const careful: Tool = {
      name: "save",
      description: "save",
      schema: z.object({}),
      once: true,
      run: async (_args: unknown, { signal }: { signal: AbortSignal }) => {
        writes.push(Date.now());
        await sleep(300);
        if (signal.aborted) throw new Error("aborted");
        return { saved: writes.length };
      },
    };
    const lastResult = (req: BrainRequest) => (req.messages.at(-1) as { content: string }).content;
    const brain = scripted((req) =>
      req.messages.at(-1)!.role === "tool_result" ? say(lastResult(req)) : callTool("save", {})
    );
    await onCall({ brain, tools: [careful] }, async (retell) => {
      retell.ask(1, [user("save it")]);
      await sleep(100);
      retell.ask(2, [user("save it please")]);
      assert.equal((await retell.reply(2)).text, '{"saved":1}');
      assert.equal(writes.length, 1);
    });
  });

  test("a side effect that times out is reported as unknown, not as failed", async () => {
    const hanging: Tool = { name: "charge", description: "", schema: z.object({}), once: true, run: () => sleep(1000) };
    const brain = scripted((req) =>
      req.messages.at(-1)!.role === "tool_result"
        ? say((req.messages.at(-1) as { content: string }).content)
        : callTool("charge", {})
    );
    await withServer(
      { brain, tools: [hanging], config: testConfig({ toolTimeoutMs: 100, fillerAfterMs: 5000 }) },
      async (port) => {
        const retell = await Retell.connect(port);
        await retell.opened();
        retell.ask(1, [user("charge me")]);
        assert.match((await retell.reply(1)).text, /may or may not have happened/);
        retell.close();
      },
    );
  });

  test("the diary refuses weekends, past days and impossible dates with a reason", async () => {
    const check = TOOLS.find((t) => t.name === "check_availability")!;
    const ctx = {} as never;
    assert.match((await check.run({ date: "2031-03-08" }, ctx) as { closed: string }).closed, /weekends/);
    assert.match((await check.run({ date: "2020-01-06" }, ctx) as { closed: string }).closed, /past/);
    assert.match((await check.run({ date: "2031-02-31" }, ctx) as { closed: string }).closed, /not a real date/);
  });

  test("a side effect that succeeded is not run again when saving its result failed once", async () => {
    const { tool, runs } = countingTool();
    class FlakyStore extends MemoryStore {
      failed = false;
      override setIfAbsent(key: string, value: string, ttlMs: number) {
        if (key.endsWith(":result") && !this.failed) {
          this.failed = true;
          return Promise.reject(new Error("connection reset"));
        }
        return super.setIfAbsent(key, value, ttlMs);
      }
    }
    const brain = scripted((req) =>
      req.messages.at(-1)!.role === "tool_result" ? say("ok") : callTool("place_order", { item: "brush", qty: 1 })
    );
    await withServer({ brain, tools: [tool], store: new FlakyStore() }, async (port) => {
      for (const id of [1, 2]) {
        const retell = await Retell.connect(port, "/llm-websocket/flaky");
        await retell.opened();
        retell.ask(id, [user("order one brush")]);
        await retell.reply(id);
        retell.close();
      }
      assert.equal(runs.length, 1);
    });
  });

  test("different arguments, or another call, do run again", async () => {
    const { tool, runs } = countingTool();
    let qty = 1;
    const brain = scripted((req) =>
      req.messages.at(-1)!.role === "tool_result" ? say("ok") : callTool("place_order", { item: "brush", qty: qty++ })
    );
    await withServer({ brain, tools: [tool] }, async (port) => {
      for (const path of ["/llm-websocket/a", "/llm-websocket/a", "/llm-websocket/b"]) {
        const retell = await Retell.connect(port, path);
        await retell.opened();
        retell.ask(1, [user("order")]);
        await retell.reply(1);
        retell.close();
      }
      assert.equal(runs.length, 3);
    });
  });

  test("the clinic's booking tool books a slot once, and the slot is then gone", async () => {
    const args = { date: "2031-03-03", time: "10:30", name: "Maria Lopez" };
    const brain = scripted((req, _s, n) => {
      const last = req.messages.at(-1)!;
      if (last.role === "tool_result") return say(last.content);
      return callTool(
        n === 5 ? "check_availability" : "book_appointment",
        n === 5 ? { date: args.date } : args,
        `c${n}`,
      );
    });
    await withServer({ brain }, async (port) => {
      const retell = await Retell.connect(port, "/llm-websocket/booking_call");
      await retell.opened();
      retell.ask(1, [user("book me")]);
      const first = JSON.parse((await retell.reply(1)).text);
      assert.equal(first.booked, true);
      assert.match(first.confirmation, /^SD-\d{4}$/);
      retell.ask(2, [user("book me, please")]);
      assert.deepEqual(JSON.parse((await retell.reply(2)).text), first, "the same booking comes back");
      retell.ask(3, [user("what is free that day?")]);
      const free = JSON.parse((await retell.reply(3)).text);
      assert.deepEqual(free.open_times, ["09:00", "13:00", "15:30"]);
      retell.close();
    });
  });
});

describe("tools: once per call, under a barge-in", () => {
  test("a side-effect action still running when the caller talks over it is not run again", async () => {
    const runs: unknown[] = [];
    const cancelAndEnd: Tool = {
      name: "cancel_order",
      description: "Cancel the order and end the call",
      schema: z.object({ order: z.string() }),
      once: true,
      action: true,
      run: async (args: unknown) => {
        runs.push(args);
        await sleep(300);
        return new CallAction("Your order is cancelled. Goodbye!", { end_call: true });
      },
    };
    const brain = scripted((_req, _s, n) =>
      n === 1 ? callTool("cancel_order", { order: "A1" }, "call_c1") : say("Anything else?")
    );
    await onCall({ brain, tools: [cancelAndEnd] }, async (retell) => {
      retell.ask(1, [user("cancel order A1")]);
      const invocation = await retell.next((f) => f.response_type === "tool_call_invocation");
      const woven = { ...invocation, role: "tool_call_invocation", response_type: undefined };
      retell.ask(2, [user("cancel order A1"), user("okay")], {
        transcript_with_tool_calls: [user("cancel order A1"), woven, user("okay")],
      });
      await retell.reply(2);
      await sleep(400);
      assert.deepEqual(runs, [{ order: "A1" }]);
    });
  });

  test("an action is re-issued only from its own call, even when another call used the same id", async () => {
    const brain = scripted(() => callTool("transfer_call", { message: "Connecting you to the desk." }, "call_x"));
    await withServer({ brain, config: testConfig({ transferNumber: "+14155550100" }) }, async (port) => {
      const a = await Retell.connect(port, "/llm-websocket/call_a");
      await a.opened();
      a.ask(1, [user("a person please")]);
      assert.equal((await a.reply(1)).frames.find((f) => f.content)!.transfer_number, "+14155550100");
      a.close();
      const b = await Retell.connect(port, "/llm-websocket/call_b");
      await b.opened();
      const goodbye = { message: "Bye now, take care!" };
      b.ask(1, [agent("Bye now, take care!"), user("okay")], {
        transcript_with_tool_calls: [
          user("that's all"),
          {
            role: "tool_call_invocation",
            tool_call_id: "call_x",
            name: "end_call",
            arguments: JSON.stringify(goodbye),
          },
          agent("Bye now, take care!"),
          user("okay"),
        ],
      });
      const { frames } = await b.reply(1);
      assert.equal(frames.at(-1)!.end_call, true);
      assert.ok(frames.every((f) => f.transfer_number === undefined));
      b.close();
    });
  });

  test("a tool's result is reported even when a newer request superseded its turn", async () => {
    const order: Tool = {
      name: "place_order",
      description: "Place an order",
      schema: z.object({ item: z.string() }),
      once: true,
      run: async () => (await sleep(200), { ordered: true }),
    };
    const brain = scripted((_req, _s, n) =>
      n === 1 ? callTool("place_order", { item: "brush" }, "call_1") : say("Done.")
    );
    await onCall({ brain, tools: [order] }, async (retell) => {
      retell.ask(1, [user("a brush please")]);
      await retell.next((f) => f.response_type === "tool_call_invocation");
      retell.ask(2, [user("a brush please"), user("and quickly")]);
      await retell.reply(2);
      const result = await retell.next((f) => f.response_type === "tool_call_result", 1000);
      assert.equal(result.tool_call_id, "call_1");
      assert.equal(result.successful, true);
    });
  });

  test("a state store that stops answering is reported in time, and nothing is left running", async () => {
    class StalledStore extends MemoryStore {
      override get(_key: string) {
        return new Promise<string | undefined>(() => {});
      }
    }
    const order: Tool = {
      name: "place_order",
      description: "Place an order",
      schema: z.object({ item: z.string() }),
      once: true,
      run: () => ({ ordered: true }),
    };
    const brain = scripted((req) =>
      req.messages.at(-1)!.role === "tool_result"
        ? say("Sorry, not right now.")
        : callTool("place_order", { item: "x" })
    );
    const config = testConfig({ toolTimeoutMs: 200 });
    await withServer({ brain, tools: [order], store: new StalledStore(), config }, async (port, server) => {
      const retell = await Retell.connect(port);
      await retell.opened();
      retell.ask(1, [user("order x")]);
      assert.equal((await retell.reply(1)).text, "Sorry, not right now.");
      const result = retell.frames.find((f) => f.response_type === "tool_call_result")!;
      assert.match(result.content as string, /cannot be done right now/);
      retell.close();
      await sleep(300);
      assert.equal(server.deps.once.busy, false);
    });
  });
});

describe("tools: once per call, with a store that fails", () => {
  const order = (runs: unknown[]): Tool => ({
    name: "place_order",
    description: "Place an order",
    schema: z.object({ item: z.string() }),
    once: true,
    run: (args: unknown) => (runs.push(args), { ordered: true }),
  });
  const orderBrain = () =>
    scripted((req) =>
      req.messages.at(-1)!.role === "tool_result"
        ? say((req.messages.at(-1) as { content: string }).content)
        : callTool("place_order", { item: "brush" })
    );

  test("a side effect whose result could not be saved is not run again, here or on another instance", async () => {
    class NoResults extends MemoryStore {
      override setIfAbsent(key: string, value: string, ttlMs: number) {
        return key.endsWith(":result")
          ? Promise.reject(new Error("connection lost"))
          : super.setIfAbsent(key, value, ttlMs);
      }
    }
    const store = new NoResults();
    const runs: unknown[] = [];
    const options = { brain: orderBrain(), tools: [order(runs)], store, config: testConfig({ toolTimeoutMs: 100 }) };
    await withServer(options, async (portA) => {
      await withServer(options, async (portB) => {
        const a = await Retell.connect(portA, "/llm-websocket/call_o");
        await a.opened();
        a.ask(1, [user("a brush")]);
        assert.match((await a.reply(1)).text, /ordered/);
        a.ask(2, [user("a brush"), user("a brush, I said")]);
        assert.match((await a.reply(2)).text, /ordered/); // from this instance's memory
        a.ws.close(3001);
        await sleep(500); // past the old claim expiry of 3 × TOOL_TIMEOUT_MS
        const b = await Retell.connect(portB, "/llm-websocket/call_o");
        await b.opened();
        b.ask(3, [user("a brush")]);
        assert.match((await b.reply(3)).text, /may or may not have happened/);
        assert.equal(runs.length, 1);
        b.close();
      });
    });
  });

  test("a result saved whose answer was lost counts as saved: no alarm, nothing left busy", async () => {
    class LostAnswer extends MemoryStore {
      override async setIfAbsent(key: string, value: string, ttlMs: number) {
        const set = await super.setIfAbsent(key, value, ttlMs);
        if (set && key.endsWith(":result")) throw new Error("connection reset"); // written, answer lost
        return set;
      }
    }
    const runs: unknown[] = [];
    const logs = await captureLogs(() =>
      withServer({ brain: orderBrain(), tools: [order(runs)], store: new LostAnswer() }, async (port, server) => {
        const retell = await Retell.connect(port);
        await retell.opened();
        retell.ask(1, [user("a brush")]);
        assert.match((await retell.reply(1)).text, /ordered/);
        await sleep(300);
        assert.equal(server.deps.once.busy, false);
        retell.close();
      })
    );
    assert.ok(!logs.some((l) => l.event === "once_result_not_saved"));
  });

  test("a record in the store that this server did not write is refused out loud", async () => {
    class Forged extends MemoryStore {
      override get(key: string) {
        return key.endsWith(":result")
          ? Promise.resolve(JSON.stringify({ content: "ok", ok: true, action: { message: "x", flags: { evil: 1 } } }))
          : super.get(key);
      }
    }
    const runs: unknown[] = [];
    await onCall({ brain: orderBrain(), tools: [order(runs)], store: new Forged() }, async (retell) => {
      retell.ask(1, [user("a brush")]);
      assert.match((await retell.reply(1)).text, /cannot be done right now/);
      assert.equal(runs.length, 0);
    });
  });
});

describe("tools: failures and parallel calls", () => {
  test("a tool that exceeds TOOL_TIMEOUT_MS is reported to the model and the turn completes", async () => {
    const slow: Tool = { name: "slow", description: "slow", schema: z.object({}), run: () => sleep(2000) };
    const brain = scripted((req) => {
      const last = req.messages.at(-1)!;
      return last.role === "tool_result" ? say(`Sorry, ${JSON.parse(last.content).error}.`) : callTool("slow", {});
    });
    await withServer(
      { brain, tools: [slow], config: testConfig({ toolTimeoutMs: 150, fillerAfterMs: 5000 }) },
      async (port) => {
        const retell = await Retell.connect(port);
        await retell.opened();
        retell.ask(1, [user("do the slow thing")]);
        const { text, frames } = await retell.reply(1);
        assert.equal(text, "Sorry, slow failed: it took too long.");
        assert.equal(frames.filter((f) => f.content_complete).length, 1);
        assert.equal(retell.frames.find((f) => f.response_type === "tool_call_result")!.successful, false);
        retell.close();
      },
    );
  });

  test("parallel tool calls in one reply all run at once and their results go back together", async () => {
    const lookup = (name: string): Tool => ({
      name,
      description: name,
      schema: z.object({}),
      run: () => sleep(300).then(() => `${name} result`),
    });
    const brain = scripted(async function* (req) {
      if (req.messages.at(-1)!.role === "tool_result") return yield* say("Both done.");
      yield* callTool("left", {}, "c_left");
      yield* callTool("right", {}, "c_right");
    });
    await onCall({ brain, tools: [lookup("left"), lookup("right")] }, async (retell) => {
      const started = Date.now();
      retell.ask(1, [user("both please")]);
      assert.equal((await retell.reply(1)).text, "Both done.");
      assert.ok(Date.now() - started < 550, "the two 300 ms tools ran side by side");
      assert.deepEqual(brain.requests[1].messages.slice(-4), [
        { role: "tool_call", id: "c_left", name: "left", args: "{}" },
        { role: "tool_call", id: "c_right", name: "right", args: "{}" },
        { role: "tool_result", id: "c_left", content: "left result" },
        { role: "tool_result", id: "c_right", content: "right result" },
      ]);
    });
  });
});

describe("talking while waiting", () => {
  const fillerConfig = () => testConfig({ fillerAfterMs: 100 });
  const persona = { ...testPersona, holding: ["One moment."] };
  const slowTool: Tool = {
    name: "lookup",
    description: "slow",
    schema: z.object({}),
    run: () => sleep(400).then(() => "found"),
  };

  test("a slow tool gets a holding line, then the answer, with one content_complete", async () => {
    const brain = scripted((req) =>
      req.messages.at(-1)!.role === "tool_result" ? say("Here it is.") : callTool("lookup", {})
    );
    await onCall({ brain, tools: [slowTool], persona, config: fillerConfig() }, async (retell) => {
      retell.ask(1, [user("look it up")]);
      const { text, frames } = await retell.reply(1);
      assert.equal(text, "One moment. Here it is.");
      assert.deepEqual(frames[0], {
        response_type: "response",
        response_id: 1,
        content: "One moment. ",
        content_complete: false,
      });
      assert.equal(frames.filter((f) => f.content_complete).length, 1);
    });
  });

  test("a slow model gets one holding line, and none follows when a tool is slow too", async () => {
    const brain = scripted(async function* (req) {
      if (req.messages.at(-1)!.role === "tool_result") return yield* say("Found it.");
      await sleep(300);
      yield* callTool("lookup", {});
    });
    await onCall({ brain, tools: [slowTool], persona, config: fillerConfig() }, async (retell) => {
      retell.ask(1, [user("look it up")]);
      assert.equal((await retell.reply(1)).text, "One moment. Found it.");
    });
  });

  test("the wait is counted from the request, across model and tool steps", async () => {
    const quickTool: Tool = {
      name: "lookup",
      description: "",
      schema: z.object({}),
      run: () => sleep(70).then(() => "x"),
    };
    const brain = scripted(async function* (req) {
      await sleep(70);
      if (req.messages.at(-1)!.role === "tool_result") return yield* say("Found it.");
      yield* callTool("lookup", {});
    });
    await onCall({ brain, tools: [quickTool], persona, config: fillerConfig() }, async (retell) => {
      retell.ask(1, [user("look it up")]);
      assert.equal((await retell.reply(1)).text, "One moment. Found it.");
    });
  });

  test("no holding line once the model has started talking", async () => {
    const brain = scripted(async function* (req) {
      if (req.messages.at(-1)!.role === "tool_result") return yield* say("Found it.");
      yield* say("Let me check. ");
      yield* callTool("lookup", {});
    });
    await onCall({ brain, tools: [slowTool], persona, config: fillerConfig() }, async (retell) => {
      retell.ask(1, [user("look it up")]);
      assert.equal((await retell.reply(1)).text, "Let me check. Found it.");
    });
  });
});

describe("actions that survive a barge-in", () => {
  const goodbye = "Thanks for calling Sunrise Dental, goodbye!";

  test("end_call is re-issued when the caller talked over the goodbye", async () => {
    const brain = scripted(() => callTool("end_call", { message: goodbye }, "call_end"));
    await onCall({ brain }, async (retell) => {
      retell.ask(1, [user("that's all, bye")]);
      const first = (await retell.reply(1)).frames.find((f) => f.content);
      assert.deepEqual(first, {
        response_type: "response",
        response_id: 1,
        content: goodbye,
        content_complete: true,
        end_call: true,
        no_interruption_allowed: true,
      });
      // The caller said "okay" over the goodbye: Retell cancels the hang-up and asks again.
      const said = [user("that's all, bye")];
      const interrupted = [agent("Thanks for calling Sunrise Dental, good"), user("okay")];
      retell.ask(2, [...said, ...interrupted], {
        transcript_with_tool_calls: [...said, ...woven(retell.frames), ...interrupted],
      });
      const { frames } = await retell.reply(2);
      assert.deepEqual(frames, [
        { response_type: "response", response_id: 2, content: "", content_complete: true, end_call: true },
      ]);
      assert.equal(brain.requests.length, 1, "the model was not asked again");
    });
  });

  test("transfer_call is re-issued the same way", async () => {
    const brain = scripted(() => callTool("transfer_call", { message: "Connecting you to the front desk now." }, "t1"));
    await onCall({ brain, config: testConfig({ transferNumber: "+14155550100" }) }, async (retell) => {
      retell.ask(1, [user("a person please")]);
      await retell.reply(1);
      const interrupted = [agent("Connecting you to the front"), user("right")];
      retell.ask(2, [], {
        transcript_with_tool_calls: [user("a person please"), ...woven(retell.frames), ...interrupted],
      });
      const { frames } = await retell.reply(2);
      assert.equal(frames.length, 1);
      assert.equal(frames[0].transfer_number, "+14155550100");
    });
  });

  test("a caller who says 'no, wait' over the goodbye is answered, not hung up on", async () => {
    const brain = scripted((_r, _s, n) => n === 1 ? callTool("end_call", { message: goodbye }, "e1") : say("Yes?"));
    await onCall({ brain }, async (retell) => {
      retell.ask(1, [user("bye")]);
      await retell.reply(1);
      const interrupted = [agent("Thanks for calling Sunrise Dental, goodbye"), user("no wait")];
      retell.ask(2, [], { transcript_with_tool_calls: [user("bye"), ...woven(retell.frames), ...interrupted] });
      const { text, frames } = await retell.reply(2);
      assert.equal(text, "Yes?");
      assert.ok(frames.every((f) => f.end_call === undefined));
    });
  });

  test("an action asked for beside another tool waits until the model has heard the other result", async () => {
    const brain = scripted(async function* (req, _s, n) {
      if (n === 1) {
        yield* callTool("check_availability", { date: "2031-03-05" }, "a1");
        yield* callTool("end_call", { message: "Bye!" }, "a2");
      } else if (n === 2) {
        const results = req.messages.filter((m) => m.role === "tool_result") as { content: string }[];
        assert.match(results[0].content, /open_times/);
        assert.match(results[1].content, /not done yet/);
        yield* say("Wednesday has four times. ");
        yield* callTool("end_call", { message: "Bye!" }, "a3");
      }
    });
    await onCall({ brain }, async (retell) => {
      retell.ask(1, [user("what's free Wednesday? then bye")]);
      const { text, frames } = await retell.reply(1);
      assert.equal(text, "Wednesday has four times. Bye!");
      assert.equal(frames.at(-1)!.end_call, true);
    });
  });

  test("a caller who says more than a few words over the goodbye gets a real answer", async () => {
    const brain = scripted((_r, _s, n) =>
      n === 1 ? callTool("end_call", { message: goodbye }, "e1") : say("Of course, go ahead.")
    );
    await onCall({ brain }, async (retell) => {
      retell.ask(1, [user("bye")]);
      await retell.reply(1);
      const interrupted = [
        agent("Thanks for calling Sunrise Dental"),
        user("wait, I have one more question about billing"),
      ];
      retell.ask(2, [], { transcript_with_tool_calls: [user("bye"), ...woven(retell.frames), ...interrupted] });
      const { text, frames } = await retell.reply(2);
      assert.equal(text, "Of course, go ahead.");
      assert.ok(frames.every((f) => f.end_call === undefined));
    });
  });

  test("press_digit sends digit_to_press", async () => {
    const brain = scripted(() => callTool("press_digit", { digits: "2#" }));
    await onCall({ brain }, async (retell) => {
      retell.ask(1, [user("For appointments, press 2 then hash.")]);
      const { frames } = await retell.reply(1);
      assert.equal(frames.at(-1)!.digit_to_press, "2#");
      assert.equal(frames.at(-1)!.content_complete, true);
    });
  });
});

describe("provider fallback", () => {
  test("a primary that misses the first-token deadline is retried once on the fallback", async () => {
    const primary = scripted(async function* () {
      await new Promise(() => {}); // hangs forever
      yield* say();
    });
    const fallback = scripted(() => say("Backup here."));
    fallback.provider = "backup";
    const logs = await captureLogs(() =>
      onCall({ brain: primary, fallback, config: testConfig({ firstTokenTimeoutMs: 150 }) }, async (retell) => {
        retell.ask(1, [user("hello")]);
        assert.equal((await retell.reply(1)).text, "Backup here.");
      })
    );
    const turn = logs.find((l) => l.event === "turn")!;
    assert.equal(turn.provider, "backup");
    assert.equal(turn.fallback, true);
    assert.equal(turn.outcome, "completed");
  });

  test("when the fallback fails too, the apology is spoken once", async () => {
    const failing = (name: string) => {
      const brain = scripted(async function* () {
        yield* say();
        throw new Error(`${name} down`);
      });
      brain.provider = name;
      return brain;
    };
    await onCall({ brain: failing("one"), fallback: failing("two") }, async (retell) => {
      retell.ask(1, [user("hello")]);
      assert.equal((await retell.reply(1)).text, PERSONA.apology);
    });
  });

  test("FALLBACK_PROVIDER is checked at startup", () => {
    const config = loadConfig({ OPENAI_API_KEY: "a", ANTHROPIC_API_KEY: "b", FALLBACK_PROVIDER: "anthropic" });
    assert.deepEqual(config.fallback, { provider: "anthropic", model: "claude-haiku-4-5" });
    assert.throws(() => loadConfig({ OPENAI_API_KEY: "a", FALLBACK_PROVIDER: "openai" }), /must differ/);
    assert.throws(
      () => loadConfig({ OPENAI_API_KEY: "a", FALLBACK_PROVIDER: "anthropic" }),
      /ANTHROPIC_API_KEY is not set/,
    );
    assert.throws(() => loadConfig({ FALLBACK_PROVIDER: "nope" }), /FALLBACK_PROVIDER must be one of/);
  });
});

describe("persona agent settings and tool memory", () => {
  test("update_agent follows config and the greeting when the persona sets agent settings", async () => {
    const agentSettings = {
      responsiveness: 0.5,
      interruption_sensitivity: 0.3,
      reminder_trigger_ms: 8000,
      reminder_max_count: 2,
    };
    await withServer({ persona: { ...testPersona, agentSettings } }, async (port) => {
      const retell = await Retell.connect(port);
      assert.equal((await retell.next()).response_type, "config");
      assert.equal((await retell.next()).response_id, 0);
      assert.deepEqual(await retell.next(), { response_type: "update_agent", agent_config: agentSettings });
      retell.close();
    });
  });

  test("a tool result from turn 1 reaches the model in turn 3, after a reconnect", async () => {
    const brain = scripted((_req, _s, n) => {
      if (n === 1) return callTool("check_availability", { date: "2031-03-04" }, "call_avail");
      return say(n === 2 ? "Nine or half past ten." : "Half past ten it is.");
    });
    await withServer({ brain }, async (port) => {
      const first = await Retell.connect(port, "/llm-websocket/memory");
      await first.opened();
      const turn1 = [user("what's free on the 8th?")];
      first.ask(1, turn1);
      await first.reply(1);
      const tools = woven(first.frames);
      first.ws.close(3000);
      const second = await Retell.connect(port, "/llm-websocket/memory");
      await second.opened();
      const history = [...turn1, ...tools, agent("Nine or half past ten."), user("hmm"), agent("Any preference?")];
      second.ask(3, [], { transcript_with_tool_calls: [...history, user("half past ten")] });
      assert.equal((await second.reply(3)).text, "Half past ten it is.");
      const seen = brain.requests[2].messages;
      const result = seen.find((m) => m.role === "tool_result")!;
      assert.equal(result.id, "call_avail");
      assert.deepEqual(JSON.parse((result as { content: string }).content).open_times.slice(0, 2), ["09:00", "10:30"]);
      second.close();
    });
  });
});

describe("provider fallback through the real SDKs", () => {
  const claudeText = (text: string) => [
    claudeEvent("message_start", {
      message: {
        id: "m",
        type: "message",
        role: "assistant",
        model: "c",
        content: [],
        stop_reason: null,
        stop_sequence: null,
        usage: { input_tokens: 1, output_tokens: 1 },
      },
    }),
    claudeEvent("content_block_start", { index: 0, content_block: { type: "text", text: "" } }),
    claudeEvent("content_block_delta", { index: 0, delta: { type: "text_delta", text } }),
    claudeEvent("content_block_stop", { index: 0 }),
    claudeEvent("message_delta", {
      delta: { stop_reason: "end_turn", stop_sequence: null },
      usage: { output_tokens: 2 },
    }),
    claudeEvent("message_stop"),
  ];

  for (const primary of ["openai", "anthropic"] as const) {
    test(`${primary} answering HTTP 500 falls back to the other provider in the same turn`, async () => {
      const broken = await fakeProvider((res) => {
        res.writeHead(500, { "content-type": "application/json" });
        res.end(JSON.stringify({ error: { type: "api_error", message: "down" }, type: "error" }));
      });
      const healthy = await fakeProvider((res) =>
        primary === "openai"
          ? stream(res, claudeText("Claude here."))
          : stream(res, [openaiChunk({ content: "GPT here." }), "data: [DONE]\n\n"])
      );
      const [openaiUrl, claudeUrl] = primary === "openai"
        ? [broken.baseUrl, healthy.baseUrl]
        : [healthy.baseUrl, broken.baseUrl];
      const config = loadConfig({
        LLM_PROVIDER: primary,
        FALLBACK_PROVIDER: primary === "openai" ? "anthropic" : "openai",
        OPENAI_API_KEY: "sk-test",
        OPENAI_BASE_URL: `${openaiUrl}/v1`,
        ANTHROPIC_API_KEY: "sk-ant-test",
        ANTHROPIC_BASE_URL: claudeUrl,
      });
      try {
        const logs = await captureLogs(() =>
          onCall({ config: testConfig(config) }, async (retell) => {
            retell.ask(1, [user("hello")]);
            assert.equal((await retell.reply(1, 5000)).text, primary === "openai" ? "Claude here." : "GPT here.");
          })
        );
        assert.ok(broken.requests.length >= 1);
        assert.equal(healthy.requests.length, 1);
        const turn = logs.find((l) => l.event === "turn")!;
        assert.equal(turn.provider, primary === "openai" ? "anthropic" : "openai");
        assert.equal(turn.fallback, true);
      } finally {
        await broken.close();
        await healthy.close();
      }
    });
  }
});

// Each turn posts to the request the SDK defines (captured once), with plain fetch; a request
// that fails is made again through the SDK's own path.
describe("the request of a turn", () => {
  const openaiText = (text: string) => [openaiChunk({ content: text }, "stop"), "data: [DONE]\n\n"];
  const claudeText = (text: string) => [
    claudeEvent("content_block_start", { index: 0, content_block: { type: "text", text: "" } }),
    claudeEvent("content_block_delta", { index: 0, delta: { type: "text_delta", text } }),
    claudeEvent("message_stop"),
  ];
  // Each provider's error body, and the error its SDK makes of it (Anthropic's quotes the body).
  const openaiError = (message: string) => ({ error: { message, type: "invalid_request_error" } });
  const claudeError = (message: string) => ({ type: "error", error: { type: "invalid_request_error", message } });
  const setups = {
    openai: {
      config: openaiConfig,
      text: openaiText,
      path: "/v1/chat/completions",
      agent: /^OpenAI\/JS /,
      error: openaiError,
      sdkError: (status: number, message: string) => `${status} ${message}`,
    },
    anthropic: {
      config: claudeConfig,
      text: claudeText,
      path: "/v1/messages",
      agent: /^Anthropic\/JS /,
      error: claudeError,
      sdkError: (status: number, message: string) => `${status} ${JSON.stringify(claudeError(message))}`,
    },
  };

  for (const [provider, setup] of Object.entries(setups)) {
    /** Runs `talk` on one call to a server whose provider is `fake`; returns the log lines. */
    const oneCall = (fake: FakeProvider, talk: (retell: Retell) => Promise<void>) =>
      captureLogs(() =>
        onCall({ config: setup.config(fake) }, async (retell) => {
          await talk(retell);
        })
      );
    test(`${provider}: every turn sends the SDK's own request (but its telemetry), once`, async () => {
      const fake = await fakeProvider((res, _body, n) => stream(res, setup.text(`Reply ${n}.`)));
      try {
        const logs = await oneCall(fake, async (retell) => {
          retell.ask(1, [user("hello")]);
          assert.equal((await retell.reply(1)).text, "Reply 1.");
          retell.ask(2, [user("hello"), agent("Reply 1."), user("and again")]);
          assert.equal((await retell.reply(2)).text, "Reply 2.");
        });
        assert.equal(fake.requests.length, 2);
        for (const { url, headers } of fake.requests) {
          assert.equal(url, setup.path);
          assert.match(String(headers["user-agent"]), setup.agent);
          // The SDK's telemetry headers stay out of the turns' requests.
          assert.deepEqual(Object.keys(headers).filter((name) => name.startsWith("x-stainless")), []);
          assert.equal(headers["content-type"], "application/json");
          if (provider === "anthropic") assert.ok(headers["anthropic-version"]);
        }
        const same = ({ "content-length": _, ...headers }: http.IncomingHttpHeaders) => headers;
        assert.deepEqual(same(fake.requests[1].headers), same(fake.requests[0].headers));
        assert.equal(fake.requests[1].body.stream, true);
        assert.ok(!logs.some((l) => l.event === "provider_retry"));
      } finally {
        await fake.close();
      }
    });

    for (const failure of ["503", "dropped connection"]) {
      test(`${provider}: a request that fails (${failure}) is made again through the SDK`, async () => {
        const fake = await fakeProvider((res, _body, n) => {
          if (n > 1) return stream(res, setup.text("Here I am."));
          if (failure === "503") {
            res.writeHead(503, { "content-type": "application/json" });
            res.end(JSON.stringify({ error: { message: "overloaded", type: "overloaded_error" } }));
          } else res.socket?.destroy();
        });
        try {
          const logs = await oneCall(fake, async (retell) => {
            retell.ask(1, [user("hello")]);
            const { text, frames } = await retell.reply(1, 5000);
            assert.equal(text, "Here I am.");
            assert.equal(frames.filter((f) => f.content_complete).length, 1);
          });
          assert.equal(fake.requests.length, 2);
          assert.deepEqual(fake.requests[1].body, fake.requests[0].body);
          const retry = logs.find((l) => l.event === "provider_retry");
          assert.equal(retry?.provider, provider);
          if (failure === "503") assert.equal(retry?.error, "HTTP 503");
          assert.ok(!logs.some((l) => l.event === "turn_failed"));
        } finally {
          await fake.close();
        }
      });
    }

    for (const [status, headers] of [[400, {}], [500, { "x-should-retry": "false" }]] as const) {
      test(`${provider}: an HTTP ${status} the SDK would not retry is not made again, and is spoken as the apology`, async () => {
        const fake = await fakeProvider((res) => {
          res.writeHead(status, { "content-type": "application/json", ...headers });
          res.end(JSON.stringify(setup.error("bad model name")));
        });
        try {
          const logs = await oneCall(fake, async (retell) => {
            retell.ask(1, [user("hello")]);
            assert.equal((await retell.reply(1, 5000)).text, PERSONA.apology);
          });
          assert.equal(fake.requests.length, 1);
          assert.ok(!logs.some((l) => l.event === "provider_retry"));
          // The SDK's own error, as its create() would have thrown it.
          assert.equal(logs.find((l) => l.event === "turn_failed")?.error, setup.sdkError(status, "bad model name"));
        } finally {
          await fake.close();
        }
      });
    }

    test(`${provider}: a retried request that fails again ends in the SDK's error, after two requests`, async () => {
      const fake = await fakeProvider((res) => {
        res.writeHead(429, { "content-type": "application/json", "retry-after": "0" });
        res.end(JSON.stringify(setup.error("slow down")));
      });
      try {
        const logs = await oneCall(fake, async (retell) => {
          retell.ask(1, [user("hello")]);
          assert.equal((await retell.reply(1, 5000)).text, PERSONA.apology);
        });
        assert.equal(fake.requests.length, 2);
        assert.equal(logs.filter((l) => l.event === "provider_retry").length, 1);
        assert.equal(logs.find((l) => l.event === "turn_failed")?.error, setup.sdkError(429, "slow down"));
      } finally {
        await fake.close();
      }
    });

    test(`${provider}: a request superseded before its answer is not made again`, async () => {
      const fake = await fakeProvider((res, _body, n) => n === 1 ? undefined : stream(res, setup.text("Second.")));
      try {
        const logs = await oneCall(fake, async (retell) => {
          retell.ask(1, [user("hello")]);
          while (fake.requests.length < 1) await sleep(5);
          retell.ask(2, [user("hello there")]);
          assert.equal((await retell.reply(2)).text, "Second.");
          await sleep(100);
        });
        assert.equal(fake.requests.length, 2);
        assert.equal(fake.cancelled[0], 1);
        assert.ok(!logs.some((l) => l.event === "provider_retry"));
      } finally {
        await fake.close();
      }
    });
  }
});

describe("docs", () => {
  const read = (file: string) => readFileSync(new URL(file, import.meta.url), "utf8");

  test("the README's environment table lists exactly the variables of .env.example, in order", () => {
    const example = [...read("./.env.example").matchAll(/^([A-Z][A-Z0-9_]+)=/gm)].map((m) => m[1]);
    const table = [...read("./README.md").matchAll(/^\| `([A-Z][A-Z0-9_]+)` +\|/gm)].map((m) => m[1]);
    assert.deepEqual(table, example);
    const used = new Set([...read("./main.ts").matchAll(/"([A-Z][A-Z0-9]+_[A-Z0-9_]+|PORT)"/g)].map((m) => m[1]));
    for (const name of used) assert.ok(example.includes(name), `${name} is read in main.ts but not documented`);
  });

  test("the README's Make it yours headings match the section markers in main.ts", () => {
    const markers = [...read("./main.ts").matchAll(/^\/\/ (\d)\. (\w+)/gm)].map((m) => `${m[1]}. ${m[2]}`);
    const headings = [...read("./README.md").matchAll(/^### (\d)\. (\w+)/gm)].map((m) => `${m[1]}. ${m[2]}`);
    assert.ok(headings.length >= 3);
    for (const heading of headings) assert.ok(markers.includes(heading), `${heading} has no marker in main.ts`);
  });
});
