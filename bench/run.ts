// `deno task bench`: measures the server (main.ts) against the raw relay (bench/relay.ts) on
// Deno and on Bun, with both provider formats, behind a zero-latency fake provider. Every
// measurement runs relay, server, relay, server, ... in the same run, and each server figure
// is reported as a ratio to the relay run next to it.
//
//   deno run -A bench/run.ts [--quick] [--runtime deno,bun] [--provider openai,anthropic]
//                            [--shape idle,realistic,saturation,supersede,long] [--reps N]
//                            [--log-level info] [--no-pin]
//
// Processes: the server under test (pinned to CPU 0), the load client with the fake provider
// in it (bench/load.ts on Bun, pinned to CPU 1), and this orchestrator, which only waits.
// Prints one table, writes it as JSON to bench/results.json and as markdown to
// bench/RESULTS.md.
import { parseArgs } from "node:util";
import { existsSync } from "node:fs";

type Runtime = "deno" | "bun";
type Provider = "openai" | "anthropic";
type Shape = "idle" | "realistic" | "saturation" | "supersede" | "long";
type Target = "relay" | "server";
type Json = Record<string, any>;

const ROOT = new URL("..", import.meta.url).pathname.replace(/\/$/, "");
const SHAPES: Shape[] = ["idle", "realistic", "saturation", "supersede", "long"];

const { values: flags } = parseArgs({
  args: Deno.args,
  options: {
    quick: { type: "boolean", default: false },
    runtime: { type: "string", default: "deno,bun" },
    provider: { type: "string", default: "openai,anthropic" },
    shape: { type: "string", default: SHAPES.join(",") },
    reps: { type: "string" },
    "log-level": { type: "string", default: "info" },
    "no-pin": { type: "boolean", default: false },
    out: { type: "string", default: `${ROOT}/bench/results.json` },
    help: { type: "boolean", default: false },
  },
});
if (flags.help) {
  console.log(Deno.readTextFileSync(new URL(import.meta.url)).split("\n").filter((l) => l.startsWith("//")).join("\n"));
  Deno.exit(0);
}

const quick = flags.quick;
const list = <T extends string>(s: string, allowed: readonly T[]): T[] => {
  const items = s.split(",").map((x) => x.trim()).filter(Boolean) as T[];
  for (const x of items) {
    if (!allowed.includes(x)) throw new Error(`unknown value "${x}"; expected ${allowed.join(", ")}`);
  }
  return items;
};
const runtimes = list(flags.runtime!, ["deno", "bun"] as const);
const providers = list(flags.provider!, ["openai", "anthropic"] as const);
const shapes = list(flags.shape!, SHAPES);
const reps = Number(flags.reps ?? (quick ? 1 : 3));
// The realistic p99s get more pairs: on this box one pair's server/relay p99 ratio scatters with
// a standard deviation of about 0.2 (Bun, 500 calls, 12 pairs of 3 s), three pooled pairs 0.16,
// five 0.10. A p99 is where a runtime's pauses and the machine's drift show most.
const realisticReps = Number(flags.reps ?? (quick ? 1 : 5));

/** What each shape runs, full and --quick. */
const PLAN = quick
  ? {
    idle: { n: 200 },
    realistic: [{ k: 1000, windowMs: 1500 }],
    saturation: [{ k: 1, windowMs: 500 }, { k: 100, windowMs: 500 }],
    supersede: { n: 50 },
    long: [{ utterances: 10, windowMs: 200 }, { utterances: 1000, windowMs: 300 }],
    warmupMs: 700,
    settleMs: 300,
  }
  : {
    idle: { n: 1000 },
    // At least 1000 turns per target over the repetitions, so that the pooled p99 is not one slow turn.
    realistic: [{ k: 100, windowMs: 6000 }, { k: 500, windowMs: 3000 }, { k: 1000, windowMs: 3000 }],
    saturation: [{ k: 1, windowMs: 1500 }, { k: 100, windowMs: 1500 }],
    supersede: { n: 200 },
    long: [{ utterances: 10, windowMs: 500 }, { utterances: 100, windowMs: 500 }, {
      utterances: 1000,
      windowMs: 1000,
    }],
    warmupMs: 1500,
    settleMs: 1000,
  };

