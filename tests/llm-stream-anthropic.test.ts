/**
 * `anthropicProvider(...).stream()` through the real `@anthropic-ai/sdk` against the fake Messages
 * API: the events it yields, the answer it ends with, and how a failing stream fails.
 */
import { createServer } from 'node:net';
import type { AddressInfo } from 'node:net';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { anthropicProvider, ProviderError } from '../adapters/llm/anthropic.ts';
import { classifyFailure } from '../engine/llm/classify.ts';
import type { LlmProvider, LlmRequest, ProviderStreamEvent } from '../engine/llm/types.ts';
import {
  startFakeAnthropic,
  type FakeAnthropic,
  type FakeResponse,
} from './support/fake-anthropic.ts';
import { waitFor } from './support/index.ts';

const KEY = 'sk-ant-test-5d1e9c7b3a2f4e60secret';
const ASK: LlmRequest = { messages: [{ role: 'user', content: 'hi' }], maxTokens: 64 };

type Outcome = { events: ProviderStreamEvent[]; error?: unknown };

/** Reads a stream to its end, keeping what it yielded and what it threw. */
async function drain(stream: AsyncIterable<ProviderStreamEvent>): Promise<Outcome> {
  const events: ProviderStreamEvent[] = [];
  try {
    for await (const event of stream) events.push(event);
  } catch (error) {
    return { events, error };
  }
  return { events };
}

function failureOf(outcome: Outcome): ProviderError {
  if (outcome.error instanceof ProviderError) return outcome.error;
  throw new Error(`expected a ProviderError, got ${String(outcome.error)}`);
}

const texts = (events: ProviderStreamEvent[]) =>
  events.flatMap((e) => (e.type === 'text' ? [e.text] : []));
const kinds = (events: ProviderStreamEvent[]) => events.map((e) => e.type);
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

/** Runs `body` against a fake of its own, so that its socket count starts at zero. */
async function withOwnFake(body: (fake: FakeAnthropic) => Promise<void>): Promise<void> {
  const fake = await startFakeAnthropic();
  try {
    await body(fake);
  } finally {
    await fake.close();
  }
}

const unhandled: unknown[] = [];
const onUnhandled = (reason: unknown) => unhandled.push(reason);
beforeAll(() => {
  process.on('unhandledRejection', onUnhandled);
});
afterAll(() => {
  process.off('unhandledRejection', onUnhandled);
});
afterEach(async () => {
  await sleep(30);
  expect(unhandled).toEqual([]);
});

