// Checks that the benchmark measures what it says: the fake provider's two formats stream
// through the real SDKs (the server) and through plain fetch (the relay), a superseded
// upstream is seen closing, the load client completes turns, and its percentiles are right.
// No timings are asserted. Runs under `deno test -A` and `bun test`.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import process from "node:process";
import { listen, loadConfig } from "../main.ts";
import { type FakeProvider, readTag, REPLY_CHUNKS, REPLY_TEXT, startFakeProvider } from "./fake_provider.ts";
import { median, percentile, runJob, summarize, transcriptOf } from "./load.ts";
import { startRelay } from "./relay.ts";
import { readTrace } from "./sdk_cost.ts";
import { spawnSync } from "node:child_process";

type Frame = Record<string, any>;

/** A minimal Retell: connects, sends call_details, collects frames. */
async function connect(port: number) {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/llm-websocket/test_${Math.random().toString(36).slice(2)}`);
  const frames: Frame[] = [];
  let wake = () => {};
  ws.onmessage = (e) => {
    frames.push(JSON.parse(e.data as string));
    wake();
  };
  await new Promise((resolve, reject) => (ws.onopen = resolve, ws.onerror = reject));
  ws.send(JSON.stringify({ interaction_type: "call_details", call: { retell_llm_dynamic_variables: {} } }));
  const until = async (match: (f: Frame) => boolean) => {
    while (!frames.some(match)) await new Promise<void>((resolve) => wake = resolve);
    return frames.find(match)!;
  };
  const ask = (response_id: number, content: string) =>
    ws.send(JSON.stringify({
      interaction_type: "response_required",
      response_id,
      transcript: [{ role: "agent", content: "Hi!" }, { role: "user", content }],
    }));
  return { ws, frames, until, ask };
}

/** One turn: the reply's text, in how many non-empty frames. */
async function oneTurn(port: number) {
  const call = await connect(port);
  await call.until((f) => f.response_type === "response" && f.response_id === 0);
  call.ask(1, "Is Monday free? [t=F:x.1]");
  await call.until((f) => f.response_id === 1 && f.content_complete);
  const parts = call.frames.filter((f) => f.response_id === 1 && f.content).map((f) => f.content);
  call.ws.close(1000);
  return { text: parts.join(""), frames: parts.length };
}

/** A held turn superseded by a newer one: the fake sees the older upstream closed. */
async function supersededTurn(port: number, fake: FakeProvider, key: string) {
  const call = await connect(port);
  await call.until((f) => f.response_id === 0);
  call.ask(1, `Hello [t=H:${key}]`);
  await call.until((f) => f.response_id === 1 && f.content);
  call.ask(2, "Never mind [t=F:y.2]");
  const closedAt = await fake.closedAt(key, 5000);
  await call.until((f) => f.response_id === 2 && f.content_complete);
  call.ws.close(1000);
  return closedAt;
}

for (const provider of ["openai", "anthropic"] as const) {
  describe(`${provider} format through the fake provider`, () => {
    let fake: FakeProvider;
    let server: { port: number; close(): Promise<void> };
    let relay: { port: number; close(): Promise<void> };
    before(async () => {
      fake = await startFakeProvider({ keepLastBody: true });
      const baseUrl = provider === "openai" ? fake.openaiBaseUrl : fake.anthropicBaseUrl;
      server = listen(0, {
        config: loadConfig(
          provider === "openai"
            ? { LLM_PROVIDER: "openai", OPENAI_API_KEY: "sk-test", OPENAI_BASE_URL: baseUrl }
            : { LLM_PROVIDER: "anthropic", ANTHROPIC_API_KEY: "sk-ant-test", ANTHROPIC_BASE_URL: baseUrl },
        ),
      });
      relay = startRelay({ provider, baseUrl });
    });
    after(async () => {
      await server.close();
      await relay.close();
      await fake.close();
    });

    test("the server streams the whole fixed reply through the real SDK", async () => {
      const before = fake.stats()[provider];
      const { text, frames } = await oneTurn(server.port);
      assert.equal(text, REPLY_TEXT);
      // Deltas that arrive in one network read go out as one frame, so there may be fewer.
      assert.ok(frames >= 1 && frames <= REPLY_CHUNKS, `${frames} frames`);
      assert.equal(fake.stats()[provider], before + 1);
      assert.ok(Array.isArray(fake.lastBody?.messages));
    });

    test("the relay streams the same reply with plain fetch", async () => {
      const { text, frames } = await oneTurn(relay.port);
      assert.equal(text, REPLY_TEXT);
      assert.equal(frames, REPLY_CHUNKS);
      const last = (fake.lastBody?.messages as { content: string }[]).at(-1);
      assert.match(last?.content ?? "", /Is Monday free/);
    });

    test("a superseded upstream stream is seen closing, for the server and the relay", async () => {
      assert.ok((await supersededTurn(server.port, fake, `${provider}.server`)) > 0);
      assert.ok((await supersededTurn(relay.port, fake, `${provider}.relay`)) > 0);
    });

    test("the load client completes turns and supersedes through the fake", async () => {
      const saturation = await runJob({
        shape: "saturation",
        url: `ws://127.0.0.1:${relay.port}/llm-websocket/`,
        pid: process.pid,
        k: 2,
        windowMs: 100,
        warmMs: 20,
      }, fake) as { turns: number };
      assert.ok(saturation.turns > 0);
      const supersede = await runJob({
        shape: "supersede",
        url: `ws://127.0.0.1:${server.port}/llm-websocket/`,
        pid: process.pid,
        n: 3,
      }, fake) as { failures: number; latency: { n: number } };
      assert.deepEqual([supersede.failures, supersede.latency.n], [0, 3]);
    });

    test("realistic windows can share their calls, which grow their transcripts, until released", async () => {
      const url = `ws://127.0.0.1:${relay.port}/llm-websocket/`;
      const window = {
        shape: "realistic",
        url,
        pid: process.pid,
        k: 2,
        windowMs: 150,
        periodMs: 100,
        keep: true,
      } as const;
      type Result = { fresh: boolean; completed: number };
      // Bytes per provider request over one window.
      const perRequest = async () => {
        const { bytesIn, requests } = fake.stats();
        const result = await runJob(window, fake) as Result;
        const after = fake.stats();
        return { result, bytes: (after.bytesIn - bytesIn) / (after.requests - requests) };
      };
      const first = await perRequest();
      const second = await perRequest();
      assert.deepEqual([first.result.fresh, second.result.fresh], [true, false]);
      assert.ok(first.result.completed > 0 && second.result.completed > 0);
      // The same calls asked again, so each request carried a longer transcript than before.
      assert.ok(second.bytes > first.bytes, `${second.bytes} bytes per request, then ${first.bytes}`);
      assert.deepEqual(await runJob({ shape: "release", url }, fake), { closed: 2 });
      assert.deepEqual(await runJob({ shape: "release", url }, fake), { closed: 0 });
    });
  });
}

