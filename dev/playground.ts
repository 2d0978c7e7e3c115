// The browser playground: talk to your persona by voice or text, with no phone and no Retell
// account. This serves dev/playground.html, a page that plays Retell's side of the custom-LLM
// WebSocket itself. With no server URL given it starts the agent server in-process.
//
//   Deno: deno run -A dev/playground.ts [ws://host:port/llm-websocket]
//   Bun:  bun run dev/playground.ts [ws://host:port/llm-websocket]
//
// Then open the printed URL (PLAYGROUND_PORT picks the port, 8081 by default).
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import { readFile } from "node:fs/promises";
import process from "node:process";
import type { AppOptions } from "../main.ts";

export interface PlaygroundOptions {
  /** Port for the page; 0 picks a free one. */
  port?: number;
  /** The agent's WebSocket URL; without it the agent server starts in-process. */
  serverUrl?: string;
  /** Options for the in-process agent server (the tests pass a config here). */
  server?: AppOptions;
}

export interface Playground {
  url: string;
  agentUrl: string;
  close(): Promise<void>;
}

const PAGE = new URL("./playground.html", import.meta.url);

/** Serves the page on 127.0.0.1 and, unless a server URL is given, starts the agent beside it. */
export async function startPlayground(options: PlaygroundOptions = {}): Promise<Playground> {
  const agent = options.serverUrl
    ? { url: toWebSocketUrl(options.serverUrl), close: async () => {} }
    : await startAgent(options.server);
  const server = createServer((req, res) => servePage(req, res, agent.url));
  try {
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(options.port ?? 8081, "127.0.0.1", resolve);
    });
  } catch (err) {
    await agent.close();
    throw err;
  }
  const { port } = server.address() as { port: number };
  return {
    url: `http://127.0.0.1:${port}/`,
    agentUrl: agent.url,
    close: async () => {
      await new Promise((resolve) => server.close(resolve));
      await agent.close();
    },
  };
}

// Imported only when needed, so pointing the playground at another server needs no config here.
async function startAgent(options?: AppOptions) {
  const { listen } = await import("../main.ts");
  const agent = listen(0, options);
  const token = agent.deps.config.authToken;
  const query = token ? `?token=${encodeURIComponent(token)}` : "";
  return { url: `ws://127.0.0.1:${agent.port}/llm-websocket${query}`, close: agent.close };
}

// Accepts what Retell accepts (http: and https: become ws: and wss:), and a bare host.
function toWebSocketUrl(raw: string): string {
  const url = new URL(raw.includes("://") ? raw : `ws://${raw}`);
  url.protocol = url.protocol.replace(/^http/, "ws");
  if (url.pathname === "/") url.pathname = "/llm-websocket";
  return url.href;
}

// The page is read on every request, so edits to it show on reload; the agent URL goes into
// its <meta name="agent-url">, and ?server=... in the page's address overrides it.
async function servePage(req: IncomingMessage, res: ServerResponse, agentUrl: string) {
  const path = new URL(req.url ?? "/", "http://localhost").pathname;
  if (req.method !== "GET" || (path !== "/" && path !== "/index.html")) {
    res.writeHead(path === "/favicon.ico" ? 204 : 404, { connection: "close" }).end();
    return;
  }
  try {
    const html = (await readFile(PAGE, "utf8"))
      .replace(
        /<meta name="agent-url" content="[^"]*">/,
        `<meta name="agent-url" content="${escapeAttribute(agentUrl)}">`,
      );
    res.writeHead(200, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store", connection: "close" })
      .end(html);
  } catch (err) {
    res.writeHead(500, { "content-type": "text/plain", connection: "close" }).end(`cannot read ${PAGE}: ${err}`);
  }
}

const escapeAttribute = (s: string) =>
  s.replaceAll("&", "&amp;").replaceAll('"', "&quot;").replaceAll("<", "&lt;").replaceAll(">", "&gt;");

function readPort(raw: string | undefined): number {
  if (!raw?.trim()) return 8081;
  const port = Number(raw);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`PLAYGROUND_PORT must be a whole number from 0 to 65535 (got "${raw}").`);
  }
  return port;
}

if (import.meta.main) {
  try {
    const serverUrl = process.argv.slice(2).find((arg) => !arg.startsWith("-"));
    const playground = await startPlayground({ port: readPort(process.env.PLAYGROUND_PORT), serverUrl });
    const agentUrl = playground.agentUrl.replace(/token=[^&]*/, "token=***");
    console.log(`Agent:      ${agentUrl}${serverUrl ? "" : " (started here)"}`);
    console.log(`Playground: ${playground.url}  <- open this in Chrome or Edge (voice input needs one of them)`);
  } catch (err) {
    const message = err instanceof Error ? err.message.replace(/\.$/, "") : String(err);
    const hint = (err as { code?: string }).code === "EADDRINUSE" ? " Set PLAYGROUND_PORT to a free port." : "";
    console.error(`Cannot start the playground: ${message}.${hint}`);
    process.exit(1);
  }
}
