// The load client: plays Retell for many calls at once against a server under test, with the
// fake provider running in this same process (so "upstream stream closed" and "request sent"
// share one clock). Run by bench/run.ts as its own process, on Bun:
//
//   bun run bench/load.ts        prints {"fake":<port>,"control":<port>} and waits for jobs
//
// Each job is a POST /job on the control port with a JSON body (see Job); the answer is the
// job's result as JSON. POST /quit ends the process. Kept lean on purpose: frames are built
// by string concatenation, and the server's frames are read without JSON.parse on the hot path.
import process from "node:process";
import { readFileSync } from "node:fs";
import { type FakeProvider, REPLY_TEXT, startFakeProvider } from "./fake_provider.ts";

// ---------------------------------------------------------------------------------------
// Percentiles

/** Nearest-rank percentile of an ascending array (p in 0..100); NaN when empty. */
export function percentile(sorted: readonly number[], p: number): number {
  if (!sorted.length) return NaN;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1];
}

export interface Summary {
  n: number;
  p50: number;
  p99: number;
  mean: number;
  max: number;
}

export function summarize(values: readonly number[]): Summary {
  const sorted = [...values].sort((a, b) => a - b);
  const mean = sorted.reduce((s, v) => s + v, 0) / (sorted.length || 1);
  return {
    n: sorted.length,
    p50: percentile(sorted, 50),
    p99: percentile(sorted, 99),
    mean: sorted.length ? mean : NaN,
    max: sorted.length ? sorted[sorted.length - 1] : NaN,
  };
}

export const median = (values: readonly number[]) => percentile([...values].sort((a, b) => a - b), 50);

// ---------------------------------------------------------------------------------------
// /proc readings of the process under test

const TICK_MS = 10; // USER_HZ is 100 on Linux

/** utime + stime of a process (all its threads), in ms. */
export function cpuMs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) * TICK_MS;
}

/** VmRSS of a process, in KiB. */
export function rssKiB(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  return Number(status.match(/VmRSS:\s+(\d+)/)?.[1] ?? NaN);
}

// ---------------------------------------------------------------------------------------
// Frames, pre-serialised where they can be

const USER_LINES = [
  "Hi, I would like to book a cleaning for next week if you have anything.",
  "Monday morning would be best for me, maybe around ten?",
  "Actually, could we do Wednesday instead? My name is Sam Taylor.",
  "Great, and how long does a cleaning usually take?",
  "Perfect, thank you. Do I need to bring anything with me?",
];
const userItem = (text: string) => `{"role":"user","content":${JSON.stringify(text)}}`;
const AGENT_REPLY = `{"role":"agent","content":${JSON.stringify(REPLY_TEXT.trim())}}`;
const GREETING = `{"role":"agent","content":"Hi Sam! This is Ava at Sunrise Dental. How can I help you today?"}`;
const RESPONSE_PREFIX = '{"response_type":"response","response_id":';
const COMPLETE_KEY = '"content_complete":';

/** A transcript of `n` utterances that ends with the caller speaking. */
export function transcriptOf(n: number): string {
  const items: string[] = [];
  for (let j = 0; j < n; j++) {
    const user = (n - 1 - j) % 2 === 0;
    items.push(user ? userItem(USER_LINES[j % USER_LINES.length]) : j === 0 ? GREETING : AGENT_REPLY);
  }
  return items.join(",");
}

// ---------------------------------------------------------------------------------------
// One call, as Retell plays it

interface Turn {
  id: number;
  sent: number;
  first: number;
  complete: number;
}

let callSeq = 0;

class Call {
  readonly ws: WebSocket;
  /** The transcript so far, as JSON items joined by commas. */
  json = GREETING;
  utterances = 1;
  responseId = 0;
  turn?: Turn;
  greeted = false;
  closed = false;
  onGreeting?: () => void;
  onFirst?: (turn: Turn) => void;
  onComplete?: (turn: Turn) => void;
  readonly name: string;

