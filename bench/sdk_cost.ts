// What one streamed request costs three ways, against the zero-latency fake provider in the same
// process: plain fetch (the relay's way), the server's brain (the request the SDK defines, sent
// with fetch, read by the server's parser), and the SDK's own `create()` path (what the server
// used before, read by the same small parser as fetch). The README's performance notes cite it.
//
//   deno run -A bench/sdk_cost.ts [--n 3000] [--reps 3]
//
// Each measurement reports the mean time per request and the p99 (requests go one at a time,
// so a slow one is slow by its own path or by a GC pause it ran into). On Deno also bytes
// allocated and promoted (survived a young GC) per request, read from V8's --trace-gc-nvp
// between two forced full GCs.
// Measurements alternate fetch, brain, sdk, fetch, brain, sdk, ... and each brain and sdk figure
// is a ratio to the fetch run next to it. One child process per measurement: `--child <way> <provider> <n>`.
import process from "node:process";
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { parseArgs } from "node:util";
import { startFakeProvider } from "./fake_provider.ts";
import type OpenAIClient from "openai";
import type AnthropicClient from "@anthropic-ai/sdk";

type Way = "fetch" | "brain" | "sdk";
type Provider = "openai" | "anthropic";
const WAYS: Way[] = ["brain", "sdk", "fetch"];
const isDeno = "Deno" in globalThis;
const argv = process.argv.slice(2);

if (argv[0] === "--child") {
  const [way, provider, n] = [argv[1] as Way, argv[2] as Provider, Number(argv[3])];
  console.error(JSON.stringify(await child(way, provider, n))); // stdout carries V8's GC trace
  process.exit(0);
} else if (import.meta.main) {
  parent();
}

/** One measurement: `n` requests one after another, after 300 to warm up. */
async function child(way: Way, provider: Provider, n: number) {
  const fake = await startFakeProvider({ port: 0 });
  const base = `http://127.0.0.1:${fake.port}`;
  Object.assign(process.env, {
    LLM_PROVIDER: provider,
    OPENAI_API_KEY: "sk-bench",
    OPENAI_BASE_URL: `${base}/v1`,
    ANTHROPIC_API_KEY: "sk-ant-bench",
    ANTHROPIC_BASE_URL: base,
  });
  const { createBrain, loadConfig, toMessages } = await import("../main.ts");
  const brain = createBrain(loadConfig(process.env));
  const system = "You are Ava, the front-desk assistant of Sunrise Dental, on a phone call. ".repeat(12);
  const transcript = [
    { role: "agent", content: "Hi Sam! This is Ava at Sunrise Dental. How can I help you today?" },
    { role: "user", content: "Hi, I would like to book a cleaning for next week if you have anything. [t=F:x.1]" },
  ];
  const viaBrain = async () => {
    let text = "";
    const request = { system, messages: toMessages(transcript), tools: [] };
    for await (const event of brain.stream(request, new AbortController().signal)) {
      if (event.type === "text") text += event.text;
    }
    return text;
  };
  const messages = transcript.map((t) => ({
    role: t.role === "agent" ? "assistant" as const : "user" as const,
    content: t.content,
  }));
  const anthropic = provider === "anthropic";
  const body = anthropic ? { model: "claude-haiku-4-5", max_tokens: 1024, stream: true as const, system, messages } : {
    model: "gpt-4.1-mini",
    stream: true as const,
    messages: [{ role: "system" as const, content: system }, ...messages],
  };
  const { default: OpenAI } = await import("openai");
  const { default: Anthropic } = await import("@anthropic-ai/sdk");
  const openai = new OpenAI({ apiKey: "sk-bench", baseURL: `${base}/v1`, maxRetries: 1 });
  const claude = new Anthropic({ apiKey: "sk-ant-bench", baseURL: base, maxRetries: 1 });
  const viaFetch = () =>
    read(fetch(anthropic ? `${base}/v1/messages` : `${base}/v1/chat/completions`, {
      method: "POST",
      headers: anthropic
        ? { "content-type": "application/json", "x-api-key": "sk-ant-bench", "anthropic-version": "2023-06-01" }
        : { "content-type": "application/json", authorization: "Bearer sk-bench" },
      body: JSON.stringify(body),
      signal: new AbortController().signal,
    }));
  const viaSdk = () => {
    const signal = new AbortController().signal;
    return read(
      anthropic
        ? claude.messages.create(body as AnthropicClient.MessageCreateParamsStreaming, { signal }).asResponse()
        : openai.chat.completions.create(body as OpenAIClient.ChatCompletionCreateParamsStreaming, { signal })
          .asResponse(),
    );
  };
  const read = async (response: Promise<Response>) => {
    const res = await response;
    const decoder = new TextDecoder();
    let buffer = "";
    let text = "";
    for await (const bytes of res.body!) {
      buffer += decoder.decode(bytes, { stream: true });
      for (let end = buffer.indexOf("\n\n"); end >= 0; end = buffer.indexOf("\n\n")) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const at = event.indexOf("data:");
        const data = at < 0 ? "[DONE]" : event.slice(at + 5).trim();
        if (data === "[DONE]") continue;
        const json = JSON.parse(data);
        text += (anthropic ? json.delta?.text : json.choices?.[0]?.delta?.content) ?? "";
      }
    }
    return text;
  };
  const run = { fetch: viaFetch, brain: viaBrain, sdk: viaSdk }[way];
  for (let i = 0; i < 300; i++) await run();
  const gc = (globalThis as { gc?: () => void }).gc;
  gc?.(); // with --expose-gc: a full GC on each side of the measured loop marks it in the GC trace
  const times: number[] = [];
  const t0 = performance.now();
  for (let i = 0; i < n; i++) {
    const start = performance.now();
    await run();
    times.push(performance.now() - start);
  }
  const msPerRequest = (performance.now() - t0) / n;
  times.sort((a, b) => a - b);
  const p99Ms = times[Math.ceil(n * 0.99) - 1];
  for (let i = 0; i < 4; i++) gc?.(); // the later ones push the trace of the first out of stdio's buffer
  await fake.close();
  return { way, provider, n, msPerRequest, p99Ms };
}

