// The browser playground in a real headless Chromium (Debian's `chromium` package, driven by
// playwright-core): the page plays Retell's side against the agent server with the offline
// demo brain, and each test uses it the way a person would.
//
//   deno test -A dev/playground_test.ts
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type Browser, chromium, type Page } from "playwright-core";
import { loadConfig } from "../main.ts";
import { type Playground, startPlayground } from "./playground.ts";

const CHROMIUM = "/usr/bin/chromium";
const SCREENSHOT = join(tmpdir(), "playground.png");
const skip = existsSync(CHROMIUM) ? false : `${CHROMIUM} is missing (apt-get install chromium)`;
if (skip) console.warn(`Skipping the browser playground tests: ${skip}.`);

// Playwright makes (and removes) its own temporary profile, so no --user-data-dir here.
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

// Runs in the page: keeps every frame the page sends, in `sent`.
function recordFrames() {
  const page = globalThis as any;
  page.sent = [];
  const send = page.WebSocket.prototype.send;
  page.WebSocket.prototype.send = function (data: string) {
    page.sent.push(JSON.parse(data));
    return send.call(this, data);
  };
}

// Runs in the page. Headless Chromium has no voices and no speech service: these stand-ins
// speak each sentence in `msPerSentence`, keep what was said (`spoken`) and count cancels,
// and let a test talk into the microphone with hear(text, isFinal).
function fakeBrowserSpeech(msPerSentence: number) {
  const page = globalThis as any;
  page.spoken = [];
  page.cancels = 0;
  let queue: any[] = [];
  const next = () => {
    const utterance = queue[0];
    if (!utterance) return;
    utterance.timer = setTimeout(() => {
      queue.shift();
      page.spoken.push(utterance.text);
      utterance.onend?.({});
      next();
    }, msPerSentence);
  };
  const synth = {
    getVoices: () => [{ name: "Test voice", lang: "en-US", voiceURI: "test-voice", default: true }],
    speak(utterance: any) {
      queue.push(utterance);
      if (queue.length === 1) next();
    },
    cancel() {
      page.cancels++;
      for (const utterance of queue) clearTimeout(utterance.timer);
      queue = [];
    },
    addEventListener() {},
  };
  Object.defineProperty(page, "speechSynthesis", { value: synth, configurable: true });
  page.SpeechSynthesisUtterance = class {
    constructor(readonly text: string) {}
  };
  page.webkitSpeechRecognition = page.SpeechRecognition = class {
    constructor() {
      page.recognition = this;
    }
    start() {}
    abort() {}
  };
  page.hear = (text: string, isFinal: boolean) => {
    const result = Object.assign([{ transcript: text, confidence: 1 }], { isFinal });
    page.recognition.onresult({ resultIndex: 0, results: [result] });
  };
}

// Runs in the page: a browser without speech recognition (Firefox, Safari in some setups).
function removeSpeechRecognition() {
  delete (globalThis as any).SpeechRecognition;
  delete (globalThis as any).webkitSpeechRecognition;
}

const turn = (page: Page, id: number) => page.locator(`.turn[data-response-id="${id}"]`);

async function startCall(page: Page, url: string, vars?: string) {
  await page.goto(url);
  if (vars !== undefined) await page.fill("#vars", vars);
  await page.click("#start");
  await page.locator("#status", { hasText: "In call" }).waitFor();
}

async function type(page: Page, text: string) {
  await page.fill("#message", text);
  await page.press("#message", "Enter");
}

/** Waits until the agent's turn `id` is complete (or cut off) and returns its words. */
async function reply(page: Page, id: number) {
  await turn(page, id).locator(".latency").waitFor();
  return (await turn(page, id).locator(".body .text").allTextContents()).join("").trim();
}

const sent = (page: Page) =>
  page.evaluate(() => (globalThis as any).sent.filter((f: any) => f.interaction_type !== "ping_pong"));