  constructor(url: string, readonly index: number) {
    this.name = `b${++callSeq}`;
    this.ws = new WebSocket(url + this.name);
    this.ws.onopen = () =>
      this.ws.send(
        `{"interaction_type":"call_details","call":{"call_id":"${this.name}","call_type":"web_call",` +
          `"call_status":"registered","agent_id":"bench","retell_llm_dynamic_variables":{"customer_name":"Sam"}}}`,
      );
    this.ws.onmessage = (e) => this.receive(e.data as string);
    this.ws.onclose = () => this.closed = true;
    this.ws.onerror = () => {};
  }

  /** Resolves once the greeting (response 0) arrived. */
  ready(timeoutMs = 15_000): Promise<void> {
    if (this.greeted) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`call ${this.name}: no greeting`)), timeoutMs);
      this.onGreeting = () => (clearTimeout(timer), resolve());
      this.ws.addEventListener("close", () => (clearTimeout(timer), reject(new Error(`call ${this.name} closed`))));
    });
  }

  /** Asks for a turn: the caller says a line (tagged for the fake provider) unless `same` is set,
   * in which case the transcript is sent as it is (long calls). Mode H holds the upstream open. */
  ask(mode: "F" | "H" = "F", same = false) {
    const id = ++this.responseId;
    if (!same) {
      this.json += `,${userItem(`${USER_LINES[id % USER_LINES.length]} [t=${mode}:${this.name}.${id}]`)}`;
      this.utterances++;
    }
    const frame = `{"interaction_type":"response_required","response_id":${id},"transcript":[${this.json}],` +
      `"transcript_with_tool_calls":[${this.json}]}`;
    const turn: Turn = { id, sent: 0, first: 0, complete: 0 };
    this.turn = turn;
    turn.sent = performance.now();
    this.ws.send(frame);
    return turn;
  }

  /** The caller keeps the call going but starts a new topic: back to the greeting. */
  reset() {
    this.json = GREETING;
    this.utterances = 1;
  }

  private receive(data: string) {
    if (!data.startsWith(RESPONSE_PREFIX)) return; // config, update_agent, ping_pong
    let i = RESPONSE_PREFIX.length;
    let id = 0;
    for (let c = data.charCodeAt(i); c >= 48 && c <= 57; c = data.charCodeAt(++i)) id = id * 10 + c - 48;
    if (id === 0) {
      if (!this.greeted) (this.greeted = true, this.onGreeting?.());
      return;
    }
    const turn = this.turn;
    if (!turn || id !== turn.id || turn.complete) return;
    // data[i..] is ,"content":"…  and an empty content is ,"content":""
    if (!turn.first && data.charCodeAt(i + 12) !== 34) {
      turn.first = performance.now();
      this.onFirst?.(turn);
    }
    const at = data.lastIndexOf(COMPLETE_KEY);
    if (at > 0 && data.charCodeAt(at + COMPLETE_KEY.length) === 116) {
      turn.complete = performance.now();
      if (!turn.first) turn.first = turn.complete;
      this.json += `,${AGENT_REPLY}`;
      this.utterances++;
      this.onComplete?.(turn);
    }
  }

  close() {
    if (!this.closed) this.ws.close(1000);
  }
}

/** Pings every open call every 2 s, spread over the period, from one timer. */
function startPings(calls: Call[]) {
  const buckets = 20;
  let tick = 0;
  const timer = setInterval(() => {
    const frame = `{"interaction_type":"ping_pong","timestamp":${Date.now()}}`;
    for (let i = tick++ % buckets; i < calls.length; i += buckets) {
      const call = calls[i];
      if (call.greeted && !call.closed) call.ws.send(frame);
    }
  }, 2000 / buckets);
  return () => clearInterval(timer);
}

