// Running as a fleet, with real processes and a real Redis (Debian's redis-server, started
// here on a free port): two instances share one store, one drains on SIGTERM mid-call, the
// call moves to the other and a re-asked booking is not booked twice; a store outage is
// spoken; /metrics counts the turns. Deno KV is tested on Deno. Runs under deno and bun test.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import process from "node:process";
import net from "node:net";
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { listen, loadConfig } from "./main.ts";
import { RetellCall } from "./dev/retell.ts";

const isBun = "Bun" in globalThis;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const hasRedis = spawnSync("redis-server", ["--version"]).status === 0;
const why = hasRedis ? false : "redis-server is not installed (apt-get install redis-server)";

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const server = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

async function until<T>(probe: () => Promise<T | undefined> | T | undefined, ms = 8000): Promise<T> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    try {
      const value = await probe();
      if (value !== undefined) return value;
    } catch { /* not yet */ }
    await sleep(50);
  }
  throw new Error("timed out waiting");
}

/** One server instance as its own process, the way a deploy runs it. */
class Instance {
  output = "";
  exited: Promise<number | null>;
  private constructor(readonly port: number, readonly child: ChildProcess) {
    child.stdout!.on("data", (d) => this.output += d);
    child.stderr!.on("data", (d) => this.output += d);
    this.exited = new Promise((resolve) => child.on("close", (code) => resolve(code)));
  }

  static async start(env: Record<string, string>) {
    const port = await freePort();
    const clean = { ...process.env } as Record<string, string>;
    for (const key of Object.keys(clean)) {
      if (/^(OPENAI|ANTHROPIC|LLM|AUTH|FALLBACK|STATE|DRAIN)/.test(key)) delete clean[key];
    }
    const args = isBun ? ["run", "main.ts"] : ["run", "-A", "main.ts"];
    const child = spawn(process.execPath, args, {
      cwd: new URL(".", import.meta.url).pathname,
      env: { ...clean, NO_COLOR: "1", LLM_PROVIDER: "demo", PORT: String(port), ...env },
    });
    const instance = new Instance(port, child);
    await until(async () => (await fetch(`${instance.http}/health`)).status === 200 || undefined);
    return instance;
  }

  get http() {
    return `http://127.0.0.1:${this.port}`;
  }

  get ws() {
    return `ws://127.0.0.1:${this.port}/llm-websocket`;
  }

  stop() {
    this.child.kill("SIGKILL");
    return this.exited;
  }
}