/** The GC trace between the two forced GCs: bytes allocated and promoted in between. */
export function readTrace(stdout: string) {
  const events = [...stdout.matchAll(/GC: (\{.*?\})\s*$/gm)].map((m) => JSON.parse(m[1]));
  const marks = events.map((e, i) => (e.reason === "testing" ? i : -1)).filter((i) => i >= 0);
  if (marks.length < 2) return { allocated: NaN, promoted: NaN, pauseMs: NaN };
  const inside = events.slice(marks[0] + 1, marks[1] + 1);
  const sum = (key: string) => inside.reduce((s, e) => s + (Number(e[key]) || 0), 0);
  return {
    allocated: sum("allocated"),
    promoted: inside.filter((e) => e.gc === "s").reduce((s, e) => s + (Number(e.promoted) || 0), 0),
    pauseMs: inside.filter((e) => e.reason !== "testing").reduce((s, e) => s + e.pause, 0),
  };
}

function parent() {
  const { values } = parseArgs({
    args: argv,
    options: { n: { type: "string", default: "3000" }, reps: { type: "string", default: "3" } },
  });
  const n = Number(values.n);
  const reps = Number(values.reps);
  const local = new URL("../.tools/node_modules/.bin/bun", import.meta.url).pathname;
  const bunBin = existsSync(local) ? local : "bun";
  const hasBun = spawnSync(bunBin, ["--version"]).status === 0;
  const runtimes = isDeno
    ? [
      { name: "deno", cmd: [process.execPath, "run", "-A", "--v8-flags=--trace-gc-nvp,--expose-gc"] },
      ...(hasBun ? [{ name: "bun", cmd: [bunBin, "run"] }] : []),
    ]
    : [{ name: "bun", cmd: [process.execPath, "run"] }];
  const file = new URL(import.meta.url).pathname;
  const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];
  const rows: string[][] = [];
  for (const runtime of runtimes) {
    for (const provider of ["openai", "anthropic"] as Provider[]) {
      type Got = { ms: number[]; p99: number[]; kib: number[]; promoted: number[] };
      const empty = (): Got => ({ ms: [], p99: [], kib: [], promoted: [] });
      const got: Record<Way, Got> = { brain: empty(), sdk: empty(), fetch: empty() };
      for (let rep = 0; rep < reps; rep++) {
        for (const way of WAYS) {
          const [bin, ...args] = runtime.cmd;
          const out = spawnSync(bin, [...args, file, "--child", way, provider, String(n)], {
            encoding: "utf8",
            maxBuffer: 256 * 1024 * 1024,
          });
          const line = out.stderr.split("\n").find((l) => l.startsWith('{"way"'));
          if (!line) throw new Error(`${runtime.name} ${way} ${provider} failed: ${out.stderr.slice(-500)}`);
          const trace = readTrace(out.stdout);
          const result = JSON.parse(line);
          got[way].ms.push(result.msPerRequest);
          got[way].p99.push(result.p99Ms);
          got[way].kib.push(trace.allocated / n / 1024);
          got[way].promoted.push(trace.promoted / n / 1024);
        }
      }
      const f = (x: number, d = 2) => (Number.isFinite(x) ? x.toFixed(d) : "–");
      // Each cell: brain / sdk / fetch, then the brain's and the SDK's ratio to the fetch run next to them.
      const cell = (key: keyof Got, d: number) => {
        const ratio = (way: Way) => f(med(got[way][key].map((x, i) => x / got.fetch[key][i])));
        return `${WAYS.map((w) => f(med(got[w][key]), d)).join(" / ")} (${ratio("brain")}×, ${ratio("sdk")}×)`;
      };
      rows.push([runtime.name, provider, cell("ms", 3), cell("p99", 2), cell("kib", 0), cell("promoted", 1)]);
      console.error(`  ${rows.at(-1)!.join("  ")}`);
    }
  }
  const header = [
    "runtime",
    "provider",
    "ms/request brain / sdk / fetch",
    "p99 ms",
    "KiB allocated",
    "KiB promoted",
  ];
  const table = [header, header.map(() => "---"), ...rows].map((r) => `| ${r.join(" | ")} |`).join("\n");
  console.log(`\n${new Date().toISOString()}, ${n} requests × ${reps} repetitions, medians:\n\n${table}`);
}