/** Opens `k` calls, at most `parallel` connecting at once, and waits for every greeting. */
async function openCalls(url: string, k: number, parallel = 50): Promise<Call[]> {
  const calls: Call[] = [];
  let next = 0;
  const worker = async () => {
    while (next < k) {
      const call = new Call(url, next++);
      calls.push(call);
      await call.ready();
    }
  };
  await Promise.all(Array.from({ length: Math.min(parallel, k) }, worker));
  return calls.sort((a, b) => a.index - b.index);
}

/** Closes every call and waits (up to 3 s) for the server to see it. */
async function closeCalls(calls: Call[]) {
  for (const call of calls) call.close();
  const deadline = performance.now() + 3000;
  while (calls.some((c) => !c.closed) && performance.now() < deadline) await sleep(20);
  await sleep(100);
}

const round = (ms: number) => Math.round(ms * 1000) / 1000;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Waits until every call's current turn is complete (or `ms` passed). */
async function drain(calls: Call[], ms = 3000) {
  const deadline = performance.now() + ms;
  while (calls.some((c) => c.turn && !c.turn.complete) && performance.now() < deadline) await sleep(5);
  return calls.filter((c) => c.turn && !c.turn.complete).length;
}

// ---------------------------------------------------------------------------------------
// Jobs

export type Job =
  | { shape: "idle"; url: string; pid: number; n: number; settleMs?: number }
  | {
    shape: "realistic";
    url: string;
    pid: number;
    k: number;
    windowMs: number;
    periodMs?: number;
    timeline?: boolean;
    /** Keep the calls open for the next realistic job on the same URL (until "release"). */
    keep?: boolean;
    /** After opening fresh calls, wait this long (pings going) before the first turn. */
    settleMs?: number;
  }
  | { shape: "release"; url: string }
  | { shape: "saturation"; url: string; pid: number; k: number; windowMs: number; warmMs?: number; cap?: number }
  | { shape: "supersede"; url: string; pid: number; n: number }
  | { shape: "long"; url: string; pid: number; utterances: number; windowMs: number; minTurns?: number }
  | { shape: "warmup"; url: string; pid: number; k: number; ms: number };

/** Client CPU while measuring: this process's share of one core, in percent. */
function clientBusy() {
  const start = process.cpuUsage();
  const t0 = performance.now();
  return () => {
    const used = process.cpuUsage(start);
    return Math.round(((used.user + used.system) / 1000 / (performance.now() - t0)) * 100);
  };
}

/** RSS per open idle call: RSS before and after opening `n` calls that then stay quiet. */
async function idle(job: Extract<Job, { shape: "idle" }>) {
  const settle = job.settleMs ?? 1000;
  // A few calls first, so the code paths for a call are loaded before the "before" reading.
  await closeCalls(await openCalls(job.url, 20));
  await sleep(settle);
  const before = rssKiB(job.pid);
  const t0 = performance.now();
  const calls = await openCalls(job.url, job.n);
  const openMs = performance.now() - t0;
  const stop = startPings(calls);
  await sleep(settle);
  const after = rssKiB(job.pid);
  stop();
  await closeCalls(calls);
  return { n: job.n, rssBeforeKiB: before, rssAfterKiB: after, kibPerCall: (after - before) / job.n, openMs };
}

/** Calls a realistic job left open, by server URL. A live call lasts minutes, so a row's calls
 * are opened once and measured over several windows; opening and closing K calls around each
 * window churned calls at 50 times a busy deployment's rate, and the collection of each
 * window's closed calls landed in the next window. */
const kept = new Map<string, Call[]>();

async function release(url: string) {
  const calls = kept.get(url);
  kept.delete(url);
  if (calls) await closeCalls(calls);
  return { closed: calls?.length ?? 0 };
}

