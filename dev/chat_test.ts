// The terminal chat, run as its own process the way a person runs it, with the caller's lines
// piped in: against an in-process server with the offline demo brain, against a separately
// started server with call variables, and against a URL where nothing listens.
// Runs under `deno test -A` and `bun test`.
import { test } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import process from "node:process";
import { spawn } from "node:child_process";
import { listen, loadConfig } from "../main.ts";

const SLOW = { timeout: 15_000 }; // each starts a runtime, and in-process a server too

/** Runs dev/chat.ts with `input` as the caller's lines; resolves when it exits. */
function chat(args: string[], input: string) {
  const env = { ...process.env, NO_COLOR: "1" } as Record<string, string>;
  for (const key of Object.keys(env)) {
    if (/^(OPENAI|ANTHROPIC|LLM_PROVIDER|FALLBACK|LOG_LEVEL)/.test(key)) delete env[key];
  }
  const run = "Bun" in globalThis ? ["run", "dev/chat.ts"] : ["run", "-A", "dev/chat.ts"];
  const cwd = new URL("..", import.meta.url).pathname; // Deno finds deno.json and node_modules from here
  const child = spawn(process.execPath, [...run, ...args], { cwd, env });
  const killer = setTimeout(() => child.kill(), 12_000);
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (d) => stdout += d);
  child.stderr.on("data", (d) => stderr += d);
  child.stdin.end(input);
  return new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) =>
    child.on("close", (code) => {
      clearTimeout(killer);
      resolve({ code, stdout, stderr });
    })
  );
}

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const server = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

test("with no URL it chats with an in-process demo brain until the agent hangs up", SLOW, async () => {
  const { code, stdout, stderr } = await chat([], "hello there\n/silence\nbye\nnever said\n");
  assert.equal(code, 0, stdout + stderr);
  assert.match(stdout, /^ {2}\(in-process server, demo brain/m);
  assert.match(stdout, /^agent › Hi! This is Ava at Sunrise Dental\./m);
  assert.match(stdout, /^you › hello there\nagent › \S.*\n {2}\(first word \d+ ms, done \d+ ms\)$/m);
  assert.match(stdout, /^you › \/silence\nagent › Are you still there\?\n {2}\(first word \d+ ms/m);
  assert.match(stdout, /^you › bye\n {2}\[tool\] end_call \{"message":".+"\} → .+\nagent › .+\n {2}\[end_call\]$/m);
  assert.match(stdout, /call ended: the agent hung up\n$/);
  assert.doesNotMatch(stdout, /never said/);
});

test("a piped /interrupt talks over the agent once it starts speaking", SLOW, async () => {
  const { code, stdout, stderr } = await chat([], "hello there\n/interrupt\nbye\n");
  assert.equal(code, 0, stdout + stderr);
  assert.match(
    stdout,
    /^you › hello there\nagent › .+\n {2}\(interrupted after \d+ ms\)\nyou › \/interrupt\nyou › bye$/m,
  );
  assert.match(stdout, /\[end_call\]/);
});

test("against a running server it sends --var values as call variables", SLOW, async () => {
  const server = listen(0, { config: { ...loadConfig({ LLM_PROVIDER: "demo" }), logLevel: "warn" } });
  try {
    const url = `ws://127.0.0.1:${server.port}/llm-websocket`;
    const { code, stdout, stderr } = await chat([url, "--var", "customer_name=Maria"], "");
    assert.equal(code, 0, stdout + stderr);
    assert.match(stdout, /^agent › Hi Maria! This is Ava/m);
    assert.match(stdout, /call ended: you hung up\n$/);
  } finally {
    await server.close();
  }
});

test("a server that cannot be reached is one line on stderr and a non-zero exit", SLOW, async () => {
  const url = `ws://127.0.0.1:${await freePort()}/llm-websocket`;
  const { code, stderr } = await chat([url], "hello\n");
  assert.notEqual(code, 0);
  assert.match(stderr, new RegExp(`^chat: cannot reach ${url.replaceAll(".", "\\.")}: .+\n$`));
});

test("a malformed --var is a usage error", SLOW, async () => {
  const { code, stderr } = await chat(["--var", "customer_name"], "");
  assert.equal(code, 2);
  assert.match(stderr, /^chat: --var wants name=value \(got "customer_name"\)\nusage: /);
});
