/**
 * A Retell AI custom-LLM server: Retell runs the phone call and opens a WebSocket here for
 * each call; this server answers with what the agent says, streamed from OpenAI (or any
 * OpenAI-compatible server) or Claude.
 *
 *   Deno: deno task start          (or deno serve --allow-net --allow-env main.ts, which
 *                                   cannot drain live calls on SIGTERM)
 *   Bun:  bun run main.ts
 *
 * Then paste wss://<your-host>/llm-websocket into Retell's "Custom LLM URL".
 * Make it yours: the persona is section 1, the tools section 2, the provider switch is the
 * LLM_PROVIDER variable read in section 3. Everything below section 3 is plumbing.
 */
import { type Context, Hono } from "hono";
import type OpenAI from "openai";
import type Anthropic from "@anthropic-ai/sdk";
import { z } from "zod";
import process from "node:process";
import { createHash, timingSafeEqual } from "node:crypto";

// 1. Persona ------------------------------------------------------------------------------
// Who the agent is. {{slots}} are filled from the call's dynamic variables (set when the call
// is created in Retell) plus {{agent_name}}, {{current_time}} and {{call_id}}. A greeting with
// a call variable waits up to a second for it; an unknown slot in the greeting is left out,
// in the prompt it reads "unknown".
export const PERSONA: Persona = {
  name: "Ava",
  greeting: "Hi {{customer_name}}! This is {{agent_name}} at Sunrise Dental. How can I help you today?",
  timezone: "America/New_York",
  prompt: `You are {{agent_name}}, the warm and efficient front-desk assistant of Sunrise Dental, on a phone call.
The caller's name, if known: {{customer_name}}. It is now {{current_time}}.
You help callers book dental appointments and answer simple questions about the clinic.
The clinic is open Monday to Friday. Check availability before you offer a time. Book only
after the caller has confirmed the day, the time and their name, then read the booking back.
If the caller wants a person, transfer the call. When the caller is done, end the call.

How you speak:
- This is a voice call. Answer in one to three short, natural sentences.
- Never use markdown, lists, headings, emoji, or URLs: everything you write is read aloud.
- Say numbers, times and dates the way a person would say them.
- If you did not catch something, ask the caller to repeat it.`,
  // Said to the model (not the caller) when Retell reports the caller has gone quiet.
  reminder: "(The caller has been silent for a while. Check in with one short, friendly sentence.)",
  // Said while the model or a tool is slow, so the caller never sits in silence.
  holding: ["One moment while I check that.", "Just a second, please."],
  // Spoken when the model fails or is too slow, so the caller never hears dead air.
  apology: "Sorry, I'm having trouble right now. Could you say that again?",
  // Retell agent settings for this persona, sent to Retell as each call starts (all optional).
  agentSettings: {
    responsiveness: 0.9,
    interruption_sensitivity: 0.8,
    reminder_trigger_ms: 10_000,
    reminder_max_count: 2,
  },
};

export interface Persona {
  name: string;
  greeting: string;
  timezone: string;
  prompt: string;
  reminder: string;
  holding: string[];
  apology: string;
  agentSettings?: {
    responsiveness?: number;
    interruption_sensitivity?: number;
    reminder_trigger_ms?: number;
    reminder_max_count?: number;
  };
}

// 2. Tools --------------------------------------------------------------------------------
// One entry per tool: a name, a description telling the model when to call it, a zod schema
// for its arguments and the function. Return any JSON-able value and the model reads it; an
// object with an `error` field tells the model it failed. Mark a tool that changes something
// `once: true`: it then runs at most once per call for the same arguments, however often
// Retell asks again. Return a CallAction to say a last line and end, transfer or press keys.
export class CallAction {
  constructor(
    readonly message: string,
    readonly flags: { end_call?: true; transfer_number?: string; digit_to_press?: string },
  ) {}
}

export interface ToolContext {
  callId: string;
  /** For `once` tools: the same for a repeat of this call, to pass on to your API. */
  idempotencyKey?: string;
  vars: Readonly<Record<string, string>>;
  config: Config;
  signal: AbortSignal;
}

export interface Tool<S extends z.ZodType = z.ZodType> {
  name: string;
  description: string;
  schema: S;
  run(args: z.infer<S>, ctx: ToolContext): unknown;
  once?: boolean;
  /** Returns a CallAction; if the caller talks over its last line, the action is re-issued. */
  action?: boolean;
}

const tool = <S extends z.ZodObject>(t: Tool<S>) => t as unknown as Tool;

// The clinic's diary, kept in memory. Replace these two functions with your scheduling API.
const TIMES = ["09:00", "10:30", "13:00", "15:30"];
const bookings = new Map<string, { name: string; confirmation: string }>();

function closedBecause(date: string): string | undefined {
  const day = new Date(`${date}T12:00:00Z`);
  if (Number.isNaN(day.getTime()) || day.toISOString().slice(0, 10) !== date) return "it is not a real date";
  if (date < new Date().toISOString().slice(0, 10)) return "it is in the past";
  if (day.getUTCDay() === 0 || day.getUTCDay() === 6) return "the clinic is closed at weekends";
}

function openTimes(date: string) {
  const closed = closedBecause(date);
  return closed
    ? { date, open_times: [] as string[], closed }
    : { date, open_times: TIMES.filter((t) => !bookings.has(`${date} ${t}`)) };
}

function book(date: string, time: string, name: string) {
  if (!openTimes(date).open_times.includes(time)) {
    return { error: `${date} at ${time} is not free. Offer another time.` };
  }
  if (bookings.size >= 10_000) return { error: "The diary is full. Offer to take a message." };
  const confirmation = `SD-${Math.floor(1000 + Math.random() * 9000)}`;
  bookings.set(`${date} ${time}`, { name, confirmation });
  return { booked: true, date, time, name, confirmation };
}

const DATE = z.string().regex(/^\d{4}-\d{2}-\d{2}$/).describe("The day, as YYYY-MM-DD");
const E164 = /^\+[1-9]\d{6,14}$/;
const KEYS = /^[0-9*#]{1,20}$/;

export const TOOLS: Tool[] = [
  tool({
    name: "check_availability",
    description: "List the free appointment times on one day. Call it before offering any time.",
    schema: z.object({ date: DATE }),
    run: ({ date }) => openTimes(date),
  }),
  tool({
    name: "book_appointment",
    description: "Book an appointment, only after the caller confirmed the day, time and their name.",
    schema: z.object({
      date: DATE,
      time: z.string().regex(/^\d{2}:\d{2}$/).describe("24-hour time, e.g. 09:00"),
      name: z.string().min(1).max(100).describe("The caller's full name"),
    }),
    once: true,
    run: ({ date, time, name }) => book(date, time, name),
  }),
  tool({
    name: "end_call",
    description: "Hang up after a short goodbye. Call it when the caller says goodbye or is done.",
    schema: z.object({ message: z.string().describe("The goodbye to say, e.g. 'Thanks for calling, bye!'") }),
    action: true,
    run: ({ message }) => new CallAction(message.trim() || "Goodbye!", { end_call: true }),
  }),
  tool({
    name: "transfer_call",
    description: "Transfer the caller to a person at the clinic, when they ask for one or you cannot help.",
    schema: z.object({
      message: z.string().describe("A short line to say before transferring, e.g. 'Connecting you now.'"),
      number: z.string().regex(E164).optional()
        .describe("E.164 number to transfer to; leave it out for the front desk"),
    }),
    action: true,
    run: ({ message, number }, { config }) => {
      const to = number ?? config.transferNumber;
      if (!to) return { error: "No transfer number is set up. Offer to take a message instead." };
      // A number the model names must be one you allowed: a caller cannot talk the agent into
      // dialling a premium line.
      if (to !== config.transferNumber && !config.transferAllowed.includes(to)) {
        return { error: `${to} is not a number this line may transfer to. Offer the front desk or a message.` };
      }
      return new CallAction(message, { transfer_number: to });
    },
  }),
  tool({
    name: "press_digit",
    description: "Press phone keys, to get through an automated phone menu (IVR).",
    schema: z.object({
      digits: z.string().regex(KEYS).describe("The keys to press, e.g. '2' or '1234#'"),
    }),
    action: true,
    run: ({ digits }) => new CallAction("", { digit_to_press: digits }),
  }),
];

// 3. Config -------------------------------------------------------------------------------
// Every environment variable is read here, once. A bad value stops startup with one sentence.
export type ProviderName = "openai" | "anthropic" | "demo";

export interface Config {
  provider: ProviderName;
  model: string;
  fallback?: { provider: ProviderName; model: string };
  port: number;
  openaiApiKey?: string;
  openaiBaseUrl?: string;
  anthropicApiKey?: string;
  anthropicBaseUrl?: string;
  authToken?: string;
  transferNumber?: string;
  /** Further numbers `transfer_call` may dial when the model names them. */
  transferAllowed: string[];
  firstTokenTimeoutMs: number;
  toolTimeoutMs: number;
  fillerAfterMs: number;
  stateUrl?: string;
  drainTimeoutMs: number;
  metricsToken?: string;
  logLevel: LogLevel;
}

export class ConfigError extends Error {}

export function loadConfig(env: Record<string, string | undefined>): Config {
  const get = (name: string) => env[name]?.trim() || undefined;
  const provider = pickProvider(get("LLM_PROVIDER"), get);
  const fallback = get("FALLBACK_PROVIDER") && pickProvider(get("FALLBACK_PROVIDER"), get, "FALLBACK_PROVIDER");
  if (fallback === provider) {
    throw new ConfigError(`FALLBACK_PROVIDER must differ from the main provider (${provider}).`);
  }
  const transferNumber = get("TRANSFER_NUMBER");
  const transferAllowed = get("TRANSFER_ALLOWED")?.split(",").map((n) => n.trim()).filter(Boolean) ?? [];
  const notE164 = [transferNumber, ...transferAllowed].find((n) => n && !E164.test(n));
  if (notE164) {
    throw new ConfigError(
      `TRANSFER_NUMBER and TRANSFER_ALLOWED take E.164 phone numbers like +14155550123 (got "${notE164}").`,
    );
  }
  const stateUrl = get("STATE_URL");
  if (stateUrl && !/^(rediss?:\/\/|denokv:|\.{0,2}\/)/.test(stateUrl)) {
    // Not echoed: the URL may hold a password.
    throw new ConfigError("STATE_URL must be redis://…, rediss://…, denokv: or a file path.");
  }
  const logLevel = (get("LOG_LEVEL") ?? "info") as LogLevel;
  if (!LOG_LEVELS.includes(logLevel)) {
    throw new ConfigError(`LOG_LEVEL must be one of ${LOG_LEVELS.join(", ")} (got "${logLevel}").`);
  }
  return {
    provider,
    model: modelFor(provider, get),
    fallback: fallback ? { provider: fallback, model: modelFor(fallback, get) } : undefined,
    port: readNumber(env, "PORT", 8080, 0, 65535),
    openaiApiKey: get("OPENAI_API_KEY"),
    openaiBaseUrl: get("OPENAI_BASE_URL"),
    anthropicApiKey: get("ANTHROPIC_API_KEY"),
    anthropicBaseUrl: get("ANTHROPIC_BASE_URL"),
    authToken: get("AUTH_TOKEN"),
    transferNumber,
    transferAllowed,
    firstTokenTimeoutMs: readNumber(env, "FIRST_TOKEN_TIMEOUT_MS", 4000, 1, 120_000),
    toolTimeoutMs: readNumber(env, "TOOL_TIMEOUT_MS", 8000, 1, 600_000),
    fillerAfterMs: readNumber(env, "FILLER_AFTER_MS", 1500, 1, 600_000),
    stateUrl,
    drainTimeoutMs: readNumber(env, "DRAIN_TIMEOUT_MS", 60_000, 0, 86_400_000),
    metricsToken: get("METRICS_TOKEN"),
    logLevel,
  };
}

// LLM_PROVIDER unset: the first provider whose variables are set, else the offline demo.
function pickProvider(name: string | undefined, get: (name: string) => string | undefined, variable = "LLM_PROVIDER") {
  const names = Object.keys(PROVIDERS) as ProviderName[];
  if (name === undefined) return names.find((n) => PROVIDERS[n].keys.some(get)) ?? "demo";
  const provider = name.toLowerCase() as ProviderName;
  if (!names.includes(provider)) {
    throw new ConfigError(`${variable} must be one of ${names.join(", ")} (got "${name}").`);
  }
  const { keys } = PROVIDERS[provider];
  if (keys.length && !keys.some(get)) {
    throw new ConfigError(`${variable} is ${provider} but ${keys.join(" or ")} is not set.`);
  }
  return provider;
}

const modelFor = (provider: ProviderName, get: (name: string) => string | undefined) =>
  get(PROVIDERS[provider].modelVar ?? "") || PROVIDERS[provider].model;

function readNumber(env: Record<string, string | undefined>, name: string, fallback: number, min: number, max: number) {
  const raw = env[name]?.trim();
  if (!raw) return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new ConfigError(`${name} must be a whole number from ${min} to ${max} (got "${raw}").`);
  }
  return value;
}

