// Plays Retell's side of the custom-LLM WebSocket the way a real call does: answers the
// config (call_details, pings), keeps the full transcript and transcript_with_tool_calls,
// sends every request with a growing response_id, and records what the agent said and did.
// Used by the terminal chat and the scenarios; runs on Deno and Bun.

export type Item = { role: string; content?: string; [key: string]: unknown };

export interface Reply {
  responseId: number;
  text: string;
  tools: { name: string; arguments: Record<string, unknown>; result?: string; successful?: boolean }[];
  action?: { end_call?: boolean; transfer_number?: string; digit_to_press?: string };
  /** Milliseconds from the request to the first words (undefined if none) and to content_complete. */
  firstWordMs?: number;
  totalMs: number;
  interrupted: boolean;
}

export interface CallOptions {
  callId?: string;
  vars?: Record<string, string>;
  /** Called with every piece of text the agent streams, as it arrives. */
  onText?: (text: string, responseId: number) => void;
  /** Called when the agent invokes a tool or a tool returns. */
  onTool?: (frame: Record<string, unknown>) => void;
  /** Called when the server closes the socket during the call (not after close()). */
  onClose?: (code: number) => void;
}

interface Pending {
  reply: Reply;
  started: number;
  resolve: (reply: Reply) => void;
}

export class RetellCall {
  /** What Retell sends as `transcript`: agent and user utterances. */
  readonly transcript: Item[] = [];
  /** What Retell sends as `transcript_with_tool_calls`: utterances woven with tool calls. */
  readonly woven: Item[] = [];
  greeting = "";
  ended?: Reply["action"];
  private lastId = 0;
  private pending?: Pending;
  private openAgentItems: Item[] = [];
  private pinger?: ReturnType<typeof setInterval>;
  private closed = false;

  private constructor(private readonly ws: WebSocket, private readonly options: CallOptions) {}

  /** Connects like Retell: waits for the greeting (response 0) before resolving. */
  static async connect(baseUrl: string, options: CallOptions = {}): Promise<RetellCall> {
    const callId = options.callId ?? `call_${crypto.randomUUID().slice(0, 8)}`;
    const url = new URL(baseUrl);
    url.pathname = `${url.pathname.replace(/\/$/, "")}/${callId}`;
    const ws = new WebSocket(url);
    const call = new RetellCall(ws, options);
    let greet!: (text: string) => void;
    // Fails fast on a refused connection or an early close, and after 5 s without a greeting.
    const greeted = new Promise<string>((resolve, reject) => {
      let timer: ReturnType<typeof setTimeout>;
      greet = (text) => (clearTimeout(timer), resolve(text));
      ws.onopen = () => timer = setTimeout(() => reject(new Error("no greeting (response_id 0) within 5 s")), 5000);
      ws.onerror = (e) => reject(new Error((e as ErrorEvent).message || `could not connect to ${url}`));
      ws.onclose = (e) => (clearTimeout(timer), reject(new Error(`the server closed the socket (code ${e.code})`)));
    });
    ws.onmessage = (e) => call.receive(JSON.parse(String(e.data)), greet, callId);
    try {
      await greeted;
    } catch (err) {
      call.close();
      throw err;
    }
    ws.onclose = (e) => {
      if (!call.closed) options.onClose?.(e.code);
      call.shutdown();
    };
    return call;
  }

  /** The caller says something; resolves with the agent's complete reply. */
  say(text: string): Promise<Reply> {
    this.interrupt();
    this.addUtterance("user", text);
    return this.request("response_required");
  }

  /** The caller stays silent long enough for Retell to ask for a reminder. */
  silence(): Promise<Reply> {
    this.interrupt();
    return this.request("reminder_required");
  }

  /** Retell asks again for the same transcript, as it does after a reconnect. */
  askAgain(): Promise<Reply> {
    this.interrupt();
    return this.request("response_required");
  }

  /** Carries a call's transcript over, as Retell does when it reconnects to another server. */
  resume(from: RetellCall) {
    this.transcript.push(...from.transcript);
    this.woven.push(...from.woven);
    return this;
  }

  /** True while the agent is still streaming a reply. */
  get speaking() {
    return this.pending !== undefined;
  }

  close() {
    this.ws.close(1000);
    this.shutdown();
  }

  private shutdown() {
    this.closed = true;
    clearInterval(this.pinger);
    this.interrupt();
  }

