/**
 * A scriptable stand-in for the Anthropic Messages API (`POST /v1/messages`) on 127.0.0.1, close
 * enough to the wire format that `@anthropic-ai/sdk` accepts its answers: plain JSON messages, SSE
 * streams, error bodies, retry headers, delays, error events inside a stream, paced and stalled
 * streams, and connections that hang, reset or are cut.
 */
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';

export type FakeBlock =
  { type: 'text'; text: string } | { type: 'tool_use'; id: string; name: string; input: unknown };

export type FakeUsage = {
  input_tokens: number;
  output_tokens: number;
  cache_read_input_tokens?: number;
  cache_creation_input_tokens?: number;
};

export type FakeResponse = {
  /** HTTP status; 200 when omitted. */
  status?: number;
  /**
   * Error for non-2xx answers: `{ type, message }` is wrapped in the Anthropic error envelope, any
   * other value is sent as the JSON body as is; an envelope matching the status when omitted.
   */
  error?: unknown;
  /** Extra response headers (`retry-after`, `retry-after-ms`, `x-should-retry`, ...). */
  headers?: Record<string, string>;
  /** Wait this long before answering. */
  delayMs?: number;
  /** The answer's content blocks; one text block saying "ok" when omitted. */
  content?: FakeBlock[];
  stopReason?: string;
  stopSequence?: string | null;
  usage?: FakeUsage;
  model?: string;
  /** Never answer: no status, no headers, until the client goes away. */
  hang?: boolean;
  /** Reset the connection (TCP RST) instead of answering. */
  reset?: boolean;
  /**
   * Streams only: split each text block, and each tool input's JSON, into deltas of this many
   * characters (whole when omitted). Every `content_block_delta` counts as one delta below; "after
   * 0 deltas" means right after `message_start`.
   */
  chunkSize?: number;
  /** Streams only: wait this long after each delta. */
  deltaIntervalMs?: number;
  /** Streams only: send an `overloaded_error` event after this many deltas, then end. */
  overloadedAfterDeltas?: number;
  /** Streams only: send an `error` event (`streamError`) after this many deltas, then end. */
  errorAfterDeltas?: number;
  /** The error of `errorAfterDeltas`; `overloaded_error` when omitted. */
  streamError?: { type: string; message: string };
  /** Streams only: destroy the socket (a FIN, no HTTP end) after this many deltas. */
  cutAfterDeltas?: number;
  /** Streams only: reset the connection (TCP RST) after this many deltas. */
  resetAfterDeltas?: number;
  /** Streams only: end the response cleanly after this many deltas, without `message_stop`. */
  endWithoutStopAfterDeltas?: number;
  /**
   * Streams only: after this many deltas send nothing but `: ping` comment lines, every
   * `keepAliveMs` (50 by default), until the client goes away.
   */
  stallAfterDeltas?: number;
  keepAliveMs?: number;
};

export type RecordedRequest = {
  method: string;
  path: string;
  body: unknown;
  headers: Record<string, string>;
};

export type FakeAnthropic = {
  url: string;
  requests: RecordedRequest[];
  /** Queues answers for the next requests, in order; requests beyond the queue get a default. */
  script(responses: FakeResponse[]): void;
  /** Answers every request the script does not cover (the default answer when unset). */
  otherwise(answer: (() => FakeResponse) | undefined): void;
  /** Drops unanswered scripted responses and the request log. */
  reset(): void;
  /** Connections that carried a request and are still open (kept-alive ones included). */
  openSockets(): number;
  close(): Promise<void>;
};

const DEFAULT_USAGE: FakeUsage = { input_tokens: 10, output_tokens: 2 };