// 4. The Retell protocol (see README for links) --------------------------------------------
// What Retell sends. A ping and a turn's request, the frames of every few seconds, are checked
// by hand on the way in (see Call.receive): before a turn's request reaches the provider, every
// microsecond is added latency, and a union schema is more code to run cold on each turn than
// these few lines. Every other frame is checked with zod. A transcript, which grows all call
// long and comes with every request, is taken as the array it is (z.array would copy it) and
// checked item by item when a turn reads it (see readItem), so one bad item is dropped instead
// of costing the whole turn.
const Inbound = z.discriminatedUnion("interaction_type", [
  z.object({
    interaction_type: z.literal("call_details"),
    call: z.object({
      call_status: z.string().nullish().catch(null),
      retell_llm_dynamic_variables: z.record(z.string(), z.unknown()).nullish().catch(null),
    }).nullish().catch(null),
  }),
  z.object({ interaction_type: z.literal("update_only") }),
]);
type Inbound = z.infer<typeof Inbound>;
type Item = { role: string; content?: string; tool_call_id?: string; name?: string; arguments?: string };

// A transcript item, with every field of the wrong type dropped; null if it has no role.
function readItem(raw: unknown): Item | null {
  if (!raw || typeof raw !== "object") return null;
  const { role, content, tool_call_id, name, arguments: args } = raw as Record<string, unknown>;
  if (typeof role !== "string") return null;
  const text = (v: unknown) => typeof v === "string" ? v : undefined;
  return { role, content: text(content), tool_call_id: text(tool_call_id), name: text(name), arguments: text(args) };
}

// What we send to Retell.
type Flags = CallAction["flags"] & { no_interruption_allowed?: boolean };
type Outbound =
  | { response_type: "config"; config: Record<string, boolean> }
  | { response_type: "response"; response_id: number; content: string; content_complete: boolean } & Flags
  | { response_type: "tool_call_invocation"; tool_call_id: string; name: string; arguments: string }
  | { response_type: "tool_call_result"; tool_call_id: string; content: string; successful: boolean }
  | { response_type: "update_agent"; agent_config: NonNullable<Persona["agentSettings"]> };

const CONFIG_FRAME: Outbound = {
  response_type: "config",
  config: { auto_reconnect: true, call_details: true, transcript_with_tool_calls: true },
};

// 5. Providers ----------------------------------------------------------------------------
// Every provider has one shape: a system prompt, messages and tools in; text and complete
// tool calls out, as an async stream that stops when `signal` aborts.
export type Message =
  | { role: "user"; text: string }
  | { role: "assistant"; text: string }
  | { role: "tool_call"; id: string; name: string; args: string }
  | { role: "tool_result"; id: string; content: string };

export type ToolCall = Extract<Message, { role: "tool_call" }>;
// `working` says the provider is still sending (tool arguments, stop reasons) without words.
export type BrainEvent =
  | { type: "text"; text: string }
  | { type: "working" }
  | ({ type: "tool_call" } & Omit<ToolCall, "role">);
export interface ToolSpec {
  name: string;
  description: string;
  parameters: Record<string, unknown>;
}
export interface BrainRequest {
  system: string;
  messages: Message[];
  tools: ToolSpec[];
}
export interface Brain {
  provider: string;
  model: string;
  stream(request: BrainRequest, signal: AbortSignal): AsyncIterable<BrainEvent>;
}

// One entry per provider: the variables that switch it on (any one of them), the variable
// naming its model, a default model, and how to build it. Defaults are fast, non-reasoning
// models: on a phone call the time to the first word matters most.
const PROVIDERS: Record<ProviderName, { keys: string[]; modelVar?: string; model: string; create(c: Config): Brain }> =
  {
    openai: {
      keys: ["OPENAI_API_KEY", "OPENAI_BASE_URL"],
      modelVar: "OPENAI_MODEL",
      model: "gpt-4.1-mini",
      create: openaiBrain,
    },
    anthropic: {
      keys: ["ANTHROPIC_API_KEY"],
      modelVar: "ANTHROPIC_MODEL",
      model: "claude-haiku-4-5",
      create: anthropicBrain,
    },
    demo: { keys: [], model: "offline-demo", create: demoBrain },
  };

export const createBrain = (config: Config): Brain => PROVIDERS[config.provider].create(config);
const createFallback = ({ fallback, ...config }: Config) => fallback && createBrain({ ...config, ...fallback });

const WORKING: BrainEvent = { type: "working" };

// How a turn's request reaches the provider. The SDK defines it: URL, auth, API version and
// its own headers, exactly as its `create()` sends them, captured once. Each turn then posts its
// body there with one plain fetch: the SDKs' own request path costs several times more per
// request, and under load that showed in the slowest turns (benchmark, realistic load: p99
// added latency 1.6–3.6× the raw relay's through `create()`; see README, Performance). A failure
// the SDKs would retry (no answer; 408, 409, 429, 5xx; or the provider's x-should-retry: true)
// is made once more, at once, through the SDK's `create()`: two requests at most, as with the
// SDKs' own single retry, without their wait (a caller is listening, and the turn's watchdog and
// fallback provider take over from there). Any other error status becomes the SDK's own error.
// After a failure the next turn captures the request afresh (its auth may have changed).
type Post<B> = (body: B, signal: AbortSignal) => Promise<Response>;
/** What sdkPost needs of an SDK's module: its client class and its error factory. */
interface SdkModule<C> {
  default: new (options: { apiKey?: string; baseURL?: string; fetch?: typeof fetch; maxRetries?: number }) => C;
  APIError: {
    generate(status: number, body: object | undefined, message: string | undefined, headers: Headers): Error;
  };
}
function sdkPost<C, B>(
  provider: string,
  module: Promise<SdkModule<C>>,
  options: { apiKey?: string; baseURL?: string },
  create: (client: C, body: B, signal: AbortSignal) => Promise<Response>,
): Post<B> {
  // Only the SDK of a provider in use is loaded: each is about 5 MB of heap that every full GC
  // walks. The import starts with the server, long before the first call; if it fails, that is
  // logged now and each turn apologises.
  module.catch((err) => log("error", "sdk_load_failed", { provider, error: errorText(err) }));
  const client = (more: { fetch?: typeof fetch }) =>
    module.then((sdk) => new sdk.default({ ...options, ...more, maxRetries: 0 }));
  const resend = client({});
  resend.catch(() => {});
  type Shape = { url: string; init: RequestInit & { headers: Record<string, string> } };
  let shape: Promise<Shape> | undefined;
  let captured: Shape | undefined; // the same, once resolved: a turn's request does not wait on a promise
  const capture = async (body: B) => {
    let seen: Shape | undefined;
    // Everything but the body and the signal is kept, fetch options (a proxy) included; not what
    // belongs to one request only (an idempotency key, a trace context), nor the SDK's telemetry
    // (x-stainless-*: the host's OS, CPU, runtime and versions, a retry count), which changes
    // nothing in the answer and, with its 7 header lines on every turn, cost 15% of the p99 in
    // the benchmark (Bun, 500 calls, four interleaved pairs). The user-agent names the SDK still.
    const fetch = (url: string | URL | Request, { body: _, signal: __, ...init }: RequestInit = {}) => {
      const headers = [...new Headers(init.headers)].filter(([name]) => !DROPPED_HEADERS.test(name));
      seen = {
        url: url instanceof Request ? url.url : String(url),
        init: { ...init, headers: Object.fromEntries(headers) },
      };
      return Promise.resolve(new Response(null, { status: 204 }));
    };
    await create(await client({ fetch }), body, new AbortController().signal);
    if (!seen) throw new Error(`${provider}: the SDK made no request`);
    return seen;
  };
  return async (body, signal) => {
    let response: Response | undefined;
    let failure = "";
    try {
      const { url, init } = captured ?? (captured = await (shape ??= capture(body)));
      response = await fetch(url, { ...init, body: JSON.stringify(body), signal });
      if (response.ok) return response;
    } catch (err) {
      if (signal.aborted) throw err;
      failure = errorText(err);
    }
    shape = captured = undefined;
    if (response && !retryable(response)) {
      const text = await textOf(response, MAX_ERROR_CHARS);
      const json = parseJson(text) as object | undefined;
      const { APIError } = await module;
      throw APIError.generate(response.status, json, json ? undefined : text, response.headers);
    }
    response?.body?.cancel().catch(() => {});
    log("warn", "provider_retry", { provider, error: response ? `HTTP ${response.status}` : failure });
    return await create(await resend, body, signal);
  };
}

const DROPPED_HEADERS = /idempotency|^traceparent$|^tracestate$|^baggage$|^x-stainless-/;
const MAX_ERROR_CHARS = 64 * 1024;

/** The SDKs' rule for a failed answer worth one more try. */
function retryable(response: Response) {
  const says = response.headers.get("x-should-retry");
  if (says === "true" || says === "false") return says === "true";
  return [408, 409, 429].includes(response.status) || response.status >= 500;
}

/** At most `max` characters of a response's body; the rest is not read. */
async function textOf(response: Response, max: number) {
  const reader = response.body && bytesOf(response.body);
  const decoder = new TextDecoder();
  let text = "";
  try {
    while (reader && text.length < max) {
      const { value, done } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
    }
  } finally {
    reader?.cancel().catch(() => {});
  }
  return text.slice(0, max);
}

const parseJson = (text: string): unknown => {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
};