  private request(type: "response_required" | "reminder_required"): Promise<Reply> {
    if (this.closed) return Promise.reject(new Error("the call has ended"));
    const responseId = ++this.lastId;
    const started = performance.now();
    const reply: Reply = { responseId, text: "", tools: [], totalMs: 0, interrupted: false };
    const done = new Promise<Reply>((resolve) => this.pending = { reply, started, resolve });
    this.send({
      interaction_type: type,
      response_id: responseId,
      transcript: this.transcript,
      transcript_with_tool_calls: this.woven,
    });
    return done;
  }

  /** The caller talks over the agent: what it said so far stays said, the rest of this reply
   * is dropped (as Retell drops it), and the reply resolves as interrupted. A new request while
   * the agent talks does this too. Returns the cut reply, or undefined if the agent was quiet. */
  interrupt(): Reply | undefined {
    const pending = this.pending;
    if (!pending) return;
    this.pending = undefined;
    this.openAgentItems = [];
    const reply = { ...pending.reply, interrupted: true, totalMs: performance.now() - pending.started };
    pending.resolve(reply);
    return reply;
  }

  private send(frame: unknown) {
    if (this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(frame));
  }

  private receive(frame: Record<string, any>, greet: (text: string) => void, callId: string) {
    switch (frame.response_type) {
      case "config":
        if (frame.config?.call_details) {
          const call = { call_id: callId, call_type: "web_call", call_status: "registered" };
          this.send({
            interaction_type: "call_details",
            call: { ...call, retell_llm_dynamic_variables: this.options.vars ?? {} },
          });
        }
        if (frame.config?.auto_reconnect && !this.pinger) {
          this.pinger = setInterval(() => this.send({ interaction_type: "ping_pong", timestamp: Date.now() }), 2000);
        }
        return;
      case "response":
        if (frame.response_id === 0) {
          this.greeting = frame.content ?? "";
          if (this.greeting) this.addUtterance("agent", this.greeting);
          return greet(this.greeting);
        }
        return this.onResponse(frame);
      case "tool_call_invocation":
      case "tool_call_result":
        return this.onToolFrame(frame);
    }
  }

  private onResponse(frame: Record<string, any>) {
    const pending = this.pending;
    if (!pending || frame.response_id !== pending.reply.responseId) return; // stale: Retell drops it
    const { reply } = pending;
    if (frame.content) {
      reply.firstWordMs ??= performance.now() - pending.started;
      reply.text += frame.content;
      this.agentSays(frame.content);
      this.options.onText?.(frame.content, reply.responseId);
    }
    for (const key of ["end_call", "transfer_number", "digit_to_press"] as const) {
      if (frame[key] !== undefined) reply.action = { ...reply.action, [key]: frame[key] };
    }
    if (frame.content_complete) {
      this.pending = undefined;
      this.openAgentItems = [];
      reply.totalMs = performance.now() - pending.started;
      if (reply.action?.end_call || reply.action?.transfer_number) this.ended = reply.action;
      pending.resolve(reply);
    }
  }

  // Tool calls are woven in at the point they happened, between the agent's words.
  private onToolFrame(frame: Record<string, any>) {
    const { response_type, ...fields } = frame;
    this.openAgentItems = [];
    this.woven.push({ role: response_type, ...fields });
    this.options.onTool?.(frame);
    const reply = this.pending?.reply;
    if (!reply) return;
    if (response_type === "tool_call_invocation") {
      let args: Record<string, unknown> = {};
      try {
        args = JSON.parse(frame.arguments);
      } catch { /* kept empty */ }
      reply.tools.push({ name: frame.name, arguments: args });
    } else {
      const call = reply.tools.findLast((t) => t.result === undefined);
      if (call) Object.assign(call, { result: frame.content, successful: frame.successful });
    }
  }

  private agentSays(text: string) {
    if (!this.openAgentItems.length) {
      const spoken = { role: "agent", content: "" };
      const woven = { role: "agent", content: "" };
      this.transcript.push(spoken);
      this.woven.push(woven);
      this.openAgentItems = [spoken, woven];
    }
    for (const item of this.openAgentItems) item.content += text;
  }

  private addUtterance(role: "user" | "agent", content: string) {
    this.transcript.push({ role, content });
    this.woven.push({ role, content });
  }
}