describe("load client arithmetic", () => {
  test("nearest-rank percentiles", () => {
    const hundred = Array.from({ length: 100 }, (_, i) => i + 1);
    assert.equal(percentile(hundred, 50), 50);
    assert.equal(percentile(hundred, 99), 99);
    assert.equal(percentile(hundred, 100), 100);
    assert.equal(percentile(hundred, 0), 1);
    assert.equal(percentile([7], 99), 7);
    assert.equal(percentile([1, 2, 3, 4], 50), 2);
    assert.equal(percentile([1, 2, 3, 4], 99), 4);
    assert.ok(Number.isNaN(percentile([], 50)));
  });

  test("summaries sort their input and medians take the middle", () => {
    const s = summarize([5, 1, 4, 2, 3]);
    assert.deepEqual([s.n, s.p50, s.p99, s.mean, s.max], [5, 3, 5, 3, 5]);
    assert.equal(median([9, 1, 5]), 5);
  });

  test("a long transcript has the asked length and ends with the caller", () => {
    for (const n of [1, 10, 1000]) {
      const items = JSON.parse(`[${transcriptOf(n)}]`);
      assert.equal(items.length, n);
      assert.equal(items.at(-1).role, "user");
    }
  });

  test("requests are tagged by their last marker", () => {
    assert.deepEqual(readTag('{"a":"x [t=F:b1.2]","b":"y [t=H:b1.3]"}'), { mode: "H", key: "b1.3" });
    assert.deepEqual(readTag("{}"), { mode: "F", key: "" });
  });
});

describe("the SDK cost measurement", () => {
  test("times a request through the SDK and through fetch, in a child process on this runtime", () => {
    const args = "Deno" in globalThis ? ["run", "-A"] : ["run"];
    for (const way of ["brain", "sdk", "fetch"]) {
      for (const provider of ["openai", "anthropic"]) {
        const file = new URL("./sdk_cost.ts", import.meta.url).pathname;
        const out = spawnSync(process.execPath, [...args, file, "--child", way, provider, "20"], { encoding: "utf8" });
        const line = out.stderr.split("\n").find((l) => l.startsWith('{"way"'));
        assert.ok(line, `no result from ${way} ${provider}: ${out.stderr.slice(-300)}`);
        const result = JSON.parse(line);
        assert.deepEqual([result.way, result.provider, result.n], [way, provider, 20]);
        assert.ok(result.msPerRequest > 0 && result.msPerRequest < 1000);
        assert.ok(result.p99Ms >= result.msPerRequest, "with 20 requests the p99 is the slowest one"); // ≥ the mean
      }
    }
  });

  test("reads bytes allocated and promoted between the two forced GCs of V8's trace", () => {
    const gc = (o: Record<string, unknown>) => `[1:0x1:0]   5 ms: GC: ${JSON.stringify(o)}`;
    const trace = [
      gc({ pause: 1, gc: "s", reason: "allocation failure", allocated: 999, promoted: 9 }),
      gc({ pause: 2, gc: "mc", reason: "testing", allocated: 100, promoted: 0 }),
      "unrelated line",
      gc({ pause: 3, gc: "s", reason: "allocation failure", allocated: 1000, promoted: 40 }),
      gc({ pause: 4, gc: "mc", reason: "allocation failure", allocated: 500, promoted: 7 }),
      gc({ pause: 5, gc: "mc", reason: "testing", allocated: 200, promoted: 0 }),
      gc({ pause: 6, gc: "s", reason: "allocation failure", allocated: 5000, promoted: 50 }),
    ].join("\n");
    assert.deepEqual(readTrace(trace), { allocated: 1700, promoted: 40, pauseMs: 7 });
  });
});
