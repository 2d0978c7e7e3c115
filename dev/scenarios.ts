// Scripted conversations that prove a persona still behaves after a prompt change.
//
//   deno task scenarios                       every file in scenarios/, against the configured provider
//   deno task scenarios scenarios/booking.txt one file
//   bun run dev/scenarios.ts [files...] [--url ws://host/llm-websocket?token=...]
//
// Without --url the server starts in-process with the environment's settings: the real model
// when an API key is set, the offline demo brain otherwise. A scenario file is plain text:
//
//   # A comment.
//   vars: customer_name=Maria            dynamic variables for call_details (optional, first)
//   caller: Is Monday free?              the caller says this; the agent replies
//   silence                              the caller says nothing (a reminder_required)
//   expect says: 10:30 | half past ten   the reply contains one of these (any case)
//   expect not says: sorry               the reply contains none of these
//   expect tool: check_availability {"date": "2030-01-07"}   called, with at least these arguments
//   expect no tool                       no tool was called in this reply
//   expect ended | expect transferred [+1...] | expect digits 2#   the action taken
//   only: demo | real                    run only with the offline demo brain, or only with a real model
import process from "node:process";
import { readdirSync, readFileSync } from "node:fs";
import { type Reply, RetellCall } from "./retell.ts";

export type Step =
  | { kind: "caller"; text: string; line: number }
  | { kind: "silence"; line: number }
  | { kind: "expect"; check: string; arg: string; line: number };

export interface Scenario {
  name: string;
  vars: Record<string, string>;
  only?: "demo" | "real";
  steps: Step[];
}

export interface Outcome {
  name: string;
  passed: boolean;
  skipped?: string;
  lines: string[];
}

const EXPECT = /^expect (not says|says|no tool|tool|ended|transferred|digits)(?::\s*|\s+|$)(.*)$/;

/** Parses a scenario file; a line it does not understand is an error naming its number. */
export function parseScenario(name: string, text: string): Scenario {
  const scenario: Scenario = { name, vars: {}, steps: [] };
  text.split("\n").forEach((raw, i) => {
    const line = i + 1;
    const entry = raw.trim();
    const [, key, rest = ""] = entry.match(/^(caller|vars|only):\s*(.*)$/) ?? [];
    const expectation = entry.match(EXPECT);
    if (!entry || entry.startsWith("#")) return;
    if (key === "caller" && rest) scenario.steps.push({ kind: "caller", text: rest, line });
    else if (entry === "silence") scenario.steps.push({ kind: "silence", line });
    else if (key === "vars") Object.assign(scenario.vars, parseVars(rest));
    else if (key === "only" && (rest === "demo" || rest === "real")) scenario.only = rest;
    else if (expectation) {
      scenario.steps.push({ kind: "expect", check: expectation[1], arg: expectation[2].trim(), line });
    } else throw new Error(`${name}:${line}: cannot read "${entry}"`);
  });
  if (!scenario.steps.some((s) => s.kind !== "expect")) throw new Error(`${name}: no caller lines`);
  return scenario;
}

const parseVars = (text: string) =>
  Object.fromEntries(text.split(/[\s,]+/).filter(Boolean).map((pair) => pair.split("=", 2) as [string, string]));

/** Plays one scenario against a server; every expectation applies to the reply before it. */
export async function runScenario(scenario: Scenario, url: string, brain: string): Promise<Outcome> {
  const outcome: Outcome = { name: scenario.name, passed: true, lines: [] };
  if (scenario.only && scenario.only !== (brain === "demo" ? "demo" : "real")) {
    return { ...outcome, skipped: `only for the ${scenario.only === "demo" ? "offline demo brain" : "real model"}` };
  }
  const call = await RetellCall.connect(url, { vars: scenario.vars });
  let reply: Reply | undefined;
  try {
    for (const step of scenario.steps) {
      if (step.kind === "expect") {
        const failure = reply ? check(step.check, step.arg, reply) : "no reply yet";
        outcome.lines.push(
          `${failure ? "  ✗" : "  ✓"} expect ${step.check} ${step.arg}${failure ? `: ${failure}` : ""}`,
        );
        if (failure) outcome.passed = false;
        continue;
      }
      outcome.lines.push(step.kind === "caller" ? `caller › ${step.text}` : "caller › (silence)");
      reply = await (step.kind === "caller" ? call.say(step.text) : call.silence());
      outcome.lines.push(`agent  › ${reply.text}${describeTools(reply)}`);
    }
  } finally {
    call.close();
  }
  return outcome;
}