/** Open loop: each call asks for a turn every periodMs, staggered evenly over the period. */
async function realistic(job: Extract<Job, { shape: "realistic" }>) {
  const period = job.periodMs ?? 3000;
  let calls = job.keep ? kept.get(job.url) : undefined;
  if (calls && (calls.length !== job.k || calls.some((c) => c.closed))) {
    await release(job.url);
    calls = undefined;
  }
  const fresh = !calls;
  calls ??= await openCalls(job.url, job.k);
  // A turn the last window gave up on (counted there as unfinished) is not this window's.
  if (!fresh) { for (const call of calls) call.turn = undefined; }
  if (job.keep) kept.set(job.url, calls);
  const stopPings = startPings(calls);
  if (fresh && job.settleMs) await sleep(job.settleMs);
  const first: number[] = [];
  const complete: number[] = [];
  const timeline: number[][] = [];
  let overruns = 0;
  let turns = 0;
  const t0 = performance.now() + 50;
  for (const call of calls) {
    call.onComplete = (t) => {
      first.push(t.first - t.sent);
      complete.push(t.complete - t.sent);
      if (job.timeline) timeline.push([round(t.sent - t0), round(t.first - t.sent), call.index]);
    };
  }
  const end = t0 + job.windowMs;
  const cpu0 = cpuMs(job.pid);
  const busy = clientBusy();
  const timers: ReturnType<typeof setTimeout>[] = [];
  const schedule = (call: Call, at: number) => {
    if (at >= end) return;
    timers[call.index] = setTimeout(() => {
      if (call.turn && !call.turn.complete) overruns++;
      call.ask();
      turns++;
      schedule(call, at + period);
    }, Math.max(0, at - performance.now()));
  };
  for (const call of calls) schedule(call, t0 + (call.index / job.k) * period);
  await sleep(end - performance.now());
  const unfinished = await drain(calls);
  const cpu = cpuMs(job.pid) - cpu0;
  const clientPct = busy();
  timers.forEach(clearTimeout);
  stopPings();
  if (!job.keep) await closeCalls(calls);
  return {
    k: job.k,
    fresh,
    turns,
    completed: complete.length,
    overruns,
    unfinished,
    first: summarize(first),
    complete: summarize(complete),
    cpuMsPerTurn: cpu / Math.max(1, complete.length),
    clientPct,
    samples: { first: first.map(round), complete: complete.map(round) },
    ...(job.timeline && { timeline }),
  };
}

/** Closed loop: each call asks again as soon as a reply completes. Transcripts grow to `cap`
 * utterances, then start over (a long call is measured by the "long" job). */
async function saturation(job: Extract<Job, { shape: "saturation" }>) {
  const cap = job.cap ?? 20;
  const calls = await openCalls(job.url, job.k);
  const stopPings = startPings(calls);
  let measuring = false;
  let stopping = false;
  let done = 0;
  const first: number[] = [];
  for (const call of calls) {
    call.onComplete = (t) => {
      if (measuring) {
        done++;
        first.push(t.first - t.sent);
      }
      if (stopping) return;
      if (call.utterances >= cap) call.reset();
      call.ask();
    };
  }
  for (const call of calls) call.ask();
  await sleep(job.warmMs ?? 300);
  const cpu0 = cpuMs(job.pid);
  const busy = clientBusy();
  const t0 = performance.now();
  measuring = true;
  await sleep(job.windowMs);
  measuring = false;
  const elapsed = performance.now() - t0;
  const cpu = cpuMs(job.pid) - cpu0;
  const clientPct = busy();
  stopping = true;
  await drain(calls);
  stopPings();
  await closeCalls(calls);
  return {
    k: job.k,
    turns: done,
    turnsPerSec: (done / elapsed) * 1000,
    cpuMsPerTurn: cpu / Math.max(1, done),
    serverCpuPct: Math.round((cpu / elapsed) * 100),
    first: summarize(first),
    clientPct,
  };
}

/** Supersede latency: request n streams and holds; after its first frame, request n+1 is sent;
 * the time from that send until the fake provider sees request n's upstream closed. */