describe("a fleet sharing one Redis", { skip: why }, () => {
  let redis: ChildProcess;
  let redisUrl: string;
  let a: Instance;
  let b: Instance;

  before(async () => {
    const port = await freePort();
    redis = spawn("redis-server", ["--port", String(port), "--save", "", "--appendonly", "no"]);
    redisUrl = `redis://127.0.0.1:${port}`;
    const env = { STATE_URL: redisUrl, DRAIN_TIMEOUT_MS: "1500", FILLER_AFTER_MS: "5000" };
    [a, b] = await Promise.all([Instance.start(env), Instance.start(env)]);
  });

  after(async () => {
    await Promise.all([a?.stop(), b?.stop()]);
    redis?.kill("SIGKILL");
  });

  test("a call drained off instance A continues on B, and a re-asked booking is not booked twice", {
    timeout: 20_000,
  }, async () => {
    let dropped: number | undefined;
    const call = await RetellCall.connect(a.ws, { callId: "fleet_call", onClose: (code) => dropped = code });
    const booking = "Please book 2031-03-10 at 10:30, my name is Ana Ruiz.";
    const booked = await call.say(booking);
    const confirmation = booked.text.match(/SD-\d{4}/)?.[0];
    assert.ok(confirmation, booked.text);

    // A deploy stops A: it reports draining and refuses new calls, but this call goes on.
    a.child.kill("SIGTERM");
    await until(async () => (await fetch(`${a.http}/health`)).status === 503 || undefined);
    const health = await (await fetch(`${a.http}/health`)).json();
    assert.equal(health.status, "draining");
    assert.equal(health.live_calls, 1);
    await assert.rejects(RetellCall.connect(a.ws, { callId: "new_call" }));
    const stillServed = await call.say("Is 2031-03-11 free?");
    assert.match(stillServed.text, /2031-03-11/);

    // After DRAIN_TIMEOUT_MS, A exits without a close frame: Retell sees a dropped socket.
    const code = await a.exited;
    // Deno's node:child_process reports a child it sent SIGTERM to as killed by it, even when
    // the child exited by itself; the drain_done line below shows the exit was the drain's.
    assert.ok(code === 0 || (!isBun && code === null), `exit code ${code}`);
    await until(() => dropped);
    assert.notEqual(dropped, 1000, "a close with 1000 would hang the call up");
    assert.match(a.output, /"event":"drain_start".*"live_calls":1/);
    assert.match(a.output, /"event":"drain_done"/);

    // Retell reconnects to B with the whole transcript and asks for the booking again.
    const moved = (await RetellCall.connect(b.ws, { callId: "fleet_call" })).resume(call);
    moved.transcript.push({ role: "user", content: booking });
    moved.woven.push({ role: "user", content: booking });
    const again = await moved.askAgain();
    assert.equal(again.tools[0]?.name, "book_appointment");
    assert.match(again.text, new RegExp(`booked .* ${confirmation}`), "B returns A's booking, not a new one");
    const free = await moved.say("Is 2031-03-10 free?");
    assert.match(free.text, /10:30/, "B's own diary was never written: the booking ran once, on A");
    moved.close();
  });

  test("a store outage during a booking is spoken and the turn completes", { timeout: 15_000 }, async () => {
    const outage = await Instance.start({ STATE_URL: redisUrl });
    try {
      redis.kill("SIGKILL");
      await sleep(200);
      const call = await RetellCall.connect(outage.ws, { callId: "outage_call" });
      const reply = await call.say("Book 2031-03-12 at 09:00, my name is Lee.");
      assert.equal(reply.tools[0]?.successful, false);
      assert.match(reply.tools[0]?.result ?? "", /cannot be done right now/);
      assert.match(reply.text, /Sorry/);
      assert.equal(reply.interrupted, false, "the turn completed");
      assert.match(outage.output, /state_store_down/);
      call.close();
    } finally {
      await outage.stop();
    }
  });

  test("/metrics is Prometheus text and counts the turns made", { timeout: 15_000 }, async () => {
    const res = await fetch(`${b.http}/metrics`);
    assert.equal(res.status, 200);
    const text = await res.text();
    const samples = new Map<string, number>();
    for (const line of text.trim().split("\n")) {
      if (line.startsWith("#")) {
        assert.match(line, /^# TYPE [a-z_]+ (counter|gauge|histogram)$/);
        continue;
      }
      const match = line.match(/^([a-z_]+(?:\{[^}]*\})?) (-?[0-9.e+]+|\+Inf)$/);
      assert.ok(match, `not a Prometheus sample line: ${line}`);
      samples.set(match[1], Number(match[2]));
    }
    const turns = [...samples].filter(([k]) => k.startsWith("retell_turns_total{")).reduce((n, [, v]) => n + v, 0);
    assert.equal(turns, 2, "B answered the re-asked booking and one more turn");
    assert.equal(samples.get('retell_turns_total{outcome="completed"}'), 2);
    assert.equal(samples.get('retell_tool_calls_total{tool="book_appointment",ok="true"}'), 1);
    assert.equal(samples.get("retell_turn_seconds_count"), 2);
    assert.equal(samples.get("retell_live_calls"), 0);
  });
});

describe("a store that is down at start", { skip: why }, () => {
  test("the server still starts, and a booking is refused out loud", { timeout: 15_000 }, async () => {
    const instance = await Instance.start({ STATE_URL: `redis://127.0.0.1:${await freePort()}` });
    try {
      const call = await RetellCall.connect(instance.ws, { callId: "no_store" });
      const reply = await call.say("Book 2031-03-14 at 09:00, my name is Sam.");
      assert.match(reply.tools[0]?.result ?? "", /cannot be done right now/);
      call.close();
    } finally {
      await instance.stop();
    }
  });
});

