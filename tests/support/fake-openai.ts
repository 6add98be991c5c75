/**
 * A loopback server that speaks enough of OpenAI's Chat Completions API (`POST /v1/chat/completions`,
 * JSON and server-sent events) for the official `openai` SDK, scripted one response per request:
 * answers, error bodies, paced and stalled streams, error chunks, and connections that hang, reset
 * or are cut.
 */
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';

export type FakeToolCall = { id: string; name: string; arguments: string };

export type FakeOpenAIResponse = {
  /** HTTP status; 200 unless an error is given (then 400). */
  status?: number;
  /** An OpenAI-shaped error, sent as `{ error: { message, type, code, param } }`. */
  error?: { message: string; type?: string; code?: string | null; param?: string | null };
  /** A raw body sent as is instead of the generated one (a string verbatim, else as JSON). */
  rawBody?: unknown;
  /** Extra response headers, e.g. `retry-after`, `retry-after-ms`. */
  headers?: Record<string, string>;
  /** Wait this long before answering. */
  delayMs?: number;
  text?: string | null;
  toolCalls?: FakeToolCall[];
  /** `stop` by default, `tool_calls` when tool calls are given. */
  finishReason?: string;
  usage?: { promptTokens: number; completionTokens: number; cachedTokens?: number };
  /** The model named in the answer; the request's model by default. */
  model?: string;
  /** Streaming only: send this many chunks, then end the body without a finish_reason or [DONE]. */
  cutAfterChunks?: number;
  /** Send the status and headers, then only keep-alive comment lines until the client goes away. */
  silent?: boolean;
  /** Never answer: no status, no headers, until the client goes away. */
  hang?: boolean;
  /** Reset the connection (TCP RST) instead of answering. */
  reset?: boolean;
  /**
   * Streaming only, like every option below: wait this long after each delta. A delta is a chunk
   * that carries text or a piece of a tool call (the first chunk, with the role, is always sent
   * and does not count); "after 0 deltas" means right after that first chunk.
   */
  deltaIntervalMs?: number;
  /** After this many deltas send only `: keep-alive` comments, every `keepAliveMs` (50). */
  stallAfterDeltas?: number;
  keepAliveMs?: number;
  /** After this many deltas end the body cleanly: no finish_reason, usage or [DONE]. */
  endWithoutStopAfterDeltas?: number;
  /** After this many deltas send `data: {"error": streamError}`, then end the body. */
  errorAfterDeltas?: number;
  /** The error of `errorAfterDeltas`; a `server_error` when omitted. */
  streamError?: { message: string; type?: string; code?: string | null };
  /** After this many deltas destroy the socket (a FIN, no HTTP end). */
  destroyAfterDeltas?: number;
  /** After this many deltas reset the connection (TCP RST). */
  resetAfterDeltas?: number;
  /** Send the whole answer, finish_reason and usage included, but not the [DONE] marker. */
  omitDone?: boolean;
};

export type FakeOpenAIRequest = {
  method: string;
  path: string;
  body: unknown;
  headers: Record<string, string>;
};

export type FakeOpenAI = {
  /** Base URL for the SDK's `baseURL` (ends in `/v1`). */
  url: string;
  requests: FakeOpenAIRequest[];
  /** Queues responses; each request takes the next one, or the default answer when none is left. */
  script(...responses: FakeOpenAIResponse[]): void;
  /** Answers every request the script does not cover (the default answer when unset). */
  otherwise(answer: ((request: FakeOpenAIRequest) => FakeOpenAIResponse) | undefined): void;
  /** Connections that carried a request and are still open (kept-alive ones included). */
  openSockets(): number;
  close(): Promise<void>;
};

export const DEFAULT_ANSWER = 'default answer';