describe('anthropic stream: answers', () => {
  let fake: FakeAnthropic;
  beforeAll(async () => {
    fake = await startFakeAnthropic();
  });
  afterAll(async () => {
    await fake.close();
  });
  beforeEach(() => fake.reset());

  const provider = (): LlmProvider =>
    anthropicProvider({ apiKey: KEY, baseURL: fake.url, model: 'claude-fake-1' });

  it('yields usage from message_start first, each text delta, the output count, then one done', async () => {
    fake.script([
      {
        content: [{ type: 'text', text: 'Hello' }],
        chunkSize: 3,
        usage: {
          input_tokens: 11,
          output_tokens: 3,
          cache_read_input_tokens: 8,
          cache_creation_input_tokens: 2,
        },
      },
    ]);
    const { events, error } = await drain(provider().stream!(ASK));
    expect(error).toBeUndefined();
    const done = events.at(-1);
    expect(done?.type).toBe('done');
    const latencyMs = done?.type === 'done' ? done.response.latencyMs : -1;
    expect(latencyMs).toBeGreaterThanOrEqual(0);
    expect(events).toEqual([
      { type: 'usage', usage: { inputTokens: 11, cacheReadTokens: 8, cacheWriteTokens: 2 } },
      { type: 'text', text: 'Hel' },
      { type: 'text', text: 'lo' },
      { type: 'usage', usage: { outputTokens: 3 } },
      {
        type: 'done',
        response: {
          text: 'Hello',
          toolCalls: [],
          stopReason: 'end',
          usage: { inputTokens: 11, outputTokens: 3, cacheReadTokens: 8, cacheWriteTokens: 2 },
          provider: 'anthropic',
          model: 'claude-fake-1',
          tier: '',
          degraded: false,
          latencyMs,
        },
      },
    ]);
    expect(fake.requests.length).toBe(1);
    expect(fake.requests[0]?.body).toEqual({
      model: 'claude-fake-1',
      max_tokens: 64,
      messages: [{ role: 'user', content: 'hi' }],
      stream: true,
    });
    expect(fake.requests[0]?.headers['x-stainless-retry-count']).toBe('0');
  });

  const cases: { name: string; script: FakeResponse; request: LlmRequest }[] = [
    {
      name: 'text and two tool calls whose JSON arrives in pieces',
      script: {
        content: [
          { type: 'text', text: 'Looking both up.' },
          { type: 'tool_use', id: 'toolu_1', name: 'lookup', input: { word: 'keel', n: 2 } },
          { type: 'tool_use', id: 'toolu_2', name: 'define', input: { terms: ['a', 'b'] } },
        ],
        chunkSize: 4,
        usage: { input_tokens: 40, output_tokens: 22, cache_read_input_tokens: 30 },
      },
      request: {
        ...ASK,
        system: 'Use tools.',
        tools: [{ name: 'lookup', inputSchema: { type: 'object' } }],
        toolChoice: 'auto',
      },
    },
    {
      name: 'a fenced JSON answer, unwrapped in JSON mode',
      script: { content: [{ type: 'text', text: '```json\n{"ok":true}\n```' }], chunkSize: 5 },
      request: { ...ASK, json: true },
    },
    {
      name: 'a stop sequence',
      script: { content: [{ type: 'text', text: 'one two' }], stopReason: 'stop_sequence' },
      request: { ...ASK, stopSequences: ['three'] },
    },
    {
      name: 'a max_tokens stop with a model of its own',
      script: {
        content: [{ type: 'text', text: 'abcdefghij' }],
        chunkSize: 1,
        stopReason: 'max_tokens',
        model: 'claude-fake-1-20250101',
      },
      request: { ...ASK, model: 'claude-other' },
    },
    {
      name: 'a tool call with no input',
      script: { content: [{ type: 'tool_use', id: 'toolu_e', name: 'now', input: {} }] },
      request: ASK,
    },
  ];

  for (const { name, script, request } of cases) {
    it(`done holds exactly what complete() returns: ${name}`, async () => {
      fake.script([script, script]);
      const completed = await provider().complete(request);
      const { events, error } = await drain(provider().stream!(request));
      expect(error).toBeUndefined();
      const done = events.at(-1);
      if (done?.type !== 'done') throw new Error('no done event');
      expect({ ...done.response, latencyMs: 0 }).toEqual({ ...completed, latencyMs: 0 });
      expect(events.filter((e) => e.type === 'done').length).toBe(1);
      // The streamed text is the answer's text (before a JSON fence is unwrapped).
      const raw = script.content?.flatMap((b) => (b.type === 'text' ? [b.text] : [])).join('');
      expect(texts(events).join('')).toBe(raw);
      expect(fake.requests.map((r) => r.body)).toEqual([
        fake.requests[0]?.body,
        { ...(fake.requests[0]?.body as object), stream: true },
      ]);
    });
  }

  it('a whole-call timeoutMs does not cut a stream that keeps producing', async () => {
    fake.script([
      { content: [{ type: 'text', text: 'abcdefgh' }], chunkSize: 1, deltaIntervalMs: 50 },
    ]);
    const p = anthropicProvider({
      apiKey: KEY,
      baseURL: fake.url,
      model: 'claude-fake-1',
      timeoutMs: 150,
    });
    const started = Date.now();
    const { events, error } = await drain(p.stream(ASK));
    expect(error).toBeUndefined();
    expect(Date.now() - started).toBeGreaterThanOrEqual(350);
    expect(texts(events)).toEqual(['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h']);
    expect(kinds(events).at(-1)).toBe('done');
  });
});