describe("browser playground", { skip }, () => {
  let browser: Browser;
  let playground: Playground;

  before(async () => {
    browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
    playground = await startPlayground({ port: 0, server: { config: loadConfig({}) } });
  });

  after(async () => {
    await browser?.close();
    await playground?.close();
  });

  async function newPage(...scripts: (string | (() => void))[]) {
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    for (const script of [recordFrames, ...scripts]) await context.addInitScript(script);
    const page = await context.newPage();
    page.setDefaultTimeout(10_000);
    return page;
  }

  it("streams a typed reply with its latency, and shows the call ending when the caller says bye", async () => {
    const page = await newPage(`(${fakeBrowserSpeech})(20)`);
    await startCall(page, playground.url, "customer_name=Robin");
    await page.waitForFunction(() => !(globalThis as any).playground.call.talking); // the greeting is over

    await type(page, "Do you have anything on Friday?");
    const words = await reply(page, 1);
    assert.ok(words.length > 0, "the agent answered in words");
    assert.match(await turn(page, 1).locator(".latency").innerText(), /^first word \d+ ms · complete \d+ ms$/);
    assert.match(await page.locator("#turns tr").last().innerText(), /#1\s+response\s+\d+ ms\s+\d+ ms/);

    const frames = await sent(page);
    const details = frames.find((f: any) => f.interaction_type === "call_details");
    assert.equal(details.call.retell_llm_dynamic_variables.customer_name, "Robin");
    const request = frames.find((f: any) => f.interaction_type === "response_required");
    assert.equal(request.response_id, 1);
    assert.deepEqual(request.transcript.at(-1), { role: "user", content: "Do you have anything on Friday?" });
    assert.ok(request.transcript_with_tool_calls, "the woven transcript goes along, as the server asked");
    await page.waitForFunction((text: string) => (globalThis as any).spoken.join(" ").includes(text), words);

    await type(page, "Great, bye!");
    await page.locator("#status", { hasText: "Call ended" }).waitFor();
    assert.equal(await turn(page, 2).locator(".tool .name").innerText(), "end_call");
    assert.match(await turn(page, 2).locator(".chip.action").innerText(), /end_call · done/);
    assert.ok(await page.locator(".notice.end", { hasText: "end_call" }).isVisible());
    assert.ok(await page.locator("#message").isDisabled());
    const lastRequest = (await sent(page)).at(-1);
    assert.equal(lastRequest.response_id, 2);
    assert.equal(lastRequest.transcript.at(-2).role, "agent", "the first reply is in the transcript as said");

    await page.screenshot({ path: SCREENSHOT });
    await page.context().close();
  });

  it("stops speaking and sends a new request when the caller talks over the agent; stay silent asks for a reminder", async () => {
    const page = await newPage(`(${fakeBrowserSpeech})(1500)`);
    await startCall(page, playground.url);
    await page.click("#mic");
    await page.locator("#mic", { hasText: "Listening" }).waitFor();

    await page.evaluate(() => (globalThis as any).hear("what are your opening hours", true));
    const first = await reply(page, 1);
    assert.equal(await turn(page, 1).locator(".chip.warn").count(), 0, "not interrupted yet: still speaking");

    const cancels = () => page.evaluate(() => (globalThis as any).cancels);
    const before = await cancels();
    await page.evaluate(() => (globalThis as any).hear("wait", false));
    await turn(page, 1).locator(".chip", { hasText: "interrupted" }).waitFor();
    assert.equal(await cancels(), before + 1, "speechSynthesis.cancel() stopped the agent");

    await page.evaluate(() => (globalThis as any).hear("wait, one more thing", true));
    await reply(page, 2);
    const request = (await sent(page)).at(-1);
    assert.equal(request.interaction_type, "response_required");
    assert.equal(request.response_id, 2);
    assert.deepEqual(request.transcript.slice(-2), [
      { role: "agent", content: first },
      { role: "user", content: "wait, one more thing" },
    ]);

    await page.click("#silent");
    assert.ok((await reply(page, 3)).length > 0, "the agent checks in after the silence");
    const reminder = (await sent(page)).at(-1);
    assert.equal(reminder.interaction_type, "reminder_required");
    assert.equal(reminder.response_id, 3);
    await page.context().close();
  });

  it("works without voices or speech recognition, through a server that wants a token", async () => {
    const guarded = await startPlayground({ port: 0, server: { config: loadConfig({ AUTH_TOKEN: "s3cret" }) } });
    try {
      const page = await newPage(removeSpeechRecognition);
      await startCall(page, guarded.url);
      assert.ok(await page.locator("#mic").isDisabled());
      assert.match(await page.locator("#mic-note").innerText(), /No speech recognition/);

      await type(page, "Hello there");
      assert.ok((await reply(page, 1)).length > 0);
      await type(page, "bye");
      await page.locator("#status", { hasText: "Call ended" }).waitFor();
      await page.context().close();
    } finally {
      await guarded.close();
    }
  });
});
