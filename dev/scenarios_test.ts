// The scenario runner: the shipped scenarios pass against the offline demo brain, a broken
// expectation fails with the reply in the report, and a bad line is named. Runs under
// `deno test` and `bun test`.
import { test } from "node:test";
import assert from "node:assert/strict";
import process from "node:process";
import { spawnSync } from "node:child_process";
import { listen, loadConfig } from "../main.ts";
import { loadScenarios, parseScenario, runScenario } from "./scenarios.ts";

async function withDemoServer(body: (url: string) => Promise<void>) {
  const server = listen(0, { config: { ...loadConfig({ LLM_PROVIDER: "demo" }), logLevel: "warn" } });
  try {
    await body(`ws://127.0.0.1:${server.port}/llm-websocket`);
  } finally {
    await server.close();
  }
}

test("every shipped scenario passes against the offline demo brain", async () => {
  const scenarios = loadScenarios([]);
  assert.ok(scenarios.length >= 4);
  await withDemoServer(async (url) => {
    for (const scenario of scenarios) {
      const outcome = await runScenario(scenario, url, "demo");
      assert.ok(outcome.passed, `${scenario.name}\n${outcome.lines.join("\n")}`);
    }
  });
});

test("a broken expectation fails and the report shows what the agent said", async () => {
  const scenario = parseScenario(
    "broken.txt",
    "caller: is 2030-01-08 free?\nexpect says: we are closed forever\nexpect tool: book_appointment\ncaller: bye\nexpect ended",
  );
  await withDemoServer(async (url) => {
    const outcome = await runScenario(scenario, url, "demo");
    assert.equal(outcome.passed, false);
    const failures = outcome.lines.filter((l) => l.includes("✗"));
    assert.equal(failures.length, 2);
    assert.match(failures[0], /the reply was "On 2030-01-08 I have/);
    assert.match(failures[1], /tools called: check_availability/);
    assert.ok(outcome.lines.some((l) => l.includes("✓ expect ended")));
  });
});

test("a scenario for the real model only is skipped with the demo brain", async () => {
  const scenario = parseScenario("real.txt", "only: real\ncaller: hello\nexpect says: hello");
  const outcome = await runScenario(scenario, "ws://127.0.0.1:1/unused", "demo");
  assert.match(outcome.skipped ?? "", /real model/);
});

test("a line the runner does not understand is reported with its number", () => {
  assert.throws(
    () => parseScenario("bad.txt", "caller: hi\nexpect sings: la"),
    /bad\.txt:2: cannot read "expect sings: la"/,
  );
  assert.throws(() => parseScenario("empty.txt", "# nothing\n"), /no caller lines/);
});

test("the command runs every scenario and exits 0", () => {
  const env = { ...process.env, NO_COLOR: "1" } as Record<string, string>;
  for (const key of Object.keys(env)) if (/^(OPENAI|ANTHROPIC|LLM_PROVIDER|FALLBACK)/.test(key)) delete env[key];
  const isBun = "Bun" in globalThis;
  const args = isBun ? ["run", "dev/scenarios.ts"] : ["run", "-A", "dev/scenarios.ts"];
  const cwd = new URL("..", import.meta.url).pathname;
  const run = spawnSync(process.execPath, args, { cwd, env, encoding: "utf8", timeout: 20_000 });
  assert.equal(run.status, 0, run.stdout + run.stderr);
  assert.match(run.stdout, /against the demo brain/);
  assert.match(run.stdout, /^\d+ passed, 0 failed$/m);
});