describe('anthropic stream: failures', () => {
  let fake: FakeAnthropic;
  beforeAll(async () => {
    fake = await startFakeAnthropic();
  });
  afterAll(async () => {
    await fake.close();
  });
  beforeEach(() => fake.reset());

  const provider = () =>
    anthropicProvider({ apiKey: KEY, baseURL: fake.url, model: 'claude-fake-1' });

  it('L03: message_start then overloaded_error before any text is an overloaded failure, no status', async () => {
    fake.script([{ content: [{ type: 'text', text: 'Hello' }], errorAfterDeltas: 0 }]);
    const outcome = await drain(provider().stream(ASK));
    expect(kinds(outcome.events)).toEqual(['usage']);
    const err = failureOf(outcome);
    expect(err.failure).toEqual({
      body: { type: 'error', error: { type: 'overloaded_error', message: 'Overloaded' } },
      message: 'error event after 0 text characters: overloaded_error: Overloaded',
    });
    expect(err.message).toBe(
      'anthropic: error event after 0 text characters: overloaded_error: Overloaded',
    );
    expect(classifyFailure(err.failure)).toEqual({
      class: 'overloaded',
      reason: 'overloaded_error in stream',
    });
    expect(fake.requests.length).toBe(1);
  });

  it('L03: overloaded_error after the text "Hel" yields "Hel", then the overloaded failure', async () => {
    fake.script([
      { content: [{ type: 'text', text: 'Hello there' }], chunkSize: 3, errorAfterDeltas: 1 },
    ]);
    const outcome = await drain(provider().stream(ASK));
    expect(kinds(outcome.events)).toEqual(['usage', 'text']);
    expect(texts(outcome.events)).toEqual(['Hel']);
    const err = failureOf(outcome);
    expect(err.failure.status).toBeUndefined();
    expect(err.failure.kind).toBeUndefined();
    expect(err.failure.body).toEqual({
      type: 'error',
      error: { type: 'overloaded_error', message: 'Overloaded' },
    });
    expect(err.failure.message).toBe(
      'error event after 3 text characters: overloaded_error: Overloaded',
    );
    expect(classifyFailure(err.failure).class).toBe('overloaded');
    expect(fake.requests.length).toBe(1);
  });

  it('an api_error event is a server failure, and a key it echoes is scrubbed', async () => {
    fake.script([
      {
        content: [{ type: 'text', text: 'abcdef' }],
        chunkSize: 2,
        errorAfterDeltas: 2,
        streamError: { type: 'api_error', message: `internal error for key ${KEY}` },
      },
    ]);
    const outcome = await drain(provider().stream(ASK));
    expect(texts(outcome.events)).toEqual(['ab', 'cd']);
    const err = failureOf(outcome);
    expect(err.failure.body).toEqual({
      type: 'error',
      error: { type: 'api_error', message: 'internal error for key [key]' },
    });
    expect(err.message).toBe(
      'anthropic: error event after 4 text characters: api_error: internal error for key [key]',
    );
    expect(JSON.stringify(err.failure)).not.toContain(KEY);
    expect(classifyFailure(err.failure)).toEqual({
      class: 'server',
      reason: 'api_error in stream',
    });
  });

  it('L05: a stream that ends cleanly without message_stop is truncated and never done', async () => {
    fake.script([
      {
        content: [{ type: 'text', text: 'Hello world, more' }],
        chunkSize: 3,
        endWithoutStopAfterDeltas: 2,
      },
    ]);
    const outcome = await drain(provider().stream(ASK));
    expect(kinds(outcome.events)).toEqual(['usage', 'text', 'text']);
    expect(texts(outcome.events)).toEqual(['Hel', 'lo ']);
    const err = failureOf(outcome);
    expect(err.failure).toEqual({
      kind: 'truncated',
      message: 'stream ended without message_stop after 6 text characters',
    });
    expect(classifyFailure(err.failure).class).toBe('truncated');
    expect(fake.requests.length).toBe(1);
  });

  it('a stream whose last text arrived but whose message_stop did not is still truncated', async () => {
    fake.script([{ content: [{ type: 'text', text: 'whole' }], endWithoutStopAfterDeltas: 1 }]);
    const outcome = await drain(provider().stream(ASK));
    expect(texts(outcome.events)).toEqual(['whole']);
    expect(kinds(outcome.events)).not.toContain('done');
    expect(failureOf(outcome).failure.kind).toBe('truncated');
  });

  it('a socket the server closes mid-stream is truncated, with the code and the text count', async () => {
    fake.script([
      { content: [{ type: 'text', text: 'abcdefgh' }], chunkSize: 3, cutAfterDeltas: 2 },
    ]);
    const outcome = await drain(provider().stream(ASK));
    expect(texts(outcome.events)).toEqual(['abc', 'def']);
    const err = failureOf(outcome);
    expect(err.failure).toEqual({
      kind: 'truncated',
      code: 'UND_ERR_SOCKET',
      message: 'stream cut after 6 text characters: the server closed the connection',
    });
    expect(classifyFailure(err.failure)).toEqual({
      class: 'truncated',
      reason: 'stream truncated',
    });
  });

  it('a connection reset mid-stream is a network failure with ECONNRESET', async () => {
    fake.script([
      { content: [{ type: 'text', text: 'abcdefgh' }], chunkSize: 3, resetAfterDeltas: 1 },
    ]);
    const outcome = await drain(provider().stream(ASK));
    expect(texts(outcome.events)).toEqual(['abc']);
    const err = failureOf(outcome);
    expect(err.failure).toEqual({
      kind: 'network',
      code: 'ECONNRESET',
      message: 'connection lost (ECONNRESET) after 3 text characters',
    });
    expect(classifyFailure(err.failure)).toEqual({
      class: 'network',
      reason: 'network error ECONNRESET',
    });
  });

  it('a connection reset before any headers is a network failure, after one request', async () => {
    fake.script([{ reset: true }]);
    const outcome = await drain(provider().stream(ASK));
    expect(outcome.events).toEqual([]);
    const err = failureOf(outcome);
    expect([err.failure.kind, err.failure.code, err.failure.status]).toEqual([
      'network',
      'ECONNRESET',
      undefined,
    ]);
    expect(classifyFailure(err.failure).class).toBe('network');
    expect(fake.requests.length).toBe(1);
  });

  it('connection refused is a network failure with ECONNREFUSED', async () => {
    const port = await closedPort();
    const p = anthropicProvider({
      apiKey: KEY,
      baseURL: `http://127.0.0.1:${port}`,
      model: 'claude-fake-1',
    });
    const err = failureOf(await drain(p.stream(ASK)));
    expect([err.failure.kind, err.failure.code]).toEqual(['network', 'ECONNREFUSED']);
    expect(JSON.stringify(err.failure)).not.toContain(KEY);
  });

  it('an HTTP 529 before the stream keeps its status, body and retry-after', async () => {
    fake.script([
      {
        status: 529,
        error: { type: 'overloaded_error', message: 'Overloaded' },
        headers: { 'retry-after': '3' },
      },
    ]);
    const err = failureOf(await drain(provider().stream(ASK)));
    expect(err.failure.status).toBe(529);
    expect(err.failure.body).toEqual({
      type: 'error',
      error: { type: 'overloaded_error', message: 'Overloaded' },
    });
    expect(classifyFailure(err.failure)).toEqual({
      class: 'overloaded',
      retryAfterMs: 3000,
      reason: '529 overloaded_error (retry after 3000 ms)',
    });
    expect(fake.requests.length).toBe(1);
  });
});