function errorTypeFor(status: number): string {
  if (status === 400) return 'invalid_request_error';
  if (status === 401) return 'authentication_error';
  if (status === 403) return 'permission_error';
  if (status === 404) return 'not_found_error';
  if (status === 413) return 'request_too_large';
  if (status === 429) return 'rate_limit_error';
  if (status === 529) return 'overloaded_error';
  return 'api_error';
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function readBody(req: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function plainHeaders(req: IncomingMessage): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(req.headers)) {
    if (v !== undefined) out[k.toLowerCase()] = Array.isArray(v) ? v.join(', ') : v;
  }
  return out;
}

function sse(res: ServerResponse, event: string, data: unknown): void {
  res.write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
}

function chunks(text: string, size: number | undefined): string[] {
  if (size === undefined || size <= 0 || text.length <= size) return [text];
  const out: string[] = [];
  for (let i = 0; i < text.length; i += size) out.push(text.slice(i, i + size));
  return out;
}

export async function startFakeAnthropic(): Promise<FakeAnthropic> {
  const queue: FakeResponse[] = [];
  let fallback: (() => FakeResponse) | undefined;
  const requests: RecordedRequest[] = [];
  let counter = 0;

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const raw = await readBody(req);
    let body: unknown = raw;
    try {
      body = JSON.parse(raw);
    } catch {
      // keep the raw text
    }
    const path = (req.url ?? '').split('?')[0] ?? '';
    requests.push({ method: req.method ?? '', path, body, headers: plainHeaders(req) });

    if (req.method !== 'POST' || path !== '/v1/messages') {
      res.writeHead(404, { 'content-type': 'application/json' });
      res.end(
        JSON.stringify({ type: 'error', error: { type: 'not_found_error', message: 'Not found' } }),
      );
      return;
    }

    const spec = queue.shift() ?? fallback?.() ?? {};
    if (spec.reset) {
      req.socket.resetAndDestroy();
      return;
    }
    if (spec.hang) {
      await closed(res);
      return;
    }
    if (spec.delayMs) await sleep(spec.delayMs);
    const status = spec.status ?? 200;
    const extra = spec.headers ?? {};
    counter += 1;
    const id = `msg_fake_${counter}`;

    if (status < 200 || status >= 300) {
      const errBody =
        spec.error === undefined
          ? { type: 'error', error: { type: errorTypeFor(status), message: `status ${status}` } }
          : isErrorDetail(spec.error)
            ? { type: 'error', error: spec.error }
            : spec.error;
      res.writeHead(status, { 'content-type': 'application/json', ...extra });
      res.end(JSON.stringify(errBody));
      return;
    }

    const requested = body as { model?: unknown; stream?: unknown };
    const model =
      spec.model ?? (typeof requested.model === 'string' ? requested.model : 'fake-model');
    const content = spec.content ?? [{ type: 'text', text: 'ok' }];
    const usage = spec.usage ?? DEFAULT_USAGE;
    const stopReason =
      spec.stopReason ?? (content.some((b) => b.type === 'tool_use') ? 'tool_use' : 'end_turn');
    const stopSequence = spec.stopSequence ?? null;

    if (requested.stream !== true) {
      res.writeHead(200, { 'content-type': 'application/json', ...extra });
      res.end(
        JSON.stringify({
          id,
          type: 'message',
          role: 'assistant',
          model,
          content,
          stop_reason: stopReason,
          stop_sequence: stopSequence,
          usage,
        }),
      );
      return;
    }

    res.writeHead(200, {
      'content-type': 'text/event-stream',
      'cache-control': 'no-cache',
      ...extra,
    });
    sse(res, 'message_start', {
      type: 'message_start',
      message: {
        id,
        type: 'message',
        role: 'assistant',
        model,
        content: [],
        stop_reason: null,
        stop_sequence: null,
        usage: { ...usage, output_tokens: 0 },
      },
    });
    let deltas = 0;
    if (await interrupt(res, spec, deltas)) return;
    for (const [index, block] of content.entries()) {
      const { start, pieces } = blockEvents(block, spec.chunkSize);
      sse(res, 'content_block_start', { type: 'content_block_start', index, content_block: start });
      for (const delta of pieces) {
        sse(res, 'content_block_delta', { type: 'content_block_delta', index, delta });
        deltas += 1;
        if (await interrupt(res, spec, deltas)) return;
        if (spec.deltaIntervalMs) await sleep(spec.deltaIntervalMs);
      }
      sse(res, 'content_block_stop', { type: 'content_block_stop', index });
    }
    sse(res, 'message_delta', {
      type: 'message_delta',
      delta: { stop_reason: stopReason, stop_sequence: stopSequence },
      usage: { output_tokens: usage.output_tokens },
    });
    sse(res, 'message_stop', { type: 'message_stop' });
    res.end();
  };

  const server = createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      if (!res.headersSent) {
        res.writeHead(500, { 'content-type': 'application/json' });
        res.end(
          JSON.stringify({ type: 'error', error: { type: 'api_error', message: String(err) } }),
        );
      } else {
        res.destroy();
      }
    });
  });
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
    url: `http://127.0.0.1:${port}`,
    requests,
    openSockets: () => sockets.size,
    otherwise(answer) {
      fallback = answer;
    },
    script(responses) {
      queue.push(...responses);
    },
    reset() {
      queue.length = 0;
      requests.length = 0;
    },
    close() {
      server.closeAllConnections();
      return new Promise<void>((resolve, reject) =>
        server.close((err) => (err ? reject(err) : resolve())),
      );
    },
  };
}