function openaiBrain(config: Config): Brain {
  // A dummy key lets keyless OpenAI-compatible servers (Ollama, vLLM) work.
  const options = { apiKey: config.openaiApiKey ?? "none", baseURL: config.openaiBaseUrl };
  const post: Post<OpenAI.ChatCompletionCreateParamsStreaming> = sdkPost(
    "openai",
    import("openai"),
    options,
    (client, body, signal) => client.chat.completions.create(body, { signal }).asResponse(),
  );
  return {
    provider: "openai",
    model: config.model,
    async *stream({ system, messages, tools }, signal) {
      const response = await post({
        model: config.model,
        stream: true,
        messages: toOpenAIMessages(system, messages),
        tools: tools.length ? tools.map((t) => ({ type: "function" as const, function: t })) : undefined,
      }, signal);
      const calls = new ToolCalls();
      let finished = false;
      yield* wordsOf(response, () => finished, ({ data }) => {
        if (data === "[DONE]") {
          finished = true;
          return;
        }
        const chunk = JSON.parse(data) as OpenAI.ChatCompletionChunk & { error?: { message?: string } };
        if (chunk.error) throw new Error(`openai: ${chunk.error.message ?? JSON.stringify(chunk.error)}`);
        const delta = chunk.choices?.[0]?.delta;
        finished ||= Boolean(chunk.choices?.[0]?.finish_reason);
        for (const part of delta?.tool_calls ?? []) {
          calls.add(part.index ?? 0, { id: part.id, name: part.function?.name, args: part.function?.arguments });
        }
        // Reasoning that OpenAI-compatible servers stream before the words is progress too.
        const thinking = delta as { reasoning_content?: unknown; reasoning?: unknown } | undefined;
        const busy = delta?.tool_calls?.length || thinking?.reasoning_content || thinking?.reasoning;
        return delta?.content || (busy ? "" : undefined);
      });
      if (!finished && !signal.aborted) throw new Error("openai: the stream ended before the reply was finished");
      yield* calls.done();
    },
  };
}

function toOpenAIMessages(system: string, messages: Message[]): OpenAI.ChatCompletionMessageParam[] {
  const out: OpenAI.ChatCompletionMessageParam[] = [{ role: "system", content: system }];
  for (const m of messages) {
    const last = out.at(-1)!;
    if (m.role === "user" || m.role === "assistant") out.push({ role: m.role, content: m.text });
    else if (m.role === "tool_result") out.push({ role: "tool", tool_call_id: openaiId(m.id), content: m.content });
    else {
      const call = { id: openaiId(m.id), type: "function" as const, function: { name: m.name, arguments: m.args } };
      if (last.role === "assistant") (last.tool_calls ??= []).push(call);
      else out.push({ role: "assistant", content: null, tool_calls: [call] });
    }
  }
  return out;
}

// OpenAI refuses tool call ids longer than 40 characters; a longer one (from another provider,
// or from the transcript) becomes a short digest of itself, the same for a call and its result.
const openaiId = (id: string) =>
  id.length <= 40 ? id : `call_${createHash("sha256").update(id).digest("hex").slice(0, 35)}`;

function anthropicBrain(config: Config): Brain {
  const options = { apiKey: config.anthropicApiKey, baseURL: config.anthropicBaseUrl };
  const post: Post<Anthropic.MessageCreateParamsStreaming> = sdkPost(
    "anthropic",
    import("@anthropic-ai/sdk"),
    options,
    (client, body, signal) => client.messages.create(body, { signal }).asResponse(),
  );
  return {
    provider: "anthropic",
    model: config.model,
    async *stream({ system, messages, tools }, signal) {
      const response = await post({
        model: config.model,
        max_tokens: 1024,
        stream: true,
        system,
        messages: toClaudeMessages(messages),
        tools: tools.length
          ? tools.map((t) => ({
            name: t.name,
            description: t.description,
            input_schema: t.parameters as Anthropic.Tool.InputSchema,
          }))
          : undefined,
      }, signal);
      const calls = new ToolCalls();
      let finished = false;
      yield* wordsOf(response, () => finished, (message) => {
        if (message.event === "ping") return;
        if (message.event === "message_stop") {
          finished = true;
          return;
        }
        const event = JSON.parse(message.data) as Anthropic.RawMessageStreamEvent | { type: "error"; error: unknown };
        if (event.type === "error") throw new Error(`anthropic: ${JSON.stringify(event.error)}`);
        if (event.type === "content_block_start" && event.content_block.type === "tool_use") {
          const { id, name, input } = event.content_block;
          calls.add(event.index, { id, name, input });
          return "";
        }
        if (event.type !== "content_block_delta") return;
        if (event.delta.type === "text_delta") return event.delta.text;
        if (event.delta.type === "input_json_delta") calls.add(event.index, { args: event.delta.partial_json });
        return "";
      });
      if (!finished && !signal.aborted) throw new Error("anthropic: the stream ended before the reply was finished");
      yield* calls.done();
    },
  };
}

// A reply's tool calls as they stream in, by the provider's index. Whatever the provider
// sends, at most MAX_TOOL_CALLS are kept, with a bounded name and arguments: an odd or huge
// index, a flood of calls or megabytes of arguments cost nothing. Arguments cut short no
// longer parse, and the model is told its arguments were bad. A part with a new id at the
// same index is a new call (some OpenAI-compatible servers send no index, or 0 for every call).
class ToolCalls {
  private readonly calls: { id: string; name: string; args: string; input?: unknown }[] = [];
  private readonly byIndex = new Map<unknown, ToolCalls["calls"][number]>();

  add(index: unknown, part: { id?: unknown; name?: unknown; args?: unknown; input?: unknown }) {
    let call = this.byIndex.get(index);
    const id = typeof part.id === "string" ? part.id.slice(0, 256) : "";
    if (!call || (id && call.id && id !== call.id)) {
      if (this.calls.length >= MAX_TOOL_CALLS) return;
      this.calls.push(call = { id: "", name: "", args: "" });
      this.byIndex.set(index, call);
    }
    if (id) call.id = id;
    if (typeof part.name === "string" && part.name) call.name = part.name.slice(0, 128);
    if (typeof part.args === "string" && call.args.length < MAX_TOOL_ARGS) call.args += part.args;
    if (part.input !== undefined) call.input = part.input;
  }

  *done(): Generator<BrainEvent> {
    for (const { id, name, args, input } of this.calls) {
      const given = args || (input === undefined ? "" : JSON.stringify(input));
      yield { type: "tool_call", id: id || newId("call"), name, args: given.slice(0, MAX_TOOL_ARGS) || "{}" };
    }
  }
}