describe('anthropic stream: aborts, timeouts and sockets', () => {
  it('a connectTimeoutMs that is not a positive number is refused clearly', () => {
    expect(() =>
      anthropicProvider({
        apiKey: KEY,
        baseURL: 'http://127.0.0.1:9',
        model: 'm',
        connectTimeoutMs: -5,
      }),
    ).toThrow('connectTimeoutMs must be a positive number of milliseconds, got -5');
  });

  it('aborting a stalled stream (only ": ping" comments) rejects promptly with the reason and closes the socket', async () => {
    await withOwnFake(async (fake) => {
      fake.script([
        {
          content: [{ type: 'text', text: 'Hello world' }],
          chunkSize: 5,
          stallAfterDeltas: 1,
          keepAliveMs: 20,
        },
      ]);
      const p = anthropicProvider({ apiKey: KEY, baseURL: fake.url, model: 'm' });
      const controller = new AbortController();
      const reason = new Error('stream silent for 150 ms');
      const events: ProviderStreamEvent[] = [];
      let abortedAt = 0;
      const reading = (async () => {
        for await (const event of p.stream(ASK, controller.signal)) {
          events.push(event);
          if (event.type === 'text') {
            setTimeout(() => {
              abortedAt = Date.now();
              controller.abort(reason);
            }, 150);
          }
        }
      })();
      await expect(reading).rejects.toBe(reason);
      expect(Date.now() - abortedAt).toBeLessThan(500);
      expect(texts(events)).toEqual(['Hello']);
      expect(kinds(events)).toEqual(['usage', 'text']);
      await waitFor(() => fake.openSockets() === 0, 2000, 'the stalled socket to close');
      expect(fake.requests.length).toBe(1);
    });
  });

  it('aborting while the server hangs before its headers rejects with the reason and closes the socket', async () => {
    await withOwnFake(async (fake) => {
      fake.script([{ hang: true }]);
      const p = anthropicProvider({ apiKey: KEY, baseURL: fake.url, model: 'm' });
      const controller = new AbortController();
      setTimeout(() => controller.abort(new Error('hedge lost')), 100);
      const outcome = await drain(p.stream(ASK, controller.signal));
      expect(outcome.events).toEqual([]);
      expect(outcome.error).toBeInstanceOf(Error);
      expect((outcome.error as Error).message).toBe('hedge lost');
      expect(outcome.error).not.toBeInstanceOf(ProviderError);
      await waitFor(() => fake.openSockets() === 0, 2000, 'the hanging socket to close');
    });
  });

  it('an abort with no reason of its own rejects with an AbortError', async () => {
    await withOwnFake(async (fake) => {
      fake.script([{ content: [{ type: 'text', text: 'abc' }], stallAfterDeltas: 0 }]);
      const p = anthropicProvider({ apiKey: KEY, baseURL: fake.url, model: 'm' });
      const controller = new AbortController();
      setTimeout(() => controller.abort(), 100);
      const outcome = await drain(p.stream(ASK, controller.signal));
      expect(kinds(outcome.events)).toEqual(['usage']);
      expect((outcome.error as Error).name).toBe('AbortError');
    });
  });

  it('a signal aborted before the call sends no request at all', async () => {
    await withOwnFake(async (fake) => {
      const p = anthropicProvider({ apiKey: KEY, baseURL: fake.url, model: 'm' });
      const reason = new Error('already cancelled');
      const outcome = await drain(p.stream(ASK, AbortSignal.abort(reason)));
      expect(outcome.error).toBe(reason);
      expect(fake.requests.length).toBe(0);
    });
  });

  it('connectTimeoutMs bounds the wait for headers: a timeout failure, and the socket is closed', async () => {
    await withOwnFake(async (fake) => {
      fake.script([{ hang: true }]);
      const p = anthropicProvider({
        apiKey: KEY,
        baseURL: fake.url,
        model: 'm',
        timeoutMs: 60_000,
        connectTimeoutMs: 150,
      });
      const started = Date.now();
      const err = failureOf(await drain(p.stream(ASK)));
      const elapsed = Date.now() - started;
      expect(elapsed).toBeGreaterThanOrEqual(140);
      expect(elapsed).toBeLessThan(2000);
      expect([err.failure.kind, err.failure.status]).toEqual(['timeout', undefined]);
      expect(classifyFailure(err.failure).class).toBe('timeout');
      expect(fake.requests.length).toBe(1);
      await waitFor(() => fake.openSockets() === 0, 2000, 'the timed-out socket to close');
    });
  });

  it('a consumer that stops reading early closes the connection', async () => {
    await withOwnFake(async (fake) => {
      fake.script([
        { content: [{ type: 'text', text: 'abcdef' }], chunkSize: 2, stallAfterDeltas: 1 },
      ]);
      const p = anthropicProvider({ apiKey: KEY, baseURL: fake.url, model: 'm' });
      const seen: string[] = [];
      for await (const event of p.stream(ASK)) {
        if (event.type === 'text') {
          seen.push(event.text);
          break;
        }
      }
      expect(seen).toEqual(['ab']);
      await waitFor(() => fake.openSockets() === 0, 2000, 'the abandoned socket to close');
    });
  });

  it('a finished stream leaves its connection open for reuse (the socket count is real)', async () => {
    await withOwnFake(async (fake) => {
      fake.script([{ content: [{ type: 'text', text: 'ok' }] }]);
      const p = anthropicProvider({ apiKey: KEY, baseURL: fake.url, model: 'm' });
      const { error } = await drain(p.stream(ASK));
      expect(error).toBeUndefined();
      expect(fake.openSockets()).toBe(1);
    });
  });
});