async function supersede(job: Extract<Job, { shape: "supersede" }>, fake: FakeProvider) {
  const [call] = await openCalls(job.url, 1);
  const latency: number[] = [];
  let failures = 0;
  const firstFrame = (turn: Turn) =>
    new Promise<void>((resolve) => {
      if (turn.first) return resolve();
      call.onFirst = () => resolve();
    });
  let turn = call.ask("H");
  await firstFrame(turn);
  for (let i = 0; i < job.n; i++) {
    const older = `${call.name}.${turn.id}`;
    const newer = call.ask("H");
    const sent = newer.sent;
    try {
      const [closedAt] = await Promise.all([fake.closedAt(older, 2000), firstFrame(newer)]);
      latency.push(closedAt - sent);
    } catch {
      failures++;
      await firstFrame(newer);
    }
    turn = newer;
  }
  // The last held stream is closed with the call.
  await closeCalls([call]);
  await fake.closedAt(`${call.name}.${turn.id}`, 2000).catch(() => {});
  return { n: job.n, failures, latency: summarize(latency), samples: { latency: latency.map(round) } };
}

/** Long call: a transcript of `utterances` items, sent unchanged turn after turn. */
async function long(job: Extract<Job, { shape: "long" }>) {
  const [call] = await openCalls(job.url, 1);
  call.json = transcriptOf(job.utterances);
  const frameBytes = call.json.length * 2;
  const first: number[] = [];
  const complete: number[] = [];
  const once = () =>
    new Promise<Turn>((resolve) => {
      call.onComplete = resolve;
      call.ask("F", true);
    });
  for (let i = 0; i < 3; i++) await once(); // warm
  const cpu0 = cpuMs(job.pid);
  const t0 = performance.now();
  while (performance.now() - t0 < job.windowMs || first.length < (job.minTurns ?? 5)) {
    const t = await once();
    first.push(t.first - t.sent);
    complete.push(t.complete - t.sent);
  }
  const cpu = cpuMs(job.pid) - cpu0;
  await closeCalls([call]);
  return {
    utterances: job.utterances,
    frameKiB: frameBytes / 1024,
    turns: first.length,
    first: summarize(first),
    complete: summarize(complete),
    cpuMsPerTurn: cpu / first.length,
  };
}

/** A short closed-loop run that gets the JIT going. */
async function warmup(job: Extract<Job, { shape: "warmup" }>) {
  return await saturation({ shape: "saturation", url: job.url, pid: job.pid, k: job.k, windowMs: job.ms, warmMs: 50 });
}

export async function runJob(job: Job, fake: FakeProvider): Promise<unknown> {
  switch (job.shape) {
    case "idle":
      return await idle(job);
    case "realistic":
      return await realistic(job);
    case "saturation":
      return await saturation(job);
    case "supersede":
      return await supersede(job, fake);
    case "long":
      return await long(job);
    case "warmup":
      return await warmup(job);
    case "release":
      return await release(job.url);
  }
}

// ---------------------------------------------------------------------------------------
// The control server

if (import.meta.main) {
  const fake = await startFakeProvider({ port: Number(process.env.FAKE_PORT ?? 0) });
  type BunServe = (o: unknown) => { port: number };
  const control = (globalThis as unknown as { Bun: { serve: BunServe } }).Bun.serve({
    port: 0,
    hostname: "127.0.0.1",
    idleTimeout: 0,
    development: false,
    async fetch(req: Request) {
      const path = new URL(req.url).pathname;
      if (path === "/quit") {
        setTimeout(() => process.exit(0), 10);
        return new Response("bye");
      }
      if (path === "/stats") return Response.json(fake.stats());
      try {
        const job = await req.json() as Job;
        return Response.json(await runJob(job, fake));
      } catch (err) {
        return Response.json({ error: String(err) }, { status: 500 });
      }
    },
  });
  console.log(JSON.stringify({ fake: fake.port, control: control.port }));
}