// ---------------------------------------------------------------------------------------
// Processes

function findBin(name: string): string {
  for (const dir of [`${ROOT}/.tools/node_modules/.bin`, ...(Deno.env.get("PATH") ?? "").split(":")]) {
    if (dir && existsSync(`${dir}/${name}`)) return `${dir}/${name}`;
  }
  throw new Error(`${name} not found on PATH or in .tools/node_modules/.bin`);
}
const BIN: Record<Runtime, string> = { deno: Deno.execPath(), bun: findBin("bun") };
const pin = !flags["no-pin"] && existsSync("/usr/bin/taskset");
const pinned = (cpu: number, argv: string[]) => (pin ? ["taskset", "-c", String(cpu), ...argv] : argv);
const logDir = Deno.makeTempDirSync({ prefix: "bench-" });

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr as Deno.NetAddr;
  listener.close();
  return port;
}

async function waitForPort(port: number, child: Deno.ChildProcess, what: string) {
  const deadline = Date.now() + 20_000;
  let exited = false;
  child.status.then(() => exited = true);
  while (Date.now() < deadline && !exited) {
    try {
      (await Deno.connect({ hostname: "127.0.0.1", port })).close();
      return;
    } catch {
      await new Promise((r) => setTimeout(r, 25));
    }
  }
  throw new Error(`${what} did not start (see ${logDir}/${what}.log)`);
}

const live = new Set<Deno.ChildProcess>();

interface Proc {
  pid: number;
  url: string;
  stop(): Promise<void>;
}

