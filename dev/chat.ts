// A terminal chat with your persona: you type as the caller and watch the agent's words stream
// in, with its tool calls, actions and time to first word. It plays Retell's side of the socket
// (dev/retell.ts) against a running server, or against one started in-process when no URL is
// given, so trying a prompt change needs no phone and no Retell account.
//
//   deno task chat                                   (in-process; the demo brain without a key)
//   deno task chat ws://localhost:8080/llm-websocket --var customer_name=Maria
//   bun run dev/chat.ts [url] [--var name=value ...]
//   printf 'hello\n/silence\nbye\n' | deno task chat  (piped lines wait for each reply)
import process from "node:process";
import readline from "node:readline";
import { parseArgs } from "node:util";
import { type Reply, RetellCall } from "./retell.ts";

const USAGE = "usage: chat.ts [ws://host:port/llm-websocket[?token=...]] [--var name=value ...]";
const HELP = `Type as the caller and press Enter. Typing while the agent talks interrupts it.
  /interrupt [words]  talk over the agent (piped: as soon as it starts speaking)
  /silence            stay quiet until Retell asks the agent for a reminder
  /quit               hang up
  /help               show this`;

// Colors only for a person at a terminal who has not opted out (https://no-color.org).
const color = Boolean(process.stdout.isTTY) && !process.env.NO_COLOR;
const paint = (code: number) => (s: string) => color ? `\x1b[${code}m${s}\x1b[0m` : s;
const [dim, cyan, green] = [paint(2), paint(36), paint(32)];
const write = (s: string) => process.stdout.write(s);
const ms = (n: number) => `${Math.round(n)} ms`;
const clip = (value: unknown, max = 160) => {
  const s = String(value ?? "");
  return s.length > max ? `${s.slice(0, max)}…` : s;
};

class UsageError extends Error {}