function check(kind: string, arg: string, reply: Reply): string | undefined {
  const text = reply.text.toLowerCase();
  const options = arg.split("|").map((o) => o.trim().toLowerCase()).filter(Boolean);
  switch (kind) {
    case "says":
      return options.some((o) => text.includes(o)) ? undefined : `the reply was "${reply.text}"`;
    case "not says":
      return options.some((o) => text.includes(o)) ? `the reply was "${reply.text}"` : undefined;
    case "tool":
      return checkTool(arg, reply);
    case "no tool":
      return reply.tools.length ? `called ${reply.tools.map((t) => t.name).join(", ")}` : undefined;
    case "ended":
      return reply.action?.end_call ? undefined : "the call did not end";
    case "transferred":
      if (!reply.action?.transfer_number) return "no transfer";
      return !arg || reply.action.transfer_number === arg
        ? undefined
        : `transferred to ${reply.action.transfer_number}`;
    case "digits":
      return reply.action?.digit_to_press === arg ? undefined : `pressed ${reply.action?.digit_to_press ?? "nothing"}`;
  }
}

function checkTool(arg: string, reply: Reply): string | undefined {
  const [, name, json] = arg.match(/^(\S+)\s*(.*)$/) ?? [];
  const want = json ? JSON.parse(json) as Record<string, unknown> : {};
  const calls = reply.tools.filter((t) => t.name === name);
  if (!calls.length) return `tools called: ${reply.tools.map((t) => t.name).join(", ") || "none"}`;
  const matches = calls.some((t) =>
    Object.entries(want).every(([k, v]) => JSON.stringify(t.arguments[k]) === JSON.stringify(v))
  );
  return matches ? undefined : `called with ${calls.map((t) => JSON.stringify(t.arguments)).join(", ")}`;
}

const describeTools = (reply: Reply) =>
  reply.tools.map((t) => `\n         [${t.name} ${JSON.stringify(t.arguments)} → ${t.result}]`).join("") +
  (reply.action ? `\n         [${Object.keys(reply.action).join(", ")}]` : "");

/** Reads scenario files: the ones named, or every .txt file in scenarios/. */
export function loadScenarios(files: string[]): Scenario[] {
  const dir = new URL("../scenarios/", import.meta.url);
  const paths = files.length
    ? files
    : readdirSync(dir).filter((f) => f.endsWith(".txt")).sort().map((f) => new URL(f, dir).pathname);
  return paths.map((path) => parseScenario(path.split("/").pop()!, readFileSync(path, "utf8")));
}

async function main(args: string[]) {
  const files: string[] = [];
  let url: string | undefined;
  for (let i = 0; i < args.length; i++) args[i] === "--url" ? url = args[++i] : files.push(args[i]);
  const scenarios = loadScenarios(files);
  // The server's per-turn log lines would bury the transcripts; warnings and errors still show.
  process.env.LOG_LEVEL ??= "warn";
  const { listen } = await import("../main.ts");
  const server = url ? undefined : listen(0);
  const brain = server?.deps.brain.provider ?? "remote";
  console.log(
    `Running ${scenarios.length} scenarios against ${url ?? `the ${brain} brain (${server?.deps.brain.model})`}`,
  );
  let failed = 0;
  for (const scenario of scenarios) {
    const outcome = await runScenario(scenario, url ?? `ws://127.0.0.1:${server!.port}/llm-websocket`, brain);
    const verdict = outcome.skipped ? `SKIP (${outcome.skipped})` : outcome.passed ? "PASS" : "FAIL";
    console.log(`\n${verdict} ${outcome.name}\n${outcome.lines.join("\n")}`);
    if (!outcome.passed) failed++;
  }
  await server?.close();
  console.log(`\n${scenarios.length - failed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

if (import.meta.main) {
  await main(process.argv.slice(2)).catch((err) => {
    console.error(err instanceof Error ? err.message : String(err));
    process.exit(2);
  });
}