describe("metrics token", () => {
  test("/metrics needs the token when METRICS_TOKEN is set", async () => {
    const server = listen(0, { config: { ...loadConfig({ LLM_PROVIDER: "demo" }), metricsToken: "m3trics" } });
    try {
      const url = `http://127.0.0.1:${server.port}/metrics`;
      assert.equal((await fetch(url)).status, 401);
      assert.equal((await fetch(url, { headers: { authorization: "Bearer nope" } })).status, 401);
      const basic = { headers: { authorization: "Basic dXNlcjpwYXNz" } }; // another scheme: ?token= still counts
      assert.equal((await fetch(`${url}?token=m3trics`, basic)).status, 200);
      const ok = await fetch(url, { headers: { authorization: "Bearer m3trics" } });
      assert.equal(ok.status, 200);
      assert.match(await ok.text(), /^retell_live_calls 0$/m);
    } finally {
      await server.close();
    }
  });
});

describe("Deno KV", { skip: isBun ? "Deno KV exists only on Deno" : false }, () => {
  test("two instances on one KV race for the same booking and book once", async () => {
    const { openStore } = await import("./fleet.ts");
    const path = `${mkdtempSync(`${tmpdir()}/kv-`)}/state.db`;
    const quiet = () => {};
    const config = { ...loadConfig({ LLM_PROVIDER: "demo" }), logLevel: "warn" as const };
    const [one, two] = [
      listen(0, { config, store: await openStore(path, quiet) }),
      listen(0, { config, store: await openStore(path, quiet) }),
    ];
    try {
      const line = "Book 2031-03-13 at 13:00, my name is Kim.";
      const calls = await Promise.all(
        [one, two].map((s) => RetellCall.connect(`ws://127.0.0.1:${s.port}/llm-websocket`, { callId: "kv_call" })),
      );
      const replies = await Promise.all(calls.map((c) => c.say(line)));
      const codes = replies.map((r) => r.text.match(/SD-\d{4}/)?.[0]);
      assert.ok(codes[0], replies[0].text);
      assert.equal(codes[0], codes[1], "both instances return the one booking");
      calls.forEach((c) => c.close());
    } finally {
      await Promise.all([one.close(), two.close()]);
    }
  });
});

describe("deploy files", () => {
  const read = (file: string) => readFileSync(new URL(file, import.meta.url), "utf8");
  const documented = [...read("./.env.example").matchAll(/^([A-Z][A-Z0-9_]+)=/gm)].map((m) => m[1]);

  test("compose.yaml and the Dockerfile name only files, env vars and ports that exist", () => {
    const compose = read("./compose.yaml");
    const dockerfile = read("./Dockerfile");
    for (const file of [...dockerfile.matchAll(/^COPY (.+) \S+$/gm)].flatMap((m) => m[1].split(" "))) {
      assert.doesNotThrow(() => read(`./${file}`), `the Dockerfile copies ${file}, which does not exist`);
    }
    const agent = compose.slice(compose.indexOf("x-agent:"), compose.indexOf("services:"));
    const envNames = [...agent.matchAll(/^\s+([A-Z][A-Z0-9_]+):/gm)].map((m) => m[1]).filter((n) => n !== "RUNTIME");
    assert.ok(envNames.includes("STATE_URL"));
    for (const name of envNames) assert.ok(documented.includes(name), `${name} is not in .env.example`);
    assert.match(compose, /PORT: "8080"/);
    assert.match(compose, /redis/);
    const proxy = read("./deploy/Caddyfile");
    assert.match(proxy, /agent-a:8080/);
    assert.match(proxy, /agent-b:8080/);
    assert.match(dockerfile, /EXPOSE 8080/);
  });
});
