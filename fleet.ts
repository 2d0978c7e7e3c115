// Optional production parts that most forks never switch on. main.ts loads this module only
// when STATE_URL is set: shared stores for the records that make side-effect tools run once
// across every instance of the server.
//
//   STATE_URL=redis://host:6379      Redis or Valkey (any runtime)
//   STATE_URL=denokv:                Deno KV (Deno; native on Deno Deploy)
//   STATE_URL=/var/lib/agent/kv.db   Deno KV in a local file
import type { StateStore } from "./main.ts";

type Log = (level: "warn" | "error" | "info", event: string, fields?: Record<string, unknown>) => void;

const PREFIX = "retell:";

export async function openStore(url: string, log: Log): Promise<StateStore> {
  if (/^rediss?:\/\//.test(url)) return await openRedis(url, log);
  if (!("Deno" in globalThis)) throw new Error("Deno KV needs Deno; on Bun use a redis:// STATE_URL");
  return await openKv(url.startsWith("denokv:") ? url.slice("denokv:".length) || undefined : url, log);
}

// The npm `redis` client runs unchanged on Deno and Bun, so there is one code path; it is
// imported only here. Commands fail at once while Redis is down (no offline queue), so a
// side-effect tool answers "I can't do that right now" instead of waiting, and the client
// reconnects in the background.
async function openRedis(url: string, log: Log): Promise<StateStore> {
  const { createClient } = await import("redis");
  const client = createClient({
    url,
    disableOfflineQueue: true,
    socket: { connectTimeout: 2000, reconnectStrategy: (tries: number) => Math.min(100 * 2 ** tries, 2000) },
  });
  let down = false;
  client.on("error", (err: Error) => {
    if (!down) log("error", "state_store_down", { store: "redis", error: err.message.slice(0, 200) });
    down = true;
  });
  client.on("ready", () => {
    if (down) log("info", "state_store_up", { store: "redis" });
    down = false;
  });
  // Not awaited: while Redis is down at start, connect() keeps retrying and never settles, and
  // the server must still start (side effects answer "not right now" until Redis is back).
  client.connect().catch(() => {});
  log("info", "state_store", { store: "redis" });
  return {
    get: async (key) => (await client.get(PREFIX + key)) ?? undefined,
    setIfAbsent: async (key, value, ttlMs) => (await client.set(PREFIX + key, value, { NX: true, PX: ttlMs })) === "OK",
    delete: async (key) => void await client.del(PREFIX + key),
  };
}

// Deno KV expires keys lazily, so each value carries its own expiry and a stale one is
// replaced in the same atomic check. A local KV file shared by several processes can be
// briefly locked by another writer: such an operation is tried again a few times.
async function openKv(path: string | undefined, log: Log): Promise<StateStore> {
  const kv = await Deno.openKv(path);
  log("info", "state_store", { store: "denokv", path: path ?? "default" });
  type Entry = { value: string; expires: number };
  const live = (entry: Entry | null) => entry && entry.expires > Date.now() ? entry.value : undefined;
  return {
    get: (key) => whileLocked(async () => live((await kv.get<Entry>([PREFIX, key])).value) ?? undefined),
    setIfAbsent: (key, value, ttlMs) =>
      whileLocked(async () => {
        const current = await kv.get<Entry>([PREFIX, key]);
        if (live(current.value)) return false;
        const entry = { value, expires: Date.now() + ttlMs };
        return (await kv.atomic().check(current).set([PREFIX, key], entry, { expireIn: ttlMs }).commit()).ok;
      }),
    delete: (key) => whileLocked(() => kv.delete([PREFIX, key])),
  };
}

async function whileLocked<T>(op: () => Promise<T>): Promise<T> {
  for (let attempt = 1;; attempt++) {
    try {
      return await op();
    } catch (err) {
      if (attempt >= 10 || !/locked|busy/i.test(String(err))) throw err;
      await new Promise((resolve) => setTimeout(resolve, 10 * attempt));
    }
  }
}