/** The start of a content block and its deltas, in wire form. */
function blockEvents(
  block: FakeBlock,
  size: number | undefined,
): { start: Record<string, unknown>; pieces: Record<string, unknown>[] } {
  if (block.type === 'text') {
    return {
      start: { type: 'text', text: '' },
      pieces: chunks(block.text, size).map((text) => ({ type: 'text_delta', text })),
    };
  }
  return {
    start: { type: 'tool_use', id: block.id, name: block.name, input: {} },
    pieces: chunks(JSON.stringify(block.input), size).map((partial_json) => ({
      type: 'input_json_delta',
      partial_json,
    })),
  };
}

/** Resolves when the response is closed, by its end or by the client going away. */
function closed(res: ServerResponse): Promise<void> {
  if (res.destroyed || res.socket?.destroyed !== false) return Promise.resolve();
  return new Promise((resolve) => res.once('close', () => resolve()));
}

/**
 * Carries out whatever `spec` asks for once `deltas` deltas have been sent; true when the answer
 * is over (cut, reset, ended, errored or stalled until the client left).
 */
async function interrupt(
  res: ServerResponse,
  spec: FakeResponse,
  deltas: number,
): Promise<boolean> {
  if (spec.cutAfterDeltas === deltas) {
    await sleep(20);
    res.socket?.destroy();
    return true;
  }
  if (spec.resetAfterDeltas === deltas) {
    await sleep(20);
    res.socket?.resetAndDestroy();
    return true;
  }
  const error =
    spec.overloadedAfterDeltas === deltas
      ? { type: 'overloaded_error', message: 'Overloaded' }
      : spec.errorAfterDeltas === deltas
        ? (spec.streamError ?? { type: 'overloaded_error', message: 'Overloaded' })
        : undefined;
  if (error) {
    sse(res, 'error', { type: 'error', error });
    res.end();
    return true;
  }
  if (spec.endWithoutStopAfterDeltas === deltas) {
    res.end();
    return true;
  }
  if (spec.stallAfterDeltas === deltas) {
    const gone = closed(res);
    let left = false;
    void gone.then(() => (left = true));
    while (!left) {
      res.write(': ping\n\n');
      await Promise.race([gone, sleep(spec.keepAliveMs ?? 50)]);
    }
    return true;
  }
  return false;
}

function isErrorDetail(value: unknown): value is { type: string; message: string } {
  if (typeof value !== 'object' || value === null) return false;
  const v = value as Record<string, unknown>;
  return typeof v.type === 'string' && typeof v.message === 'string' && !('error' in v);
}