/** Starts the relay or the server on `runtime`, logs to a temp file, stdout to /dev/null. */
async function startTarget(target: Target, runtime: Runtime, provider: Provider, fakePort: number): Promise<Proc> {
  const port = freePort();
  const file = target === "relay" ? "bench/relay.ts" : "main.ts";
  const cmd = runtime === "deno" ? [BIN.deno, "run", "--allow-net", "--allow-env", file] : [BIN.bun, "run", file];
  const name = `${target}-${runtime}-${provider}`;
  const argv = pinned(0, cmd).map((a) => `'${a}'`).join(" ");
  const child = new Deno.Command("sh", {
    args: ["-c", `exec ${argv} > /dev/null 2> '${logDir}/${name}.log'`],
    cwd: ROOT,
    env: {
      LLM_PROVIDER: provider,
      OPENAI_API_KEY: "sk-bench",
      OPENAI_BASE_URL: `http://127.0.0.1:${fakePort}/v1`,
      ANTHROPIC_API_KEY: "sk-ant-bench",
      ANTHROPIC_BASE_URL: `http://127.0.0.1:${fakePort}`,
      PORT: String(port),
      LOG_LEVEL: flags["log-level"]!,
      // Whatever a local .env says, the server runs alone, with no store, auth or fallback.
      FALLBACK_PROVIDER: "",
      AUTH_TOKEN: "",
      STATE_URL: "",
      METRICS_TOKEN: "",
      DRAIN_TIMEOUT_MS: "0",
      NO_COLOR: "1",
    },
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  live.add(child);
  child.status.then(() => live.delete(child));
  await waitForPort(port, child, name);
  return {
    pid: child.pid,
    url: `ws://127.0.0.1:${port}/llm-websocket/`,
    async stop() {
      try {
        child.kill("SIGTERM");
      } catch { /* gone */ }
      const killer = setTimeout(() => {
        try {
          child.kill("SIGKILL");
        } catch { /* gone */ }
      }, 3000);
      await child.status;
      clearTimeout(killer);
    },
  };
}

/** The load client with the fake provider, on Bun, for the whole run. */
async function startLoad() {
  const child = new Deno.Command(pinned(1, [BIN.bun])[0], {
    args: [...pinned(1, [BIN.bun]).slice(1), "run", "bench/load.ts"],
    cwd: ROOT,
    stdin: "null",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  live.add(child);
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let line = "";
  while (!line.includes("\n")) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the load client did not start");
    line += value;
  }
  reader.releaseLock();
  child.stdout.cancel().catch(() => {});
  const { fake, control } = JSON.parse(line.split("\n")[0]);
  return {
    fakePort: fake as number,
    async job(job: Json): Promise<Json> {
      const res = await fetch(`http://127.0.0.1:${control}/job`, { method: "POST", body: JSON.stringify(job) });
      const result = await res.json();
      if (!res.ok) throw new Error(`${job.shape} job failed: ${result.error}`);
      return result;
    },
    async stop() {
      await fetch(`http://127.0.0.1:${control}/quit`, { method: "POST" }).then((r) => r.text()).catch(() => {});
      await child.status;
    },
  };
}

// ---------------------------------------------------------------------------------------
// The run

interface Run {
  runtime: Runtime;
  provider: Provider;
  shape: Shape;
  k: number;
  target: Target;
  rep: number;
  result: Json;
}

const runs: Run[] = [];
const started = Date.now();
const elapsed = () => `${((Date.now() - started) / 1000).toFixed(0)}s`;

/** One measurement, relay then server, `times` times. */
async function interleave(
  load: Awaited<ReturnType<typeof startLoad>>,
  procs: Record<Target, Proc>,
  meta: Omit<Run, "target" | "rep" | "result">,
  job: Json,
  times = reps,
) {
  for (let rep = 0; rep < times; rep++) {
    for (const target of ["relay", "server"] as const) {
      const result = await load.job({ ...job, url: procs[target].url, pid: procs[target].pid });
      runs.push({ ...meta, target, rep, result });
    }
  }
  const row = summarizeRow(meta);
  console.error(`  [${elapsed()}] ${meta.runtime} ${meta.provider} ${meta.shape} ${meta.k}: ${brief(row)}`);
}

async function main() {
  console.error(
    `bench: ${runtimes.join(",")} × ${providers.join(",")} × ${shapes.join(",")}, ${reps} rep(s)` +
      ` (realistic ${realisticReps})` +
      `${quick ? " (quick)" : ""}${pin ? ", server on CPU 0, load on CPU 1" : ""}; logs in ${logDir}`,
  );
  const load = await startLoad();
  try {
    for (const runtime of runtimes) {
      for (const provider of providers) {
        const procs = {
          relay: await startTarget("relay", runtime, provider, load.fakePort),
          server: await startTarget("server", runtime, provider, load.fakePort),
        };
        try {
          await measureCombo(load, procs, runtime, provider);
        } finally {
          await procs.relay.stop();
          await procs.server.stop();
        }
      }
    }
  } finally {
    await load.stop();
  }
  report();
}

async function measureCombo(
  load: Awaited<ReturnType<typeof startLoad>>,
  procs: Record<Target, Proc>,
  runtime: Runtime,
  provider: Provider,
) {
  const meta = { runtime, provider };
  // Memory first, on fresh processes.
  if (shapes.includes("idle")) {
    await interleave(load, procs, { ...meta, shape: "idle", k: PLAN.idle.n }, { shape: "idle", n: PLAN.idle.n }, 1);
  }
  for (const target of ["relay", "server"] as const) {
    await load.job({ shape: "warmup", url: procs[target].url, pid: procs[target].pid, k: 10, ms: PLAN.warmupMs });
  }
  if (shapes.includes("realistic")) {
    for (const { k, windowMs } of PLAN.realistic) {
      // A row's calls stay open over its windows, as calls last minutes; fresh calls get a
      // second of pings first, so that their opening is not collected inside the first window.
      const job = { shape: "realistic", k, windowMs, keep: true, settleMs: PLAN.settleMs };
      await interleave(load, procs, { ...meta, shape: "realistic", k }, job, realisticReps);
      for (const target of ["relay", "server"] as const) await load.job({ shape: "release", url: procs[target].url });
    }
  }
  if (shapes.includes("saturation")) {
    for (const { k, windowMs } of PLAN.saturation) {
      await interleave(load, procs, { ...meta, shape: "saturation", k }, { shape: "saturation", k, windowMs });
    }
  }
  if (shapes.includes("supersede")) {
    const { n } = PLAN.supersede;
    await interleave(load, procs, { ...meta, shape: "supersede", k: 1 }, { shape: "supersede", n });
  }
  if (shapes.includes("long")) {
    for (const { utterances, windowMs } of PLAN.long) {
      await interleave(load, procs, { ...meta, shape: "long", k: utterances }, {
        shape: "long",
        utterances,
        windowMs,
      });
    }
  }
}

// ---------------------------------------------------------------------------------------
// Summaries: medians over repetitions, ratios from each relay/server pair

const med = (xs: number[]) => {
  const s = xs.filter(Number.isFinite).sort((a, b) => a - b);
  if (!s.length) return NaN;
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

/** The figures each shape reports, read from one job result. */
const METRICS: Record<Shape, Record<string, (r: Json) => number>> = {
  idle: { kibPerCall: (r) => r.kibPerCall },
  realistic: {
    p50: (r) => r.first.p50,
    doneP50: (r) => r.complete.p50,
    cpuMsPerTurn: (r) => r.cpuMsPerTurn,
  },
  saturation: { turnsPerSec: (r) => r.turnsPerSec, cpuMsPerTurn: (r) => r.cpuMsPerTurn, p50: (r) => r.first.p50 },
  supersede: { p50: (r) => r.latency.p50 },
  long: {
    p50: (r) => r.first.p50,
    p99: (r) => r.first.p99,
    doneP50: (r) => r.complete.p50,
    cpuMsPerTurn: (r) => r.cpuMsPerTurn,
  },
};

/** p99s taken over the samples of all repetitions together (one repetition has too few). */
const POOLED: Partial<Record<Shape, Record<string, string>>> = {
  realistic: { p99: "first", doneP99: "complete" },
  supersede: { p99: "latency" },
};

const pooledP99 = (results: Json[], sample: string) => {
  const all = results.flatMap((r) => r.samples?.[sample] ?? []).sort((a: number, b: number) => a - b);
  return all.length ? all[Math.min(all.length, Math.ceil(all.length * 0.99)) - 1] : NaN;
};

interface Row {
  runtime: Runtime;
  provider: Provider;
  shape: Shape;
  k: number;
  reps: number;
  /** metric -> { relay, server (medians), ratio (median of pair ratios), diff (median of pair differences) } */
  metrics: Record<string, { relay: number; server: number; ratio: number; diff: number }>;
  notes: string[];
}

function summarizeRow(meta: Omit<Run, "target" | "rep" | "result">): Row {
  const mine = runs.filter((r) =>
    r.runtime === meta.runtime && r.provider === meta.provider && r.shape === meta.shape && r.k === meta.k
  );
  const relay = mine.filter((r) => r.target === "relay").sort((a, b) => a.rep - b.rep);
  const server = mine.filter((r) => r.target === "server").sort((a, b) => a.rep - b.rep);
  const metrics: Row["metrics"] = {};
  for (const [name, read] of Object.entries(METRICS[meta.shape])) {
    const rv = relay.map((r) => read(r.result));
    const sv = server.map((r) => read(r.result));
    metrics[name] = {
      relay: med(rv),
      server: med(sv),
      ratio: med(sv.map((s, i) => s / rv[i])),
      diff: med(sv.map((s, i) => s - rv[i])),
    };
  }
  for (const [name, sample] of Object.entries(POOLED[meta.shape] ?? {})) {
    const r = pooledP99(relay.map((x) => x.result), sample);
    const v = pooledP99(server.map((x) => x.result), sample);
    metrics[name] = { relay: r, server: v, ratio: v / r, diff: v - r };
  }
  const notes: string[] = [];
  for (const r of mine) {
    const res = r.result;
    if (res.clientPct > 90) notes.push(`client busy ${res.clientPct}% (${r.target})`);
    if (res.overruns) notes.push(`${res.overruns} overruns (${r.target})`);
    if (res.unfinished) notes.push(`${res.unfinished} unfinished (${r.target})`);
    if (res.failures) notes.push(`${res.failures} not closed in 2 s (${r.target})`);
  }
  return { ...meta, reps: relay.length, metrics, notes: [...new Set(notes)] };
}

const f = (x: number, digits = 2) =>
  !Number.isFinite(x) ? "–" : Math.abs(x) >= 100 ? x.toFixed(0) : x.toFixed(x >= 10 ? 1 : digits);
const cell = (m?: { relay: number; server: number; ratio: number }, digits = 2) =>
  m ? `${f(m.server, digits)} / ${f(m.relay, digits)} (${f(m.ratio)}×)` : "";

function brief(row: Row) {
  return Object.entries(row.metrics).map(([k, m]) => `${k} ${f(m.server)}/${f(m.relay)}`).join(", ");
}

const HEADER = [
  "runtime",
  "provider",
  "shape",
  "K",
  "p50 ms",
  "p99 ms",
  "complete p50 ms",
  "turns/s",
  "CPU ms/turn",
  "KiB/call",
  "notes",
];

function tableRows(rows: Row[]): string[][] {
  return rows.map((r) => {
    const m = r.metrics;
    const k = r.shape === "long" ? `${r.k} utt.` : r.shape === "idle" ? `${r.k} idle` : String(r.k);
    return [
      r.runtime,
      r.provider,
      r.shape,
      k,
      cell(m.p50),
      cell(m.p99),
      cell(m.doneP50),
      cell(m.turnsPerSec, 0),
      cell(m.cpuMsPerTurn),
      cell(m.kibPerCall, 1),
      r.notes.join("; "),
    ];
  });
}

function textTable(rows: string[][]): string {
  const all = [HEADER, ...rows];
  const widths = HEADER.map((_, i) => Math.max(...all.map((r) => r[i].length)));
  const line = (r: string[]) => r.map((c, i) => c.padEnd(widths[i])).join("  ").trimEnd();
  return [line(HEADER), widths.map((w) => "-".repeat(w)).join("  "), ...rows.map(line)].join("\n");
}

const mdTable = (rows: string[][]) =>
  [HEADER, HEADER.map(() => "---"), ...rows].map((r) => `| ${r.map((c) => c.replaceAll("|", "\\|")).join(" | ")} |`)
    .join("\n");

interface TargetCheck {
  target: string;
  runtime: Runtime;
  measured: string;
  met: boolean | null;
}

/** The targets, checked per runtime against the worst case over providers and K. */
function checkTargets(rows: Row[]): TargetCheck[] {
  const checks: TargetCheck[] = [];
  for (const runtime of runtimes) {
    const mine = rows.filter((r) => r.runtime === runtime);
    const check = (
      target: string,
      shape: Shape,
      metric: string,
      value: (m: Row["metrics"][string]) => number,
      ok: (v: number) => boolean,
      show: (v: number, m: Row["metrics"][string]) => string,
      filter: (r: Row) => boolean = () => true,
    ) => {
      const found = mine.filter((r) => r.shape === shape && r.metrics[metric] && filter(r));
      if (!found.length) return;
      const parts = found.map((r) => ({
        v: value(r.metrics[metric]),
        m: r.metrics[metric],
        where: `${r.provider} ${r.k}`,
      }));
      const met = parts.every((p) => ok(p.v));
      checks.push({ target, runtime, measured: parts.map((p) => `${show(p.v, p.m)} (${p.where})`).join(", "), met });
    };
    check(
      "realistic p50 added latency within 1 ms of the relay",
      "realistic",
      "p50",
      (m) => m.diff,
      (v) => v <= 1,
      (v) => `${v >= 0 ? "+" : ""}${f(v)} ms`,
    );
    check(
      "realistic p99 within 1.5× of the relay",
      "realistic",
      "p99",
      (m) => m.ratio,
      (v) => v <= 1.5,
      (v) => `${f(v)}×`,
    );
    check(
      "saturation turns/s at least 0.7× the relay",
      "saturation",
      "turnsPerSec",
      (m) => m.ratio,
      (v) => v >= 0.7,
      (v) => `${f(v)}×`,
    );
    const kib = runtime === "bun" ? 24 : 64;
    check(
      `idle memory per call at most ${kib} KiB`,
      "idle",
      "kibPerCall",
      (m) => m.server,
      (v) => v <= kib,
      (v, m) => `${f(v, 1)} KiB, relay ${f(m.relay, 1)}`,
    );
    check(
      "superseded upstream closed within 5 ms, p99",
      "supersede",
      "p99",
      (m) => m.server,
      (v) => v <= 5,
      (v) => `${f(v)} ms`,
    );
    check(
      "long call (1000 utterances) CPU per turn within 2× of the relay",
      "long",
      "cpuMsPerTurn",
      (m) => m.ratio,
      (v) => v <= 2,
      (v) => `${f(v)}×`,
      (r) => r.k === 1000,
    );
  }
  return checks;
}

function report() {
  const keys = new Map<string, Omit<Run, "target" | "rep" | "result">>();
  for (const { runtime, provider, shape, k } of runs) {
    keys.set(`${runtime}|${provider}|${shape}|${k}`, { runtime, provider, shape, k });
  }
  const rows = [...keys.values()].map(summarizeRow);
  const table = tableRows(rows);
  const targets = checkTargets(rows);
  const command = `deno run -A bench/run.ts ${Deno.args.join(" ")}`.trim();
  // The raw samples stay out of the file: the summaries and pooled p99s are in `rows`.
  const bare = runs.map(({ result: { samples: _, ...result }, ...run }) => ({ ...run, result }));
  const date = new Date().toISOString().replace(/\.\d+Z$/, "Z");
  const versions = {
    deno: Deno.version.deno,
    bun: new TextDecoder().decode(new Deno.Command(BIN.bun, { args: ["--version"] }).outputSync().stdout).trim(),
  };
  const legend = "Each cell: server / relay (median of the server/relay ratios of adjacent runs). p50/p99: " +
    "response_required sent → first content frame (supersede: newer request sent → older upstream " +
    "closed). CPU: server process utime+stime per completed turn. KiB/call: RSS growth per open idle call.";

  console.log(`\n${textTable(table)}\n\n${legend}\n\nTargets (issue 6):`);
  for (const t of targets) {
    console.log(`  ${t.met ? "met " : "MISS"}  ${t.runtime.padEnd(4)}  ${t.target}: ${t.measured}`);
  }

  Deno.writeTextFileSync(
    flags.out!,
    JSON.stringify(
      { date, command, versions, pinned: pin, reps, realisticReps, quick, plan: PLAN, rows, targets, runs: bare },
      (_, v) => typeof v === "number" ? Math.round(v * 1000) / 1000 : v,
      2,
    ) +
      "\n",
  );
  const md = [
    "# Benchmark results",
    "",
    `${date}, \`${command}\` (deno ${versions.deno}, bun ${versions.bun}, ${navigator.hardwareConcurrency} cores` +
    `${pin ? ", server pinned to CPU 0, load client to CPU 1" : ""}, ${reps} repetition(s), ` +
    `realistic ${realisticReps}).`,
    "",
    mdTable(table),
    "",
    legend,
    "",
    "## Targets",
    "",
    "| runtime | target | measured | met |",
    "| --- | --- | --- | --- |",
    ...targets.map((t) => `| ${t.runtime} | ${t.target} | ${t.measured} | ${t.met ? "yes" : "**no**"} |`),
    "",
  ].join("\n");
  const mdPath = flags.out!.replace(/[^/]*$/, "RESULTS.md");
  Deno.writeTextFileSync(mdPath, md);
  // Written as `deno fmt` would, so the repository's format check passes.
  new Deno.Command(Deno.execPath(), { args: ["fmt", "--quiet", flags.out!, mdPath], stdout: "null", stderr: "null" })
    .outputSync();
  console.log(`\nwrote ${flags.out} and ${mdPath} (${elapsed()})`);
}

// Ctrl-C stops the children this run started, then exits.
Deno.addSignalListener("SIGINT", () => {
  for (const child of live) {
    try {
      child.kill("SIGTERM");
    } catch { /* gone */ }
  }
  Deno.exit(130);
});
await main();