// The stream of a reply is read here, with one small parser for both providers' server-sent
// events, which costs far less per chunk than the SDKs' own readers. Each event is parsed in
// place and handed to `read` at once, so one event at a time is alive: the ~50 events of a read,
// all parsed before the first was handled, were what a young-generation GC most often found
// alive (on Bun, reading the benchmark's reply 20,000 times: 1 KB marked per collection instead
// of 10, and 8% fewer collections). A network read becomes one text event, so deltas that arrived
// together go to Retell as one frame: the same words at the same time, fewer frames; only a
// turn's first words go out on their own, before the rest of their read is parsed. `read`
// handles one event and returns its words, "" for progress without words (a tool call being
// written), or undefined for an event that is no progress (a keep-alive ping): only progress
// resets the turn's watchdog, so a provider that sends nothing but pings still times out.
// The reply ends when `finished` says so, even if the provider leaves the stream open.
async function* wordsOf(
  response: Response,
  finished: () => boolean,
  read: (event: ServerSentEvent) => string | undefined,
): AsyncGenerator<BrainEvent> {
  const reader = bytesOf(response.body!);
  const decoder = new TextDecoder();
  let buffer = "";
  let said = false;
  try {
    while (true) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      // CRLF line ends become LF; a CR at the very end may still be half of a CRLF.
      if (buffer.includes("\r")) buffer = buffer.replace(/\r\n|\r(?!$)/g, "\n");
      let text = "";
      let progress = false;
      let start = 0;
      for (let end = buffer.indexOf("\n\n"); end >= 0; end = buffer.indexOf("\n\n", start)) {
        const event = parseEvent(buffer, start, end);
        start = end + 2;
        const words = event && read(event);
        if (words !== undefined) progress = true, text += words;
        if (finished()) break;
        if (text && !said) {
          said = true;
          yield { type: "text", text };
          text = "";
        }
      }
      buffer = buffer.slice(start);
      if (buffer.length > MAX_EVENT_CHARS) throw new Error("the provider sent an event of over 4 MB");
      if (text) yield { type: "text", text };
      else if (progress) yield WORKING;
      if (finished()) return;
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

type ServerSentEvent = { event?: string; data: string };

// A reply is read into a buffer of ours, handed back after the turn for the next one. Deno gives
// each plain read of a fetched body a fresh 64 KiB buffer outside the JS heap, and that memory,
// more than the heap, is what set off its full collections: one every ~130 replies, each a
// 10–40 ms stall of every call on a one-core machine. Read into a buffer we pass (a BYOB reader),
// the same memory serves every read (32 buffers kept, 2 MB at most), so a read's bytes are good
// only until the next read or cancel. Bodies that are not byte streams (Bun's) are read plainly.
const READ_BYTES = 64 * 1024; // what Deno reads at a time anyway
const spareBuffers: ArrayBuffer[] = [];

export function bytesOf(
  body: ReadableStream<Uint8Array>,
): Pick<ReadableStreamDefaultReader<Uint8Array>, "read" | "cancel"> {
  let reader: ReadableStreamBYOBReader;
  try {
    reader = body.getReader({ mode: "byob" });
  } catch {
    return body.getReader();
  }
  // Undefined while a read holds it, and after a failed read: only a buffer back in our hands is
  // reused.
  let buffer: ArrayBuffer | undefined = spareBuffers.pop() ?? new ArrayBuffer(READ_BYTES);
  return {
    async read() {
      const view = new Uint8Array(buffer ?? new ArrayBuffer(READ_BYTES));
      buffer = undefined;
      const result = await reader.read(view);
      buffer = result.value?.buffer as ArrayBuffer | undefined;
      return result as ReadableStreamReadResult<Uint8Array>;
    },
    cancel() {
      if (buffer?.byteLength === READ_BYTES && spareBuffers.length < 32) spareBuffers.push(buffer);
      buffer = undefined;
      return reader.cancel();
    },
  };
}

/** The event in text[start, end): its lines, read in place. */
function parseEvent(text: string, start: number, end: number): ServerSentEvent | undefined {
  let event: string | undefined;
  let data: string | undefined;
  for (let line = start; line < end;) {
    let eol = text.indexOf("\n", line);
    if (eol < 0 || eol > end) eol = end;
    const colon = text.indexOf(":", line);
    if (colon > line && colon < eol) { // else a comment, or a line without a field
      const value = text.slice(text.charCodeAt(colon + 1) === 32 ? colon + 2 : colon + 1, eol);
      if (colon - line === 4 && text.startsWith("data", line)) data = data === undefined ? value : `${data}\n${value}`;
      else if (colon - line === 5 && text.startsWith("event", line)) event = value;
    }
    line = eol + 1;
  }
  return data === undefined ? undefined : { event, data };
}

// Claude wants alternating roles starting with the user, tool results first in their turn.
export function toClaudeMessages(messages: Message[]): Anthropic.MessageParam[] {
  type Block = Anthropic.TextBlockParam | Anthropic.ToolUseBlockParam | Anthropic.ToolResultBlockParam;
  const out: { role: "user" | "assistant"; content: Block[] }[] = [];
  const add = (role: "user" | "assistant", block: Block) => {
    const last = out.at(-1);
    if (last?.role === role) last.content.push(block);
    else out.push({ role, content: [block] });
  };
  for (const m of messages) {
    if (m.role === "user" || m.role === "assistant") add(m.role, { type: "text", text: m.text });
    else if (m.role === "tool_call") {
      add("assistant", { type: "tool_use", id: claudeId(m.id), name: m.name, input: parseObject(m.args) });
    } else add("user", { type: "tool_result", tool_use_id: claudeId(m.id), content: m.content });
  }
  if (out[0]?.role !== "user") {
    out.unshift({ role: "user", content: [{ type: "text", text: "(The call has started.)" }] });
  }
  if (out.at(-1)?.role !== "user") out.push({ role: "user", content: [{ type: "text", text: "(Go on.)" }] });
  for (const turn of out) {
    if (turn.role === "user") {
      turn.content.sort((a, b) => Number(b.type === "tool_result") - Number(a.type === "tool_result"));
    }
  }
  return out;
}

const claudeId = (id: string) => id.replace(/[^a-zA-Z0-9_-]/g, "_").slice(0, 64) || "tool";

function parseObject(json: string): Record<string, unknown> {
  try {
    const value = JSON.parse(json || "{}");
    return value && typeof value === "object" && !Array.isArray(value) ? value : {};
  } catch {
    return {};
  }
}

// With no API key, a tiny offline brain answers, so the first run works without any account.
// It knows the clinic's tools by keyword: "is Monday free?", "book 10:30, my name is Ana",
// "a person please", "bye". Everything else gets a hint.
function demoBrain(config: Config): Brain {
  return {
    provider: "demo",
    model: config.model,
    async *stream({ messages }) {
      const last = messages.at(-1);
      if (last?.role === "tool_result") return yield* words(demoSummary(last.content));
      const heard = last?.role === "user" ? last.text : "";
      if (heard.startsWith("(")) return yield* words("Are you still there?"); // a reminder
      const call = demoToolCall(heard, messages);
      if (call) return yield { type: "tool_call", id: newId("demo"), name: call.name, args: JSON.stringify(call.args) };
      yield* words("I'm the offline demo brain. I can check a day, book a time, get you a person, or say goodbye.");
    },
  };
}

function demoToolCall(heard: string, messages: Message[]): { name: string; args: object } | undefined {
  const said = heard.toLowerCase();
  const date = demoDate(said);
  const time = said.replace(/\d{4}-\d{2}-\d{2}/, "").match(/\b(\d{1,2})(?::(\d{2}))?\s*(am|pm)?\b/);
  if (/\b(bye|goodbye|hang up)\b/.test(said)) {
    return { name: "end_call", args: { message: "Thanks for calling. Goodbye!" } };
  }
  if (/\b(human|person|someone|transfer)\b/.test(said)) {
    return { name: "transfer_call", args: { message: "Connecting you now." } };
  }
  const day = date ?? demoLastDate(messages);
  if (/\bbook\b/.test(said) && day && time && (time[2] || time[3])) {
    const hour = Number(time[1]) + (time[3] === "pm" && Number(time[1]) < 12 ? 12 : 0);
    const name = heard.match(/my name is ([\p{L} '-]+)/iu)?.[1].trim() ?? "the caller";
    return {
      name: "book_appointment",
      args: { date: day, time: `${String(hour).padStart(2, "0")}:${time[2] ?? "00"}`, name },
    };
  }
  if (date) return { name: "check_availability", args: { date } };
}

// A date said as 2030-01-07, or as a weekday (the next one).
function demoDate(said: string): string | undefined {
  const iso = said.match(/\b\d{4}-\d{2}-\d{2}\b/)?.[0];
  if (iso) return iso;
  const day = ["sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"].findIndex((d) =>
    said.includes(d)
  );
  if (day < 0) return undefined;
  const date = new Date();
  date.setUTCDate(date.getUTCDate() + ((day - date.getUTCDay() + 7) % 7 || 7));
  return date.toISOString().slice(0, 10);
}

// "Book 10:30" after a check of a day books that day.
function demoLastDate(messages: Message[]): string | undefined {
  const call = messages.findLast((m): m is ToolCall => m.role === "tool_call" && m.name === "check_availability");
  const date = call && parseObject(call.args).date;
  return typeof date === "string" ? date : undefined;
}

function demoSummary(content: string): string {
  const result = parseObject(content);
  if (result.error) return "Sorry, I couldn't do that.";
  if (result.booked) {
    return `You're booked for ${result.date} at ${result.time}. Your confirmation is ${result.confirmation}.`;
  }
  if (Array.isArray(result.open_times)) {
    const times = result.open_times as string[];
    return times.length
      ? `On ${result.date} I have ${times.join(", ")}. Which suits you?`
      : `Sorry, ${result.date} is fully booked or closed.`;
  }
  return "Done.";
}

async function* words(text: string): AsyncGenerator<BrainEvent> {
  for (const word of text.match(/\S+\s*/g) ?? []) {
    await new Promise((resolve) => setTimeout(resolve, 5));
    yield { type: "text", text: word };
  }
}

// Tool JSON Schemas for both providers come from the same zod schemas, computed once.
const toolSpecs = (tools: Tool[]): ToolSpec[] =>
  tools.map(({ name, description, schema }) => {
    const { $schema: _, ...parameters } = z.toJSONSchema(schema, { io: "input" });
    return { name, description, parameters };
  });

// 6. From Retell's transcript to provider messages -----------------------------------------
// Stateless: every turn rebuilds the prompt from the full transcript Retell sends, so a
// reconnect to any instance continues the call. Tool calls come back from
// transcript_with_tool_calls, each followed by its result.
const MAX_ITEM_CHARS = 4_000;
const MAX_PROMPT_CHARS = 120_000;

export function toMessages(items: readonly (Item | null)[]): Message[] {
  const results = new Map<string, string>();
  for (const item of items) {
    if (item?.role === "tool_call_result" && item.tool_call_id) {
      results.set(item.tool_call_id, clip(item.content ?? ""));
    }
  }
  const out: Message[] = [];
  const seen = new Set<string>();
  let pending: ToolCall[] = [];
  const flush = () => {
    for (const c of pending) {
      out.push({ role: "tool_result", id: c.id, content: results.get(c.id) ?? "(no result was recorded)" });
    }
    pending = [];
  };
  for (const item of items) {
    if (!item || item.role === "tool_call_result") continue;
    if (item.role === "tool_call_invocation") {
      if (!item.tool_call_id || !item.name || seen.has(item.tool_call_id)) continue;
      seen.add(item.tool_call_id);
      const call: ToolCall = {
        role: "tool_call",
        id: item.tool_call_id,
        name: item.name,
        args: clip(item.arguments ?? "{}"),
      };
      out.push(call);
      pending.push(call);
      continue;
    }
    flush();
    const text = clip(item.content?.trim() ?? "");
    if (!text) continue;
    if (item.role === "agent") out.push({ role: "assistant", text });
    else if (item.role === "user" || item.role === "transfer_target") out.push({ role: "user", text });
  }
  flush();
  return trimToBudget(out);
}

const clip = (s: string) => (s.length > MAX_ITEM_CHARS ? s.slice(0, MAX_ITEM_CHARS) + "…" : s);
const size = (
  m: Message,
) => (m.role === "tool_call" ? m.args.length : m.role === "tool_result" ? m.content.length : m.text.length);

// A very long call keeps its newest part, and always its newest message.
function trimToBudget(messages: Message[]): Message[] {
  let total = 0;
  let start = messages.length;
  while (start > 0 && total + size(messages[start - 1]) <= MAX_PROMPT_CHARS) total += size(messages[--start]);
  if (start === 0) return messages;
  start = Math.min(start, messages.length - 1);
  // Each round of tool calls is one run here, its calls then their results; a cut inside a
  // run would part a call from its result, which the providers refuse. So the run goes
  // whole, or, when nothing but the run would be left, it stays whole.
  const tool = (i: number) => messages[i].role === "tool_call" || messages[i].role === "tool_result";
  if (tool(start) && tool(start - 1)) {
    let after = start;
    while (after < messages.length && tool(after)) after++;
    if (after < messages.length) return messages.slice(after);
    while (start > 0 && tool(start - 1)) start--;
    return newestCalls(messages.slice(start));
  }
  return messages.slice(start);
}

// A run of tool calls and results too long for the budget keeps its newest calls that fit,
// each with its result.
function newestCalls(run: Message[]): Message[] {
  const results = new Map<string, Message>();
  for (const m of run) if (m.role === "tool_result") results.set(m.id, m);
  const keep = new Set<Message>();
  let total = 0;
  for (let i = run.length - 1; i >= 0; i--) {
    const call = run[i];
    if (call.role !== "tool_call") continue;
    const result = results.get(call.id);
    total += size(call) + (result ? size(result) : 0);
    if (total > MAX_PROMPT_CHARS && keep.size) break;
    keep.add(call);
    if (result) keep.add(result);
  }
  return run.filter((m) => keep.has(m));
}

const SLOT = /\{\{\s*([\w.-]+)\s*\}\}/g;
const BUILT_IN_SLOTS = ["agent_name", "current_time", "call_id"];

export function fillSlots(template: string, vars: Readonly<Record<string, string>>, missing: string): string {
  return template.replace(SLOT, (_, name: string) => vars[name] ?? missing);
}

const needsCallVariables = (template: string) =>
  [...template.matchAll(SLOT)].some(([, name]) => !BUILT_IN_SLOTS.includes(name));

// A greeting whose variable is missing still reads well: "Hi {{name}}!" becomes "Hi!".
const tidy = (s: string) => s.replace(/\s+([!?.,])/g, "$1").replace(/\s{2,}/g, " ").trim();

// 7. The call -----------------------------------------------------------------------------
type Outcome = "completed" | "superseded" | "error" | "timeout";

export interface AppOptions {
  config?: Config;
  store?: StateStore;
  brain?: Brain;
  fallback?: Brain;
  tools?: Tool[];
  persona?: Persona;
}

interface Deps {
  config: Config;
  brain: Brain;
  fallback?: Brain;
  tools: Map<string, Tool>;
  specs: ToolSpec[];
  persona: Persona;
  greeted: Set<string>;
  /** The store shared by all instances, when there is one (STATE_URL). */
  shared?: StateStore;
  once: OnceStore;
  /** Actions sent, by call and tool call id, so one the caller talked over can be sent again. */
  actions: Map<string, CallAction>;
  live: Set<Call>;
  metrics: Metrics;
  /** Set on SIGTERM: no new calls, the live ones go on until they end. */
  draining: boolean;
}

/** What a tool call came to: the text the model reads, and the action it asks for. */
interface ToolResult {
  content: string;
  ok: boolean;
  action?: CallAction;
}

/** Where side-effect records live, chosen by STATE_URL: this process (the default), Redis
 * or Deno KV (fleet.ts). Instances sharing a store never run the same side effect twice. */
export interface StateStore {
  get(key: string): Promise<string | undefined>;
  /** Sets `key` only if it is not set yet; true if this call set it. */
  setIfAbsent(key: string, value: string, ttlMs: number): Promise<boolean>;
  delete(key: string): Promise<void>;
}

/** The default store: a map in this process, with expiry. */
export class MemoryStore implements StateStore {
  private readonly entries = new Map<string, { value: string; expires: number }>();

  get(key: string) {
    const entry = this.entries.get(key);
    if (entry && entry.expires < Date.now()) this.entries.delete(key);
    return Promise.resolve(entry && entry.expires >= Date.now() ? entry.value : undefined);
  }

  async setIfAbsent(key: string, value: string, ttlMs: number) {
    if (await this.get(key) !== undefined) return false;
    this.entries.set(key, { value, expires: Date.now() + ttlMs });
    if (this.entries.size > 10_000) this.forgetExpired();
    return true;
  }

  // Expired records go first; only a store far past any real load drops its oldest.
  private forgetExpired() {
    const now = Date.now();
    for (const [key, { expires }] of this.entries) if (expires < now) this.entries.delete(key);
    while (this.entries.size > 100_000) this.entries.delete(this.entries.keys().next().value!);
  }

  delete(key: string) {
    this.entries.delete(key);
    return Promise.resolve();
  }
}

/** A state store that could not be reached: side-effect tools then refuse to act. */
export class StoreDown extends Error {}

// A result read back from the shared store is checked like any input: anything but what
// OnceStore wrote (text, a flag and at most a well-formed action) is treated as a store that
// is not working.
const StoredResult = z.object({
  content: z.string(),
  ok: z.boolean(),
  action: z.object({
    message: z.string(),
    flags: z.strictObject({
      end_call: z.literal(true).optional(),
      transfer_number: z.string().regex(E164).optional(),
      digit_to_press: z.string().regex(KEYS).optional(),
    }).nullish().transform((flags) => flags ?? {}),
  }).optional(),
});

function storedResult(raw: unknown): ToolResult {
  let json: unknown;
  try {
    json = JSON.parse(String(raw));
  } catch {
    throw new StoreDown("the state store returned a record that is not JSON");
  }
  const parsed = StoredResult.safeParse(json);
  if (!parsed.success) throw new StoreDown("the state store returned a record this server did not write");
  const { content, ok, action } = parsed.data;
  return { content, ok, ...(action && { action: new CallAction(action.message, action.flags) }) };
}

/** Runs a side-effect tool at most once per call and arguments. A repeat in this process
 * shares the running promise; another instance finds the claim in the shared store and waits
 * for its result, until its caller gives up. A run that failed releases its claim, so it may
 * be tried again; a run that succeeded never does. */
class OnceStore {
  private readonly running = new Map<string, Promise<ToolResult>>();
  private readonly results = new Map<string, ToolResult>();
  private saving = 0;

  constructor(private readonly store: StateStore, private readonly claimMs: number) {}

  /** True while a side effect started here is still running or its result unsaved (a drain waits). */
  get busy() {
    return this.running.size > 0 || this.saving > 0;
  }

  run(key: string, act: () => Promise<ToolResult>, waitMs: number): Promise<ToolResult> {
    const known = this.running.get(key);
    if (known) return known;
    const result = this.claimOrWait(key, act, Date.now() + waitMs);
    this.running.set(key, result);
    result.then(() => this.running.delete(key), () => this.running.delete(key));
    return result;
  }

  private async claimOrWait(key: string, act: () => Promise<ToolResult>, giveUp: number): Promise<ToolResult> {
    while (Date.now() < giveUp) {
      const here = this.results.get(key);
      if (here) return here;
      const done = await this.safely(() => this.store.get(`${key}:result`), giveUp);
      if (done !== undefined) return storedResult(done);
      // The claim does not lapse on its own: a run that failed releases it, and a run whose
      // instance died leaves it, so its repeats are refused ("may or may not have happened")
      // rather than run a second time.
      if (await this.safely(() => this.store.setIfAbsent(`${key}:claim`, "running", ONCE_TTL_MS), giveUp)) {
        return await this.act(key, act);
      }
      await new Promise((resolve) => setTimeout(resolve, 50)); // another instance is running it
    }
    throw new TimeoutError("it is still running elsewhere");
  }

  // Every wait here has an end, so a hung store or a tool that ignores its abort signal
  // cannot keep a run "running" (and a drain waiting) for ever. A run given up this way keeps
  // its claim: repeats are told the outcome is unknown.
  private async act(key: string, act: () => Promise<ToolResult>): Promise<ToolResult> {
    const release = () => withTimeout(this.store.delete(`${key}:claim`), STORE_WAIT_MS, "store").catch(() => {});
    let result: ToolResult;
    try {
      result = await withTimeout(act(), this.claimMs, "it took too long");
    } catch (err) {
      if (!(err instanceof TimeoutError)) await release();
      throw err;
    }
    if (!result.ok) await release();
    else {
      // Done is done: the result is kept for repeats, here at once and in the store as soon
      // as it answers (retried over a reconnect); the claim is never released.
      remember(this.results, key, result);
      this.saving++;
      void this.save(key, result).finally(() => this.saving--);
    }
    return result;
  }

  private async save(key: string, result: ToolResult) {
    const keep = () => this.store.setIfAbsent(`${key}:result`, JSON.stringify(result), ONCE_TTL_MS);
    for (let attempt = 0; attempt < 5; attempt++) {
      // Already there is saved too: only the holder of the claim writes this record, so it is
      // an earlier attempt whose answer was lost.
      if (await withTimeout(keep(), STORE_WAIT_MS, "store").then(() => true, () => false)) return;
      await new Promise((resolve) => setTimeout(resolve, 100 * 2 ** attempt));
    }
    log("error", "once_result_not_saved", { key });
  }

  private async safely<T>(op: () => Promise<T>, giveUp: number): Promise<T> {
    try {
      return await withTimeout(op(), Math.max(1, Math.min(STORE_WAIT_MS, giveUp - Date.now())), "no answer");
    } catch (err) {
      throw new StoreDown(`the state store is unreachable (${errorText(err)})`);
    }
  }
}

interface Peer {
  send(data: string): void;
}

const GREETING_WAIT_MS = 1000;
const GREETED_MS = 12 * 3600_000; // longer than any call
const ONCE_TTL_MS = 6 * 60 * 60 * 1000;
const STORE_WAIT_MS = 2000; // the longest one store operation may take
const MAX_BARGE_IN_WORDS = 5;
const MAX_BARGE_IN_CHARS = 100;
const MAX_TOOL_ROUNDS = 4;
const MAX_TOOL_CALLS = 16; // per model reply
const MAX_TOOL_ARGS = 32_000;
const MAX_EVENT_CHARS = 4 * 1024 * 1024;
const MAX_FRAME_CHARS = 16 * 1024 * 1024;
const MAX_BAD_FRAME_LOGS = 20;
const MAX_VARS = 100;

class TimeoutError extends Error {}

const greetedKey = (callId: string) => `greeted:${callId}`;
const NOT_GREETED = Promise.resolve(false);

/** Whether another instance greeted this call (a reconnect); unknown counts as no. */
function greetedElsewhere(shared: StateStore | undefined, callId: string): Promise<boolean> {
  if (!shared) return NOT_GREETED;
  return withTimeout(shared.get(greetedKey(callId)), 500, "store").then((v) => v !== undefined, () => false);
}

/** One Retell connection. A reconnect is a new Call with the same id. */
class Call {
  vars: Record<string, string>;
  private turn?: Turn;
  private latestId = -1;
  private greetTimer?: ReturnType<typeof setTimeout>;
  private greetedBefore = NOT_GREETED;
  private ended = false;
  private greetingDone = false;
  private settingsSent = false;
  private badFrames = 0;
  private readonly opened = performance.now();

  constructor(readonly id: string, readonly peer: Peer, readonly deps: Deps) {
    this.vars = { call_id: id };
  }

  send(frame: Outbound) {
    this.peer.send(JSON.stringify(frame));
  }

  open() {
    this.deps.live.add(this);
    log("info", "call_open", { call_id: this.id, live_calls: this.deps.live.size });
    this.send(CONFIG_FRAME);
    // UNCERTAIN in Retell's docs: whether a reconnect expects the greeting again. A call that
    // this instance, or with STATE_URL any instance, greeted before gets an empty id-0
    // response: Retell is not kept waiting and the caller does not hear the greeting twice.
    // Nothing else says "reconnect": call_details carries the call as it was registered.
    if (this.deps.greeted.has(this.id)) return this.greet("");
    this.greetedBefore = greetedElsewhere(this.deps.shared, this.id);
    void this.greetedBefore.then((before) => before && this.greet(""));
    if (needsCallVariables(this.deps.persona.greeting)) {
      this.greetTimer = setTimeout(() => this.greetNow(), GREETING_WAIT_MS);
    } else this.greetNow();
  }

  private greetNow() {
    void this.greetedBefore.then((before) => this.greet(before ? "" : this.greeting()));
  }

  closed(code: number) {
    this.ended = true;
    this.stopGreetTimer();
    this.turn?.abort("closed");
    this.deps.live.delete(this);
    const seconds = Math.round(performance.now() - this.opened) / 1000;
    log("info", "call_close", {
      call_id: this.id,
      code,
      seconds,
      bad_frames: this.badFrames,
      live_calls: this.deps.live.size,
    });
  }

  // The timer goes with its reference: a fired or cleared timer kept by each open call is
  // memory per call and one more object for every garbage collection to visit.
  private stopGreetTimer() {
    clearTimeout(this.greetTimer);
    this.greetTimer = undefined;
  }

  receive(data: unknown) {
    if (typeof data !== "string") return this.reject("binary frame");
    // Far above any real call's transcript; parsing more would hold every other call up.
    if (data.length > MAX_FRAME_CHARS) return this.reject("frame over 16 MB", data.length);
    let json: unknown;
    try {
      json = JSON.parse(data);
    } catch {
      return this.reject("invalid JSON", data.length);
    }
    // A ping, the most frequent frame (every call, every 2 s), is answered before any other
    // check, and always, even a malformed one: a missed pong costs the call.
    const frame = (json ?? {}) as Record<string, unknown>;
    const type = frame.interaction_type;
    if (type === "ping_pong") {
      // Echoed as JSON: 1e999 parses to Infinity, which JSON cannot carry.
      const timestamp = Number.isFinite(frame.timestamp) ? frame.timestamp as number : Date.now();
      return this.peer.send(`{"response_type":"ping_pong","timestamp":${timestamp}}`);
    }
    if (type === "response_required" || type === "reminder_required") {
      const id = frame.response_id;
      if (!Number.isSafeInteger(id) || (id as number) < 0) {
        return this.reject("response_id: expected an integer of 0 or more", data.length);
      }
      const { transcript, transcript_with_tool_calls: withTools } = frame;
      const items = Array.isArray(withTools) && withTools.length ? withTools : transcript;
      return this.startTurn(id as number, type === "reminder_required", Array.isArray(items) ? items : []);
    }
    const parsed = Inbound.safeParse(json);
    if (!parsed.success) {
      const issue = parsed.error.issues[0];
      return this.reject(`${issue?.path.join(".") || "frame"}: ${issue?.message}`, data.length);
    }
    this.handle(parsed.data);
  }

  // An update_only frame (the transcript so far, nothing to answer) needs nothing.
  private handle(frame: Inbound) {
    if (frame.interaction_type !== "call_details") return;
    this.vars = { ...readVars(frame.call?.retell_llm_dynamic_variables), call_id: this.id };
    this.greetNow();
  }

  /** The call's dynamic variables plus {{current_time}}, for the greeting and the prompt. */
  slots() {
    return { ...this.vars, agent_name: this.deps.persona.name, current_time: now(this.deps.persona.timezone) };
  }

  private greeting() {
    return tidy(fillSlots(this.deps.persona.greeting, this.slots(), ""));
  }

  private greet(text: string) {
    this.stopGreetTimer();
    if (this.greetingDone || this.ended) return;
    this.send({ response_type: "response", response_id: 0, content: text, content_complete: true });
    this.pastGreeting();
    this.sendAgentSettings();
  }

  // Greeted, or the caller spoke first: either way a reconnect must not greet.
  private pastGreeting() {
    this.greetingDone = true;
    this.deps.greeted.add(this.id);
    if (this.deps.greeted.size > 10_000) this.deps.greeted.delete(this.deps.greeted.values().next().value!);
    this.deps.shared?.setIfAbsent(greetedKey(this.id), "1", GREETED_MS).catch(() => {});
  }

  // The persona's Retell agent settings go right after the begin message, so the opening
  // reads config, then response 0, as Retell's docs describe it.
  private sendAgentSettings() {
    const settings = this.deps.persona.agentSettings;
    if (this.settingsSent || !settings || !Object.keys(settings).length) return;
    this.settingsSent = true;
    this.send({ response_type: "update_agent", agent_config: settings });
  }

  // `items`: the transcript with tool calls when Retell sends it (the config frame asks), else
  // the plain transcript.
  private startTurn(id: number, reminder: boolean, items: unknown[]) {
    if (id <= this.latestId) {
      return log("debug", "stale_request", { call_id: this.id, response_id: id, latest: this.latestId });
    }
    this.latestId = id;
    // A request means Retell is past the greeting; sending one now would be stale.
    if (!this.greetingDone) this.pastGreeting();
    this.stopGreetTimer();
    this.sendAgentSettings();
    const superseding = this.turn?.live;
    this.turn?.abort("superseded");
    const turn = this.turn = new Turn(this, id, reminder);
    const start = () =>
      turn.run(items.map(readItem)).catch((err) =>
        log("error", "turn_crashed", { call_id: this.id, response_id: turn.id, error: String(err) })
      ).finally(() => {
        // A finished turn is let go at once: held until the next request (seconds later), what
        // it still references outlives young-generation GCs and makes each of them slower.
        if (this.turn === turn) this.turn = undefined;
      });
    // Over a turn still streaming, the new one starts after one trip through the event loop,
    // so the runtime closes the old upstream stream first instead of after the new request.
    if (superseding) setTimeout(start, 0);
    else start();
  }

  private reject(reason: string, bytes?: number) {
    if (++this.badFrames <= MAX_BAD_FRAME_LOGS) {
      log("warn", "bad_frame", { call_id: this.id, reason: reason.slice(0, 200), bytes });
    }
    if (this.badFrames === MAX_BAD_FRAME_LOGS) log("warn", "bad_frame_logs_suppressed", { call_id: this.id });
  }
}

function readVars(raw: Record<string, unknown> | null | undefined): Record<string, string> {
  const vars: Record<string, string> = {};
  for (const [key, value] of Object.entries(raw ?? {}).slice(0, MAX_VARS)) {
    if (["string", "number", "boolean"].includes(typeof value)) vars[key.slice(0, 64)] = String(value).slice(0, 1000);
  }
  return vars;
}

/** One response_id: streams the model's words until content_complete, or until superseded. */
class Turn {
  private readonly controller = new AbortController();
  private readonly started = performance.now();
  private complete = false;
  private spoke = false; // anything said in this turn, a holding line included
  private brain: Brain;
  private fillerTimer?: ReturnType<typeof setTimeout>;
  private stats = { ttft: undefined as number | undefined, chars: 0, tools: [] as string[] };
  private readonly framePrefix: string;

  constructor(readonly call: Call, readonly id: number, readonly reminder: boolean) {
    this.brain = call.deps.brain;
    this.framePrefix = `{"response_type":"response","response_id":${id},"content":`;
  }

  get signal() {
    return this.controller.signal;
  }

  abort(reason: "superseded" | "closed") {
    this.controller.abort(reason);
  }

  /** True until the turn has completed or been superseded. */
  get live() {
    return !this.complete && !this.signal.aborted;
  }

  send(frame: Outbound) {
    if (this.live) this.call.send(frame);
  }

  // The hot path: one frame per streamed chunk, built without an object to serialise.
  private sayChunk(content: string) {
    if (this.live) this.call.peer.send(`${this.framePrefix}${JSON.stringify(content)},"content_complete":false}`);
    this.spoke = true;
  }

  say(content: string, complete: boolean, flags: Flags = {}) {
    if (!this.live) return;
    this.call.send({ response_type: "response", response_id: this.id, content, content_complete: complete, ...flags });
    this.spoke ||= content !== "";
    this.complete = complete;
  }

  async run(items: readonly (Item | null)[]) {
    const { persona } = this.call.deps;
    if (this.signal.aborted) return this.logTurn("superseded"); // superseded before it started
    let outcome: Outcome;
    try {
      // Nearly every turn has no action to check, and then nothing is awaited before the request.
      const pending = unfinishedAction(items, this.call.deps, this.context());
      const due = pending && await pending;
      if (this.signal.aborted) outcome = "superseded"; // while an action was being rebuilt
      else if (due) {
        this.stats.tools.push(due.tool);
        this.say("", true, due.action.flags);
        log("info", "action_reissued", { call_id: this.call.id, response_id: this.id, tool: due.tool });
        outcome = "completed";
      } else {
        const messages = toMessages(items);
        if (this.reminder) messages.push({ role: "user", text: persona.reminder });
        outcome = await this.converse(messages);
      }
    } catch (err) {
      outcome = this.signal.aborted ? "superseded" : err instanceof TimeoutError ? "timeout" : "error";
      if (outcome !== "superseded") {
        log("error", "turn_failed", { call_id: this.call.id, response_id: this.id, outcome, error: errorText(err) });
        this.say((this.spoke ? " " : "") + persona.apology, true);
      }
    } finally {
      clearTimeout(this.fillerTimer);
      this.say("", true); // never leave Retell waiting, whatever happened above
    }
    this.logTurn(outcome);
  }

  private logTurn(outcome: Outcome) {
    const { metrics } = this.call.deps;
    const seconds = (performance.now() - this.started) / 1000;
    metrics.count("retell_turns_total", { outcome });
    metrics.observe("retell_turn_seconds", seconds);
    if (this.stats.ttft !== undefined) metrics.observe("retell_first_token_seconds", this.stats.ttft / 1000);
    log("info", "turn", {
      call_id: this.call.id,
      response_id: this.id,
      kind: this.reminder ? "reminder" : "response",
      provider: this.brain.provider,
      model: this.brain.model,
      ttft_ms: this.stats.ttft === undefined ? null : Math.round(this.stats.ttft),
      total_ms: Math.round(performance.now() - this.started),
      chars: this.stats.chars,
      tools: this.stats.tools,
      outcome,
      ...(outcome === "superseded" && { by: this.signal.reason }),
      ...(this.brain === this.call.deps.fallback && { fallback: true }),
    });
  }

  // Model, then tools, then model again with their results, until it answers in words.
  private async converse(messages: Message[]): Promise<Outcome> {
    const { deps } = this.call;
    const system = fillSlots(deps.persona.prompt, this.call.slots(), "unknown");
    for (let round = 0; round < MAX_TOOL_ROUNDS; round++) {
      const { text, calls } = await this.whileHolding(() => this.streamRound({ system, messages, tools: deps.specs }));
      if (this.signal.aborted) return "superseded";
      if (!calls.length) {
        this.say("", true);
        return "completed";
      }
      // An action asked for beside other tools waits: the model first hears their results.
      const waits = (c: ToolCall) => calls.length > 1 && Boolean(deps.tools.get(c.name)?.action);
      const results = await this.whileHolding(() => Promise.all(calls.map((c) => this.runTool(c, waits(c)))));
      if (this.signal.aborted) return "superseded";
      const action = results.find((r) => r.action)?.action;
      if (action) {
        this.say(action.message, true, { ...action.flags, no_interruption_allowed: true });
        return "completed";
      }
      // The next round sees what was already said, the calls, then all their results.
      if (text.trim()) messages.push({ role: "assistant", text: text.trim() });
      messages.push(
        ...calls,
        ...calls.map((c, i) => ({ role: "tool_result" as const, id: c.id, content: results[i].content })),
      );
    }
    throw new Error(`the model was still calling tools after ${MAX_TOOL_ROUNDS} rounds`);
  }

  // When the caller has waited FILLER_AFTER_MS since the request, on the model or on a tool,
  // say a holding line: once per turn and never after words have started.
  private async whileHolding<T>(work: () => Promise<T>): Promise<T> {
    const { persona, config } = this.call.deps;
    if (!this.spoke) {
      const line = persona.holding[Math.floor(Math.random() * persona.holding.length)];
      const wait = Math.max(0, config.fillerAfterMs - (performance.now() - this.started));
      this.fillerTimer = setTimeout(() => line && !this.spoke && this.say(`${line} `, false), wait);
    }
    try {
      return await work();
    } finally {
      clearTimeout(this.fillerTimer);
    }
  }

  // One model reply; if the provider fails before saying anything and a fallback provider is
  // set, the same request goes to the fallback, which then answers the rest of the turn.
  private async streamRound(request: BrainRequest): Promise<{ text: string; calls: ToolCall[] }> {
    const { fallback, metrics } = this.call.deps;
    const said = this.stats.chars;
    try {
      return await this.streamModel(this.brain, request);
    } catch (err) {
      if (this.signal.aborted) throw err;
      metrics.count("retell_provider_errors_total", { provider: this.brain.provider });
      if (!fallback || this.brain === fallback || this.stats.chars > said) throw err;
      log("warn", "provider_fallback", {
        call_id: this.call.id,
        response_id: this.id,
        from: this.brain.provider,
        to: fallback.provider,
        error: errorText(err),
      });
      this.brain = fallback;
      return await this.streamRound(request);
    }
  }

  // Streams one model reply as response frames; returns its words and tool calls. A
  // watchdog turns a slow first token, or a stream that stalls, into a TimeoutError, and so
  // does a reply that goes on for 5× that limit without a word (only tool-call arguments or
  // thinking trickling in): the caller is not left in silence for as long as it lasts.
  private async streamModel(brain: Brain, request: BrainRequest) {
    const limit = this.call.deps.config.firstTokenTimeoutMs;
    const model = new AbortController();
    const stop = () => model.abort(this.signal.reason);
    this.signal.addEventListener("abort", stop);
    if (this.signal.aborted) stop();
    let last = performance.now();
    let said = last;
    let timer: ReturnType<typeof setTimeout>;
    const watch = (ms: number) =>
      timer = setTimeout(() => {
        const now = performance.now();
        const idle = now - last;
        const wordless = now - said;
        if (idle >= limit) model.abort(new TimeoutError(`${brain.provider} sent nothing for ${Math.round(idle)} ms`));
        else if (wordless >= 5 * limit) {
          model.abort(new TimeoutError(`${brain.provider} said no words for ${Math.round(wordless)} ms`));
        } else watch(Math.min(limit - idle, 5 * limit - wordless));
      }, ms);
    watch(limit);
    let text = "";
    const calls: ToolCall[] = [];
    // The stream is read in its own loop, raced once against the abort: a provider that hangs
    // (even one ignoring the signal) cannot hold the turn, and no chunk pays for a race.
    const consume = async () => {
      for await (const event of brain.stream(request, model.signal)) {
        if (model.signal.aborted) break;
        last = performance.now();
        if (event.type === "text" && event.text) {
          said = last;
          this.stats.ttft ??= last - this.started;
          this.stats.chars += event.text.length;
          text += event.text;
          this.sayChunk(event.text);
        } else if (event.type === "tool_call") {
          calls.push({ role: "tool_call", id: event.id, name: event.name, args: event.args });
        }
      }
    };
    try {
      await Promise.race([consume(), aborted(model.signal)]);
    } finally {
      clearTimeout(timer!);
      this.signal.removeEventListener("abort", stop);
    }
    if (model.signal.aborted && !this.signal.aborted) throw model.signal.reason;
    return { text, calls };
  }

  private context(): ToolContext {
    const { id, vars, deps } = this.call;
    return { callId: id, vars, config: deps.config, signal: this.signal };
  }

  // Runs one tool call, reported to Retell; whatever goes wrong becomes a result the model
  // can talk about. Side-effect tools go through the once-per-call store and are not
  // stopped by a newer request; any tool is told to stop when it runs out of time.
  private async runTool(call: ToolCall, waits = false): Promise<ToolResult> {
    const { tools, actions } = this.call.deps;
    this.stats.tools.push(call.name);
    // The invocation and its result are the call's record of what ran, not words for Retell
    // to say: they go out even after a newer request, so no later turn finds a call without
    // its result (and tells the caller a booking that happened did not).
    this.call.send({
      response_type: "tool_call_invocation",
      tool_call_id: call.id,
      name: call.name,
      arguments: call.args,
    });
    const tool = tools.get(call.name);
    const stop = new AbortController();
    const superseded = () => stop.abort(this.signal.reason);
    if (!tool?.once) this.signal.addEventListener("abort", superseded);
    let result: ToolResult;
    try {
      if (!tool) throw new Error(`there is no tool called ${call.name}`);
      if (waits) {
        throw new Error(`not done yet: first tell the caller about the other results, then call ${call.name} again`);
      }
      const args = tool.schema.safeParse(parseObject(call.args));
      if (!args.success) throw new Error(`bad arguments: ${z.prettifyError(args.error)}`);
      result = await runOnce(tool, args.data, { ...this.context(), signal: stop.signal }, this.call.deps);
      if (result.action) remember(actions, `${this.call.id}\n${call.id}`, result.action);
    } catch (err) {
      if (err instanceof TimeoutError) stop.abort(err);
      const unknown = err instanceof TimeoutError && tool?.once
        ? ", so it may or may not have happened: do not promise it"
        : err instanceof StoreDown
        ? ". It cannot be done right now: tell the caller, and offer to take a message"
        : "";
      log("warn", "tool_failed", {
        call_id: this.call.id,
        response_id: this.id,
        tool: call.name,
        error: errorText(err),
      });
      result = { content: JSON.stringify({ error: `${call.name} failed: ${errorText(err)}${unknown}` }), ok: false };
    } finally {
      this.signal.removeEventListener("abort", superseded);
    }
    this.call.send({
      response_type: "tool_call_result",
      tool_call_id: call.id,
      content: result.content,
      successful: result.ok,
    });
    this.call.deps.metrics.count("retell_tool_calls_total", {
      tool: tool ? call.name : "unknown",
      ok: String(result.ok),
    });
    return result;
  }
}

/** Runs a tool within TOOL_TIMEOUT_MS; a side-effect tool through the once store, so a repeat
 * of the same call and arguments gets the first run's result instead of acting again. */
function runOnce(tool: Tool, args: unknown, ctx: ToolContext, deps: Deps): Promise<ToolResult> {
  const { once, config } = deps;
  // The once-key is a digest: short for any store, and the arguments stay out of it.
  const key = tool.once
    ? `once:${digest(`${ctx.callId}\n${tool.name}\n${canonical(args)}`).toString("hex").slice(0, 32)}`
    : undefined;
  const act = () => invoke(tool, args, { ...ctx, idempotencyKey: key });
  return withTimeout(key ? once.run(key, act, config.toolTimeoutMs) : act(), config.toolTimeoutMs, "it took too long");
}

const remember = <K, V>(map: Map<K, V>, key: K, value: V) => {
  map.set(key, value);
  if (map.size > 10_000) map.delete(map.keys().next().value!);
};

async function invoke(tool: Tool, args: unknown, ctx: ToolContext): Promise<ToolResult> {
  const value = await tool.run(args, ctx);
  if (value instanceof CallAction) return { content: value.message, ok: true, action: value };
  const content = clip(typeof value === "string" ? value : JSON.stringify(value ?? "done"));
  return { content, ok: !(value && typeof value === "object" && "error" in value) };
}

// The same arguments in any key order make the same key.
const canonical = (value: unknown): string =>
  JSON.stringify(
    value,
    (_, v) =>
      v && typeof v === "object" && !Array.isArray(v)
        ? Object.fromEntries(Object.entries(v).sort(([a], [b]) => a.localeCompare(b)))
        : v,
  );

// An action (end_call, transfer_call) whose line the caller talked over is lost on Retell's
// side. When the agent had said at least half of that line and the caller only acknowledged
// it ("okay", "thanks, bye"), the action is re-issued instead of starting a new reply.
function unfinishedAction(items: readonly (Item | null)[], deps: Deps, ctx: ToolContext) {
  // Sizes are checked before any text work: a transcript of many megabytes costs nothing here.
  let end = items.length;
  let chars = 0;
  while (end > 0 && items[end - 1]?.role === "user") {
    chars += items[--end]?.content?.length ?? 0;
    if (chars > MAX_BARGE_IN_CHARS || items.length - end > MAX_BARGE_IN_WORDS) return;
  }
  const barge = normalize(items.slice(end).map((it) => it?.content ?? "").join(" ")).split(" ").filter(Boolean);
  if (!barge.length || barge.length > MAX_BARGE_IN_WORDS || !barge.every((w) => ACKNOWLEDGEMENTS.has(w))) return;
  // The agent's side of the last exchange: everything since the caller spoke before.
  let start = end;
  while (start > 0 && items[start - 1]?.role !== "user") start--;
  const exchange = items.slice(start, end);
  const at = exchange.findLastIndex((it) =>
    it?.role === "tool_call_invocation" && deps.tools.get(it.name ?? "")?.action
  );
  const invocation = exchange[at];
  if (!invocation?.tool_call_id) return;
  return heardToTheEnd(invocation, exchange.slice(at + 1), deps, ctx);
}

// The action of a tool call, if the agent said at least the first half of its message since.
async function heardToTheEnd(invocation: Item, since: readonly (Item | null)[], deps: Deps, ctx: ToolContext) {
  const action = deps.actions.get(`${ctx.callId}\n${invocation.tool_call_id}`) ??
    await rebuildAction(invocation, deps, ctx);
  const line = normalize(action?.message ?? "").split(" ");
  let said = "";
  for (const it of since) {
    if (it?.role === "agent") said += ` ${it.content?.slice(0, MAX_ITEM_CHARS) ?? ""}`;
    if (said.length > MAX_ITEM_CHARS) break; // the goodbye comes first: its start is all we look for
  }
  const spoken = normalize(said);
  const half = line.slice(0, Math.ceil(line.length / 2)).join(" ");
  if (action && half && spoken.includes(half)) return { tool: invocation.name!, action };
}

// After a reconnect to another instance, or while the first run is still going, the action
// is rebuilt from the recorded arguments; a side-effect tool goes through the once store, so
// this returns the first run's result instead of acting again.
async function rebuildAction(invocation: Item, deps: Deps, ctx: ToolContext) {
  const tool = deps.tools.get(invocation.name ?? "")!;
  const args = tool.schema.safeParse(parseObject(invocation.arguments ?? "{}"));
  if (!args.success) return undefined;
  const result = await runOnce(tool, args.data, ctx, deps).catch(() => undefined);
  return result?.action;
}

const ACKNOWLEDGEMENTS = new Set(
  "ok okay k thanks thank you bye goodbye right all yes yeah yep sure great alright cool perfect cheers uh um mm hmm oh unintelligible audio"
    .split(" "),
);

const normalize = (s: string) => s.toLowerCase().replace(/[^\p{L}\p{N}]+/gu, " ").trim();

/** A promise that rejects when `signal` aborts (and never resolves). */
function aborted(signal: AbortSignal): Promise<never> {
  const promise = new Promise<never>((_, reject) => {
    if (signal.aborted) reject(signal.reason);
    signal.addEventListener("abort", () => reject(signal.reason), { once: true });
  });
  promise.catch(() => {});
  return promise;
}

function withTimeout<T>(promise: Promise<T>, ms: number, message: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout>;
  const timeout = new Promise<never>((_, reject) => timer = setTimeout(() => reject(new TimeoutError(message)), ms));
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// The prompt's clock reads to the minute, so it is formatted once a minute per time zone:
// Intl formatting costs more than the rest of a turn's prompt building.
const clocks = new Map<string, { minute: number; text: string; format: Intl.DateTimeFormat }>();
const now = (timeZone: string) => {
  const minute = Math.floor(Date.now() / 60_000);
  let clock = clocks.get(timeZone);
  if (!clock) {
    const format = new Intl.DateTimeFormat("en-US", { timeZone, dateStyle: "full", timeStyle: "short" });
    clocks.set(timeZone, clock = { minute: -1, text: "", format });
  }
  if (clock.minute !== minute) clock.text = clock.format.format(new Date()), clock.minute = minute;
  return clock.text;
};

const newId = (prefix: string) => `${prefix}_${crypto.randomUUID().replaceAll("-", "")}`;

/** `redis://user:secret@host` as `redis://…@host`, wherever it appears in a message. */
const withoutPasswords = (text: string) => text.replace(/([a-z][\w+.-]*:\/\/)[^\s@/]*@/gi, "$1…@");

const errorText = (err: unknown) => (err instanceof Error ? err.message : String(err)).slice(0, 300);

const LOG_LEVELS = ["debug", "info", "warn", "error"] as const;
type LogLevel = typeof LOG_LEVELS[number];
let logFrom = 1; // info

export function log(level: LogLevel, event: string, fields: Record<string, unknown> = {}) {
  if (LOG_LEVELS.indexOf(level) < logFrom) return;
  console.log(JSON.stringify({ time: new Date().toISOString(), level, event, ...fields }));
}

/** Prometheus counters and histograms, served as text at /metrics. */
class Metrics {
  private readonly counters = new Map<string, number>();
  private readonly histograms = new Map<string, { buckets: number[]; sum: number; count: number }>();

  count(name: string, labels: Record<string, string>) {
    const key = `${name}{${Object.entries(labels).map(([k, v]) => `${k}="${v.replace(/["\\\n]/g, "_")}"`).join(",")}}`;
    this.counters.set(key, (this.counters.get(key) ?? 0) + 1);
  }

  observe(name: string, seconds: number) {
    const h = this.histograms.get(name) ?? { buckets: BUCKETS.map(() => 0), sum: 0, count: 0 };
    BUCKETS.forEach((le, i) => seconds <= le && h.buckets[i]++);
    h.sum += seconds;
    h.count++;
    this.histograms.set(name, h);
  }

  render(liveCalls: number): string {
    const lines = ["# TYPE retell_live_calls gauge", `retell_live_calls ${liveCalls}`];
    const families = new Set([...this.counters.keys()].map((k) => k.slice(0, k.indexOf("{"))));
    for (const family of families) {
      lines.push(`# TYPE ${family} counter`);
      for (const [key, value] of this.counters) if (key.startsWith(`${family}{`)) lines.push(`${key} ${value}`);
    }
    for (const [name, h] of this.histograms) {
      lines.push(`# TYPE ${name} histogram`);
      BUCKETS.forEach((le, i) => lines.push(`${name}_bucket{le="${le}"} ${h.buckets[i]}`));
      lines.push(`${name}_bucket{le="+Inf"} ${h.count}`, `${name}_sum ${h.sum}`, `${name}_count ${h.count}`);
    }
    return lines.join("\n") + "\n";
  }
}

const BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16];

// 8. HTTP routes --------------------------------------------------------------------------
export function createApp(options: AppOptions = {}) {
  const config = options.config ?? loadConfig(process.env);
  const tools = options.tools ?? TOOLS;
  const deps: Deps = {
    config,
    brain: options.brain ?? createBrain(config),
    fallback: options.fallback ?? createFallback(config),
    tools: new Map(tools.map((t) => [t.name, t])),
    specs: toolSpecs(tools),
    persona: options.persona ?? PERSONA,
    greeted: new Set(),
    shared: options.store,
    once: new OnceStore(options.store ?? new MemoryStore(), 3 * config.toolTimeoutMs),
    actions: new Map(),
    live: new Set(),
    metrics: new Metrics(),
    draining: false,
  };
  logFrom = LOG_LEVELS.indexOf(config.logLevel);
  try {
    now(deps.persona.timezone);
  } catch {
    throw new ConfigError(
      `PERSONA.timezone must be a time zone like America/New_York (got "${deps.persona.timezone}").`,
    );
  }
  const app = new Hono();
  app.get("/health", (c) => {
    const { provider, model } = deps.brain;
    const status = deps.draining ? "draining" : "ok";
    return c.json(
      { status, provider, model, live_calls: deps.live.size, draining: deps.draining },
      deps.draining ? 503 : 200,
    );
  });
  app.get("/metrics", (c) => {
    const token = config.metricsToken;
    const bearer = /^Bearer (.+)$/i.exec(c.req.header("authorization") ?? "")?.[1];
    const given = bearer ?? c.req.query("token") ?? "";
    if (token && !sameSecret(given, token)) return c.text("unauthorized", 401);
    return c.text(deps.metrics.render(deps.live.size), 200, { "content-type": "text/plain; version=0.0.4" });
  });
  app.get("/llm-websocket/:call_id?", (c) => {
    const { callId, token } = callAndToken(c);
    if (!callId) return c.text("the URL needs the call id: /llm-websocket/<call_id>", 404);
    // A "+" pasted as it is arrives as a space (query decoding); a token has no spaces.
    const plus = (t: string) => t.replaceAll(" ", "+");
    if (config.authToken && !sameSecret(plus(token ?? ""), plus(config.authToken))) {
      log("warn", "auth_refused", { call_id: callId, token_given: token !== undefined });
      return c.text("unauthorized", 401);
    }
    if (deps.draining) return c.text("draining: connect to another instance", 503);
    const response = upgrade(c, (peer) => new Call(callId, peer, deps));
    return response ?? c.text("expected a WebSocket upgrade", 426);
  });
  app.onError((err, c) => {
    log("error", "http_error", { path: c.req.path.slice(0, 200), error: errorText(err) });
    return c.json({ error: "internal error" }, 500);
  });
  return { app, deps };
}

// UNCERTAIN: Retell's docs show `{url}/{call_id}`. Should it append the id after a query
// string (`?token=T/<call_id>`) instead of to the path, both shapes still work.
function callAndToken(c: Context) {
  let callId = c.req.param("call_id");
  let token = c.req.query("token");
  if (!callId && token?.includes("/")) {
    callId = token.slice(token.lastIndexOf("/") + 1);
    token = token.slice(0, token.lastIndexOf("/"));
  }
  return { callId: callId?.slice(0, 128), token };
}

const digest = (s: string) => createHash("sha256").update(s).digest();
const sameSecret = (a: string, b: string) => timingSafeEqual(digest(a), digest(b));

// 9. Runtime glue: the only lines that differ between Deno and Bun ------------------------
const isBun = "Bun" in globalThis;

interface BunSocket {
  data: { open(peer: Peer): Call; call?: Call };
  send(data: string): number;
  readyState: number;
}
interface BunServer {
  upgrade(req: Request, options: { data: BunSocket["data"] }): boolean;
}

// Hands the socket's events to a Call; a throwing handler is logged, never fatal.
const guard = (what: string, fn: () => void) => {
  try {
    fn();
  } catch (err) {
    log("error", "socket_handler_failed", { what, error: errorText(err) });
  }
};

function upgrade(c: Context, open: (peer: Peer) => Call): Response | undefined {
  if (c.req.method !== "GET" || c.req.header("upgrade")?.toLowerCase() !== "websocket") return undefined;
  if (isBun) {
    const server = c.env as BunServer | undefined;
    return server?.upgrade(c.req.raw, { data: { open } }) ? new Response(null) : undefined;
  }
  let upgraded;
  try {
    upgraded = Deno.upgradeWebSocket(c.req.raw);
  } catch {
    return undefined; // a malformed handshake (no key, no Connection: Upgrade)
  }
  const { response, socket } = upgraded;
  const peer: Peer = { send: (data) => socket.readyState === WebSocket.OPEN && socket.send(data) };
  let call: Call | undefined;
  socket.onopen = () => guard("open", () => (call = open(peer)).open());
  socket.onmessage = (e) => guard("message", () => call?.receive(e.data));
  socket.onclose = (e) => guard("close", () => call?.closed(e.code));
  socket.onerror = () => {};
  return response;
}

// Bun's WebSocket handlers (Deno wires its handlers per socket above).
export const websocket = {
  maxPayloadLength: 64 * 1024 * 1024,
  open: (ws: BunSocket) => guard("open", () => (ws.data.call = ws.data.open(bunPeer(ws))).open()),
  message: (ws: BunSocket, message: string | Uint8Array) => guard("message", () => ws.data.call?.receive(message)),
  close: (ws: BunSocket, code: number) => guard("close", () => ws.data.call?.closed(code)),
};
const bunPeer = (ws: BunSocket): Peer => ({ send: (data) => ws.readyState === 1 && ws.send(data) });

/** Serves `app` on `port` (0 picks a free one) with this runtime's own server. */
function serve(app: Hono, port: number, hostname?: string) {
  if (isBun) {
    type BunServe = { serve(o: unknown): { port: number; stop(force: boolean): void } };
    const server = (globalThis as unknown as { Bun: BunServe }).Bun.serve({
      port,
      hostname,
      fetch: app.fetch,
      websocket,
      development: false,
    });
    return { port: server.port, close: () => Promise.resolve(server.stop(true)) };
  }
  const server = Deno.serve({ port, hostname, onListen() {} }, app.fetch);
  return { port: server.addr.port, close: () => server.shutdown() };
}

/** Starts the app on 127.0.0.1; used by the tests and the developer tools. */
export function listen(port: number, options: AppOptions = {}) {
  const { app, deps } = createApp(options);
  return { ...serve(app, port, "127.0.0.1"), deps };
}

// A failure nobody caught is logged; the process and every other call keep going.
process.on("unhandledRejection", (err) => log("error", "unhandled_rejection", { error: errorText(err) }));
process.on("uncaughtException", (err) => log("error", "uncaught_exception", { error: errorText(err) }));

let config: Config;
try {
  config = loadConfig(process.env);
} catch (err) {
  if (!(err instanceof ConfigError)) throw err;
  console.error(`Config error: ${err.message}`);
  process.exit(1);
}
// A shared state store (STATE_URL) is only loaded when configured: fleet.ts and its client.
const store = import.meta.main && config.stateUrl ? await openStore(config.stateUrl) : undefined;
const main = createApp({ config, store });

async function openStore(url: string) {
  try {
    return await (await import("./fleet.ts")).openStore(url, log);
  } catch (err) {
    console.error(`Cannot open STATE_URL: ${withoutPasswords(errorText(err))}`);
    process.exit(1);
  }
}

// On SIGTERM or SIGINT: /health turns 503, new calls are refused, live calls go on (new turns
// included) until they end or DRAIN_TIMEOUT_MS passes. Then the process exits without close
// frames: Retell takes a dropped socket as a fault and reconnects to another instance, where
// a close with 1000 would hang the call up. A second signal exits at once.
function drainOnSignal(deps: Deps) {
  const drain = async (signal: string) => {
    if (deps.draining) process.exit(1);
    deps.draining = true;
    const since = Date.now();
    log("info", "drain_start", { signal, live_calls: deps.live.size, timeout_ms: config.drainTimeoutMs });
    const busy = () => deps.live.size > 0 || deps.once.busy; // a side effect half-done is not left behind
    for (let tick = 1; busy() && Date.now() - since < config.drainTimeoutMs; tick++) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      if (tick % 50 === 0) log("info", "draining", { live_calls: deps.live.size });
    }
    log("info", "drain_done", { live_calls: deps.live.size, waited_ms: Date.now() - since });
    process.exit(0);
  };
  for (const signal of ["SIGTERM", "SIGINT"] as const) process.on(signal, () => void drain(signal));
}

function started(port: number) {
  const { provider, model } = main.deps.brain;
  drainOnSignal(main.deps);
  log("info", "listening", {
    port,
    provider,
    model,
    auth: Boolean(config.authToken),
    state: store ? "shared" : "memory",
  });
  if (provider === "demo") {
    log("warn", "demo_brain", {
      hint: "No OPENAI_API_KEY or ANTHROPIC_API_KEY: answering with the offline demo brain.",
    });
  }
}

// `deno serve main.ts` serves the default export and calls its onListen before any timer
// fires; `deno run` and `bun run` start the server here instead.
let servedByDeno = false;
if (import.meta.main) {
  setTimeout(() => {
    if (servedByDeno) return;
    try {
      started(serve(main.app, config.port).port);
    } catch (err) {
      console.error(`Cannot listen on port ${config.port}: ${errorText(err)}`);
      process.exit(1);
    }
  }, 0);
}

export default isBun ? {} : {
  fetch: main.app.fetch,
  onListen: ({ port }: { port: number }) => {
    servedByDeno = true;
    started(port);
    log("warn", "no_drain", {
      hint: "deno serve closes live calls itself on SIGTERM; run `deno task start` to let them finish first",
    });
  },
};