/** `[url] [--var name=value ...]`; an http(s) URL is taken as ws(s), as Retell does. */
function parseCli(args: string[]) {
  let parsed;
  try {
    const options = { var: { type: "string", multiple: true }, help: { type: "boolean", short: "h" } } as const;
    parsed = parseArgs({ args, options, allowPositionals: true });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const { values, positionals } = parsed;
  if (positionals.length > 1) throw new UsageError(`give one URL at most (got ${positionals.join(" ")})`);
  const vars: Record<string, string> = {};
  for (const pair of values.var ?? []) {
    const eq = pair.indexOf("=");
    if (eq < 1) throw new UsageError(`--var wants name=value (got "${pair}")`);
    vars[pair.slice(0, eq)] = pair.slice(eq + 1);
  }
  return { url: positionals[0] && socketUrl(positionals[0]), vars, help: values.help };
}

function socketUrl(text: string) {
  const url = URL.canParse(text) ? new URL(text) : undefined;
  if (url) url.protocol = url.protocol.replace(/^http/, "ws");
  if (!url || !["ws:", "wss:"].includes(url.protocol)) throw new UsageError(`not a ws:// or wss:// URL: ${text}`);
  return url.href;
}

/** Writes the conversation, minding a line left open by streaming words or a running tool. */
class Screen {
  private open?: string; // "agent", or the id of the tool call whose result ends this line
  private toolNames = new Map<string, string>();

  agent(text: string) {
    if (this.open !== "agent") this.start(`${cyan("agent ›")} `, "agent");
    write(text);
  }

  user(text: string) {
    this.end();
    write(`${green("you ›")} ${text}\n`);
  }

  note(text: string) {
    this.end();
    write(`  ${dim(text)}\n`);
  }

  // A call shows as it starts; its result joins the same line unless something came between.
  tool(frame: Record<string, any>) {
    const id = String(frame.tool_call_id);
    if (frame.response_type === "tool_call_invocation") {
      this.toolNames.set(id, frame.name);
      return this.start(`  ${dim(`[tool] ${frame.name} ${clip(frame.arguments)}`)}`, id);
    }
    const result = `→ ${frame.successful === false ? "failed: " : ""}${clip(frame.content)}`;
    if (this.open !== id) return this.note(`[tool] ${this.toolNames.get(id) ?? "?"} ${result}`);
    write(` ${dim(result)}\n`);
    this.open = undefined;
  }

  end() {
    if (this.open) write("\n");
    this.open = undefined;
  }

  /** Shows the terminal's prompt; the Enter key that closes its line is the terminal's. */
  prompt(show: () => void) {
    this.end();
    show();
    this.open = "prompt";
  }

  entered() {
    this.open = undefined;
  }

  private start(text: string, open: string) {
    this.end();
    write(text);
    this.open = open;
  }
}

const timing = (r: Reply) =>
  r.firstWordMs === undefined
    ? `(no words, done ${ms(r.totalMs)})`
    : `(first word ${ms(r.firstWordMs)}, done ${ms(r.totalMs)})`;

/** One call: sends what the caller does and shows each reply as it ends. */
class Session {
  call!: RetellCall;
  over = false;
  onOver = () => {};
  prompt = () => {};
  private current: Promise<void> = Promise.resolve();
  private started: Promise<void> = Promise.resolve(); // the current reply's first words
  private heard?: () => void;

  constructor(readonly screen: Screen) {}

  async connect(url: string, vars: Record<string, string>) {
    this.call = await RetellCall.connect(url, {
      vars,
      onText: (text) => {
        this.screen.agent(text);
        this.heard?.();
      },
      onTool: (frame) => this.screen.tool(frame),
      onClose: (code) => {
        this.screen.end();
        fail(`the server closed the connection (code ${code})`);
      },
    });
    if (this.call.greeting) this.screen.agent(this.call.greeting);
    else this.screen.note("(no greeting: the agent waits for you to speak first)");
    this.screen.end();
  }

  /** One line from the caller; `echo` repeats it when the terminal did not show it. */
  async handle(line: string, echo: boolean) {
    const text = line.trim();
    const [command, ...words] = text.split(/\s+/);
    if (!text.startsWith("/")) return text && this.say(text, echo);
    if (command === "/interrupt") {
      if (echo) await this.started; // a person talks over words they hear, not over silence
      this.interrupt();
      if (echo) this.screen.user(text);
      if (words.length) this.say(words.join(" "), false);
      return;
    }
    if (echo) this.screen.user(text);
    if (command === "/silence") this.ask(this.call.silence());
    else if (command === "/quit") this.hangUp("you hung up");
    else if (command === "/help") this.screen.note(HELP.replaceAll("\n", "\n  "));
    else this.screen.note(`unknown command ${command}; /help lists them`);
  }

  /** Talks over the agent: what it already said stays said, the rest of its reply is dropped. */
  interrupt() {
    const cut = this.call.interrupt();
    if (cut) this.screen.note(`(interrupted after ${ms(cut.totalMs)})`);
  }

  /** Resolves once no reply is streaming, including replies that started while waiting. */
  async idle() {
    let seen;
    while (seen !== this.current) await (seen = this.current);
  }

  hangUp(why: string) {
    if (this.over) return;
    this.over = true;
    this.screen.note(`call ended: ${why}`);
    this.onOver();
  }

  private say(text: string, echo: boolean) {
    this.interrupt();
    if (echo) this.screen.user(text);
    this.ask(this.call.say(text));
  }

  private ask(reply: Promise<Reply>) {
    const words = new Promise<void>((resolve) => this.heard = resolve);
    this.current = reply.then((r) => this.show(r));
    this.started = Promise.race([words, this.current]);
  }

  private show(reply: Reply) {
    if (reply.interrupted) return; // interrupt() or the socket closing has said so already
    const { end_call, transfer_number, digit_to_press } = reply.action ?? {};
    if (end_call) this.screen.note("[end_call]");
    else if (transfer_number) this.screen.note(`[transfer → ${transfer_number}]`);
    else if (digit_to_press) this.screen.note(`[press ${digit_to_press}]`);
    this.screen.note(timing(reply));
    if (this.call.ended) this.hangUp(end_call ? "the agent hung up" : "the agent transferred the call");
    else this.prompt();
  }
}

// The in-process server logs warnings and errors only (unless LOG_LEVEL says otherwise), as
// notes between the chat's lines rather than through them.
async function startServer(screen: Screen) {
  process.env.LOG_LEVEL ??= "warn";
  console.log = (line: unknown) => {
    try {
      const { level, event, time: _, ...fields } = JSON.parse(String(line));
      screen.note(`[server ${level}] ${event} ${clip(JSON.stringify(fields))}`);
    } catch {
      screen.note(String(line));
    }
  };
  const { listen } = await import("../main.ts");
  return listen(0);
}

// Piped lines wait for the agent's reply, as a person would, except a barge-in. At a terminal
// every line goes at once, and the first key pressed while the agent talks cuts it off.
async function converse(session: Session, tty: boolean) {
  const rl = readline.createInterface({
    input: process.stdin,
    output: tty ? process.stdout : undefined,
    terminal: tty,
    prompt: `${green("you ›")} `,
  });
  session.onOver = () => rl.close();
  if (tty) {
    session.prompt = () => session.screen.prompt(() => rl.prompt());
    process.stdin.prependListener("keypress", () => {
      if (!session.call.speaking) return;
      session.interrupt();
      session.prompt();
    });
    rl.on("SIGINT", () => session.hangUp("you hung up"));
    session.prompt();
  }
  for await (const line of rl) {
    session.screen.entered();
    if (!tty && !line.trim().startsWith("/interrupt")) await session.idle();
    if (session.over) break;
    await session.handle(line, !tty);
    if (!session.over && !session.call.speaking) session.prompt();
  }
  if (!session.over) await session.idle(); // end of input: let the agent finish its reply
  session.hangUp("you hung up");
}

// A token in the URL is a secret: transcripts get pasted into issues.
const redact = (s: string) => s.replace(/([?&]token=)[^&\s'"]+/g, "$1…");

function fail(message: string): never {
  process.stderr.write(`chat: ${redact(message)}\n`);
  process.exit(1);
}

async function main() {
  const cli = parseCli(process.argv.slice(2));
  if (cli.help) return write(`${USAGE}\n\n${HELP}\n`);
  const tty = Boolean(process.stdin.isTTY && process.stdout.isTTY);
  const screen = new Screen();
  const session = new Session(screen);
  const server = cli.url ? undefined : await startServer(screen);
  const url = cli.url || `ws://127.0.0.1:${server!.port}/llm-websocket`;
  const { provider, model } = server?.deps.brain ?? {};
  const where = server ? `in-process server, ${provider} brain (${model})` : redact(url);
  screen.note(`(${where}; /help for commands)`);
  await session.connect(url, cli.vars).catch((err) => fail(`cannot reach ${url}: ${err.message}`));
  await converse(session, tty);
  session.call.close();
}

if (import.meta.main) {
  main().then(
    // Exit only once the output is flushed: a pipe may still be taking it.
    () => process.stdout.write("", () => process.exit(0)),
    (err) => {
      process.stderr.write(`chat: ${err.message}\n${err instanceof UsageError ? `${USAGE}\n` : ""}`);
      process.exit(err instanceof UsageError ? 2 : 1);
    },
  );
}