export async function startFakeOpenAI(): Promise<FakeOpenAI> {
  const queue: FakeOpenAIResponse[] = [];
  let fallback: ((request: FakeOpenAIRequest) => FakeOpenAIResponse) | undefined;
  const requests: FakeOpenAIRequest[] = [];
  const timers = new Set<NodeJS.Timeout>();
  let counter = 0;

  const later = (ms: number): Promise<void> =>
    new Promise((resolve) => {
      const t = setTimeout(() => {
        timers.delete(t);
        resolve();
      }, ms);
      timers.add(t);
    });

  const server = createServer((req, res) => {
    void handle(req, res).catch(() => res.destroy());
  });

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    const raw = Buffer.concat(chunks).toString('utf8');
    let body: unknown = raw;
    try {
      body = raw ? JSON.parse(raw) : undefined;
    } catch {
      // kept as text
    }
    const headers: Record<string, string> = {};
    for (const [k, v] of Object.entries(req.headers)) {
      if (v !== undefined) headers[k] = Array.isArray(v) ? v.join(', ') : v;
    }
    const request: FakeOpenAIRequest = {
      method: req.method ?? '',
      path: req.url ?? '',
      body,
      headers,
    };
    requests.push(request);

    if (req.method !== 'POST' || req.url !== '/v1/chat/completions') {
      sendJson(res, 404, {
        error: { message: 'Not found', type: 'invalid_request_error', code: null, param: null },
      });
      return;
    }
    const r = queue.shift() ?? fallback?.(request) ?? { text: DEFAULT_ANSWER };
    if (r.reset) {
      req.socket.resetAndDestroy();
      return;
    }
    if (r.hang) {
      await keepAlive(res, false);
      return;
    }
    if (r.delayMs) await later(r.delayMs);

    const extra = r.headers ?? {};
    const status = r.status ?? (r.error ? 400 : 200);
    if (r.rawBody !== undefined) {
      const text = typeof r.rawBody === 'string' ? r.rawBody : JSON.stringify(r.rawBody);
      res.writeHead(status, { 'content-type': 'application/json', ...extra });
      res.end(text);
      return;
    }
    if (r.error) {
      sendJson(
        res,
        status,
        {
          error: {
            message: r.error.message,
            type: r.error.type ?? 'invalid_request_error',
            code: r.error.code ?? null,
            param: r.error.param ?? null,
          },
        },
        extra,
      );
      return;
    }

    const req0 = (typeof body === 'object' && body !== null ? body : {}) as {
      model?: string;
      stream?: boolean;
      stream_options?: { include_usage?: boolean };
    };
    counter += 1;
    const id = `chatcmpl-fake-${counter}`;
    const created = Math.floor(Date.now() / 1000);
    const model = r.model ?? req0.model ?? 'fake-model';
    const finish = r.finishReason ?? (r.toolCalls?.length ? 'tool_calls' : 'stop');
    const u = r.usage ?? { promptTokens: 10, completionTokens: 5 };
    const usage: Record<string, unknown> = {
      prompt_tokens: u.promptTokens,
      completion_tokens: u.completionTokens,
      total_tokens: u.promptTokens + u.completionTokens,
    };
    if (u.cachedTokens !== undefined) {
      usage.prompt_tokens_details = { cached_tokens: u.cachedTokens };
    }
    const text = r.text === undefined ? (r.toolCalls?.length ? null : DEFAULT_ANSWER) : r.text;

    if (req0.stream) {
      res.writeHead(status, {
        'content-type': 'text/event-stream',
        'cache-control': 'no-cache',
        connection: 'keep-alive',
        ...extra,
      });
      if (r.silent) {
        await keepAlive(res);
        return;
      }
      const base = { id, object: 'chat.completion.chunk', created, model };
      /** A chunk, and whether it counts as a delta. */
      const events: { data: unknown; delta: boolean }[] = [];
      const chunk = (delta: unknown, finishReason: string | null = null): unknown => ({
        ...base,
        choices: [{ index: 0, delta, finish_reason: finishReason, logprobs: null }],
      });
      const push = (data: unknown, delta = true) => events.push({ data, delta });
      push(chunk({ role: 'assistant', content: '' }), false);
      if (text) {
        for (const piece of text.match(/\S+\s*|\s+/g) ?? []) push(chunk({ content: piece }));
      }
      (r.toolCalls ?? []).forEach((tc, index) => {
        push(
          chunk({
            tool_calls: [
              { index, id: tc.id, type: 'function', function: { name: tc.name, arguments: '' } },
            ],
          }),
        );
        const half = Math.ceil(tc.arguments.length / 2);
        for (const part of [tc.arguments.slice(0, half), tc.arguments.slice(half)]) {
          if (part) push(chunk({ tool_calls: [{ index, function: { arguments: part } }] }));
        }
      });
      push(chunk({}, finish), false);
      if (req0.stream_options?.include_usage) push({ ...base, choices: [], usage }, false);
      const limit = r.cutAfterChunks ?? Infinity;
      let deltas = 0;
      for (const [i, e] of events.entries()) {
        if (i >= limit) {
          res.end();
          return;
        }
        res.write(`data: ${JSON.stringify(e.data)}\n\n`);
        if (i > 0 && !e.delta) continue;
        if (e.delta) deltas += 1;
        if (await interrupt(res, r, deltas)) return;
        if (e.delta && r.deltaIntervalMs) await later(r.deltaIntervalMs);
      }
      res.end(r.omitDone ? undefined : 'data: [DONE]\n\n');
      return;
    }

    if (r.silent) {
      res.writeHead(status, { 'content-type': 'application/json', ...extra });
      res.flushHeaders();
      await keepAlive(res, false);
      return;
    }
    const message: Record<string, unknown> = { role: 'assistant', content: text, refusal: null };
    if (r.toolCalls?.length) {
      message.tool_calls = r.toolCalls.map((tc) => ({
        id: tc.id,
        type: 'function',
        function: { name: tc.name, arguments: tc.arguments },
      }));
    }
    sendJson(
      res,
      status,
      {
        id,
        object: 'chat.completion',
        created,
        model,
        choices: [{ index: 0, message, finish_reason: finish, logprobs: null }],
        usage,
      },
      extra,
    );
  }

  /** Holds the response open (with `: keep-alive` comments when `comments`) until the client leaves. */
  async function keepAlive(res: ServerResponse, comments = true, everyMs = 50): Promise<void> {
    while (!res.destroyed && !res.writableEnded && res.socket && !res.socket.destroyed) {
      if (comments) res.write(': keep-alive\n\n');
      await later(everyMs);
    }
  }

  /**
   * Carries out whatever `r` asks for once `deltas` deltas have been sent; true when the answer is
   * over (ended, errored, cut, reset, or stalled until the client left).
   */
  async function interrupt(res: ServerResponse, r: FakeOpenAIResponse, deltas: number) {
    if (r.endWithoutStopAfterDeltas === deltas) {
      res.end();
      return true;
    }
    if (r.errorAfterDeltas === deltas) {
      const e = r.streamError ?? {
        message: 'The server had an error while processing your request.',
        type: 'server_error',
      };
      const error = { message: e.message, type: e.type ?? 'server_error', code: e.code ?? null };
      res.end(`data: ${JSON.stringify({ error })}\n\n`);
      return true;
    }
    if (r.destroyAfterDeltas === deltas || r.resetAfterDeltas === deltas) {
      await later(20);
      if (r.resetAfterDeltas === deltas) res.socket?.resetAndDestroy();
      else res.socket?.destroy();
      return true;
    }
    if (r.stallAfterDeltas === deltas) {
      await keepAlive(res, true, r.keepAliveMs);
      return true;
    }
    return false;
  }

  function sendJson(
    res: ServerResponse,
    status: number,
    payload: unknown,
    extra: Record<string, string> = {},
  ): void {
    res.writeHead(status, { 'content-type': 'application/json', ...extra });
    res.end(JSON.stringify(payload));
  }

  // Sockets that carried a request. undici may open a spare connection after an aborted request,
  // one that never carries a request; it is not counted, so a count of 0 means every connection
  // that served a request has been closed.
  const sockets = new Set<Socket>();
  server.on('request', (req: IncomingMessage) => {
    const { socket } = req;
    if (sockets.has(socket) || socket.destroyed) return;
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;

  return {
    url: `http://127.0.0.1:${port}/v1`,
    requests,
    openSockets: () => sockets.size,
    otherwise(answer) {
      fallback = answer;
    },
    script(...responses) {
      queue.push(...responses);
    },
    close() {
      for (const t of timers) clearTimeout(t);
      timers.clear();
      server.closeAllConnections();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}
