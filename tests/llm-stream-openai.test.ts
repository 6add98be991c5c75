/**
 * `openaiProvider(...).stream()` through the real `openai` SDK against the fake Chat Completions
 * server: the events it yields, the answer it ends with, and how a failing stream fails.
 */
import { createServer } from 'node:net';
import type { AddressInfo } from 'node:net';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { openaiProvider, ProviderError } from '../adapters/llm/openai.ts';
import { classifyFailure } from '../engine/llm/classify.ts';
import type { LlmProvider, LlmRequest, ProviderStreamEvent } from '../engine/llm/types.ts';
import {
  startFakeOpenAI,
  type FakeOpenAI,
  type FakeOpenAIResponse,
} from './support/fake-openai.ts';
import { waitFor } from './support/index.ts';

const KEY = 'sk-test-3c4d5e6f7a8b9c0d1e2f';
const ASK: LlmRequest = {
  system: 'sys',
  messages: [{ role: 'user', content: 'hello' }],
  maxTokens: 64,
};

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

/** Runs `body` against a fake of its own, so that its socket count starts at zero. */
async function withOwnFake(body: (fake: FakeOpenAI) => Promise<void>): Promise<void> {
  const fake = await startFakeOpenAI();
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

describe('openai stream: answers', () => {
  let fake: FakeOpenAI;
  beforeAll(async () => {
    fake = await startFakeOpenAI();
  });
  afterAll(async () => {
    await fake.close();
  });
  beforeEach(() => {
    fake.requests.length = 0;
  });

  const provider = (): LlmProvider =>
    openaiProvider({ apiKey: KEY, baseURL: fake.url, model: 'gpt-fake' });

  it('yields each text delta, the usage chunk, then one done; the request asks for usage', async () => {
    fake.script({
      text: 'Hello big world',
      usage: { promptTokens: 9, completionTokens: 3, cachedTokens: 4 },
    });
    const { events, error } = await drain(provider().stream!(ASK));
    expect(error).toBeUndefined();
    const done = events.at(-1);
    const latencyMs = done?.type === 'done' ? done.response.latencyMs : -1;
    expect(latencyMs).toBeGreaterThanOrEqual(0);
    expect(events).toEqual([
      { type: 'text', text: 'Hello ' },
      { type: 'text', text: 'big ' },
      { type: 'text', text: 'world' },
      { type: 'usage', usage: { inputTokens: 9, outputTokens: 3, cacheReadTokens: 4 } },
      {
        type: 'done',
        response: {
          text: 'Hello big world',
          toolCalls: [],
          stopReason: 'end',
          usage: { inputTokens: 9, outputTokens: 3, cacheReadTokens: 4 },
          provider: 'openai',
          model: 'gpt-fake',
          tier: '',
          degraded: false,
          latencyMs,
        },
      },
    ]);
    expect(fake.requests.length).toBe(1);
    expect(fake.requests[0]?.body).toEqual({
      model: 'gpt-fake',
      max_tokens: 64,
      messages: [
        { role: 'system', content: 'sys' },
        { role: 'user', content: 'hello' },
      ],
      stream: true,
      stream_options: { include_usage: true },
    });
    expect(fake.requests[0]?.headers['x-stainless-retry-count']).toBe('0');
  });

  const cases: { name: string; script: FakeOpenAIResponse; request: LlmRequest }[] = [
    {
      name: 'text with usage and cached tokens',
      script: {
        text: 'One two three.',
        usage: { promptTokens: 20, completionTokens: 4, cachedTokens: 8 },
      },
      request: ASK,
    },
    {
      name: 'two tool calls whose arguments arrive in pieces',
      script: {
        toolCalls: [
          { id: 'call_1', name: 'search', arguments: '{"q":"keel","limit":3}' },
          { id: 'call_2', name: 'fetch', arguments: '{"url":"http://127.0.0.1/x"}' },
        ],
      },
      request: { ...ASK, tools: [{ name: 'search', inputSchema: { type: 'object' } }] },
    },
    {
      name: 'text and a tool call with unparseable arguments',
      script: {
        text: 'Calling.',
        toolCalls: [{ id: 'call_x', name: 'broken', arguments: '{"q":' }],
      },
      request: ASK,
    },
    {
      name: 'a length stop, JSON mode and a model of its own',
      script: { text: '{"a": 1', finishReason: 'length', model: 'gpt-fake-0613' },
      request: { ...ASK, json: true, model: 'gpt-other' },
    },
    {
      name: 'a content_filter stop',
      script: { text: 'Partial', finishReason: 'content_filter' },
      request: ASK,
    },
  ];

  for (const { name, script, request } of cases) {
    it(`done holds exactly what complete() returns: ${name}`, async () => {
      fake.script(script, script);
      const completed = await provider().complete(request);
      const { events, error } = await drain(provider().stream!(request));
      expect(error).toBeUndefined();
      const done = events.at(-1);
      if (done?.type !== 'done') throw new Error('no done event');
      expect({ ...done.response, latencyMs: 0 }).toEqual({ ...completed, latencyMs: 0 });
      expect(events.filter((e) => e.type === 'done').length).toBe(1);
      expect(texts(events).join('')).toBe(completed.text);
      expect(fake.requests.map((r) => r.body)).toEqual([
        fake.requests[0]?.body,
        {
          ...(fake.requests[0]?.body as object),
          stream: true,
          stream_options: { include_usage: true },
        },
      ]);
    });
  }

  it('a whole-call timeoutMs does not cut a stream that keeps producing', async () => {
    fake.script({ text: 'a b c d e f g h', deltaIntervalMs: 50 });
    const p = openaiProvider({ apiKey: KEY, baseURL: fake.url, model: 'm', timeoutMs: 150 });
    const started = Date.now();
    const { events, error } = await drain(p.stream(ASK));
    expect(error).toBeUndefined();
    expect(Date.now() - started).toBeGreaterThanOrEqual(350);
    expect(texts(events)).toEqual(['a ', 'b ', 'c ', 'd ', 'e ', 'f ', 'g ', 'h']);
    expect(kinds(events).at(-1)).toBe('done');
  });

  it('the same timeoutMs still ends a complete() whose body never comes', async () => {
    fake.script({ silent: true });
    const p = openaiProvider({ apiKey: KEY, baseURL: fake.url, model: 'm', timeoutMs: 150 });
    await expect(p.complete(ASK)).rejects.toMatchObject({ failure: { kind: 'timeout' } });
  });
});

describe('openai stream: failures', () => {
  let fake: FakeOpenAI;
  beforeAll(async () => {
    fake = await startFakeOpenAI();
  });
  afterAll(async () => {
    await fake.close();
  });
  beforeEach(() => {
    fake.requests.length = 0;
  });

  const provider = () => openaiProvider({ apiKey: KEY, baseURL: fake.url, model: 'gpt-fake' });

  it('an error chunk after a delta: the text, then a failure with the chunk as body and no status', async () => {
    fake.script({ text: 'Hello big world', errorAfterDeltas: 1 });
    const outcome = await drain(provider().stream(ASK));
    expect(outcome.events).toEqual([{ type: 'text', text: 'Hello ' }]);
    const err = failureOf(outcome);
    expect(err.failure).toEqual({
      body: {
        error: {
          message: 'The server had an error while processing your request.',
          type: 'server_error',
          code: null,
        },
      },
      message:
        'error event after 6 text characters: server_error: The server had an error while processing your request.',
    });
    expect(classifyFailure(err.failure)).toEqual({
      class: 'server',
      reason: 'server_error in stream',
    });
    expect(fake.requests.length).toBe(1);
  });

  it('a rate-limit error chunk before any text classifies as rate_limited, its key scrubbed', async () => {
    fake.script({
      text: 'never sent',
      errorAfterDeltas: 0,
      streamError: {
        message: `Rate limit reached for key ${KEY}`,
        type: 'tokens',
        code: 'rate_limit_exceeded',
      },
    });
    const outcome = await drain(provider().stream(ASK));
    expect(outcome.events).toEqual([]);
    const err = failureOf(outcome);
    expect(err.failure.body).toEqual({
      error: {
        message: 'Rate limit reached for key [key]',
        type: 'tokens',
        code: 'rate_limit_exceeded',
      },
    });
    expect(err.message).not.toContain(KEY);
    expect(classifyFailure(err.failure)).toEqual({
      class: 'rate_limited',
      reason: 'rate_limit_exceeded in stream',
    });
  });

  it('L05: a stream that ends after N deltas without a finish_reason is truncated, never done', async () => {
    fake.script({ text: 'Hello big wide world', endWithoutStopAfterDeltas: 2 });
    const outcome = await drain(provider().stream(ASK));
    expect(outcome.events).toEqual([
      { type: 'text', text: 'Hello ' },
      { type: 'text', text: 'big ' },
    ]);
    const err = failureOf(outcome);
    expect(err.failure).toEqual({
      kind: 'truncated',
      message: 'stream ended without a finish_reason after 10 text characters',
    });
    expect(err.message).toBe(
      'openai: stream ended without a finish_reason after 10 text characters',
    );
    expect(classifyFailure(err.failure).class).toBe('truncated');
    expect(fake.requests.length).toBe(1);
  });

  it('a stream with every chunk but no [DONE] marker is truncated too', async () => {
    fake.script({ text: 'All of it', omitDone: true });
    const outcome = await drain(provider().stream(ASK));
    expect(texts(outcome.events)).toEqual(['All ', 'of ', 'it']);
    expect(kinds(outcome.events)).toEqual(['text', 'text', 'text', 'usage']);
    expect(failureOf(outcome).failure).toEqual({
      kind: 'truncated',
      message: 'stream ended without the [DONE] marker after 9 text characters',
    });
  });

  it('a body cut after its first chunks (cutAfterChunks) is truncated', async () => {
    fake.script({ text: 'one two three', cutAfterChunks: 2 });
    const outcome = await drain(provider().stream(ASK));
    expect(texts(outcome.events)).toEqual(['one ']);
    expect(failureOf(outcome).failure.kind).toBe('truncated');
  });

  it('a socket the server closes mid-stream is truncated, with the code and the text count', async () => {
    fake.script({ text: 'one two three', destroyAfterDeltas: 2 });
    const outcome = await drain(provider().stream(ASK));
    expect(texts(outcome.events)).toEqual(['one ', 'two ']);
    expect(failureOf(outcome).failure).toEqual({
      kind: 'truncated',
      code: 'UND_ERR_SOCKET',
      message: 'stream cut after 8 text characters: the server closed the connection',
    });
  });

  it('a connection reset mid-stream is a network failure with ECONNRESET', async () => {
    fake.script({ text: 'one two three', resetAfterDeltas: 1 });
    const outcome = await drain(provider().stream(ASK));
    expect(texts(outcome.events)).toEqual(['one ']);
    const err = failureOf(outcome);
    expect(err.failure).toEqual({
      kind: 'network',
      code: 'ECONNRESET',
      message: 'connection lost (ECONNRESET) after 4 text characters',
    });
    expect(classifyFailure(err.failure)).toEqual({
      class: 'network',
      reason: 'network error ECONNRESET',
    });
  });

  it('a connection reset before any headers is a network failure, after one request', async () => {
    fake.script({ reset: true });
    const err = failureOf(await drain(provider().stream(ASK)));
    expect([err.failure.kind, err.failure.code, err.failure.status]).toEqual([
      'network',
      'ECONNRESET',
      undefined,
    ]);
    expect(fake.requests.length).toBe(1);
  });

  it('connection refused is a network failure with ECONNREFUSED', async () => {
    const probe = createServer();
    await new Promise<void>((r) => probe.listen(0, '127.0.0.1', r));
    const { port } = probe.address() as AddressInfo;
    await new Promise<void>((r) => probe.close(() => r()));
    const p = openaiProvider({ apiKey: KEY, baseURL: `http://127.0.0.1:${port}/v1`, model: 'm' });
    const err = failureOf(await drain(p.stream(ASK)));
    expect([err.failure.kind, err.failure.code]).toEqual(['network', 'ECONNREFUSED']);
    expect(JSON.stringify(err.failure)).not.toContain(KEY);
  });

  it('an HTTP 429 before the stream keeps status, body and retry-after-ms', async () => {
    fake.script({
      status: 429,
      error: { message: 'Rate limit reached', type: 'requests', code: 'rate_limit_exceeded' },
      headers: { 'retry-after-ms': '1200' },
    });
    const err = failureOf(await drain(provider().stream(ASK)));
    expect(err.failure.status).toBe(429);
    expect(err.failure.body).toEqual({
      error: {
        message: 'Rate limit reached',
        type: 'requests',
        code: 'rate_limit_exceeded',
        param: null,
      },
    });
    expect(classifyFailure(err.failure)).toEqual({
      class: 'rate_limited',
      retryAfterMs: 1200,
      reason: '429 rate_limit_exceeded (retry after 1200 ms)',
    });
    expect(fake.requests.length).toBe(1);
  });
});

describe('openai stream: aborts, timeouts and sockets', () => {
  it('aborting a stalled stream (only keep-alive comments) rejects promptly with the reason and closes the socket', async () => {
    await withOwnFake(async (fake) => {
      fake.script({ text: 'Hello big world', stallAfterDeltas: 1, keepAliveMs: 20 });
      const p = openaiProvider({ apiKey: KEY, baseURL: fake.url, model: 'm' });
      const controller = new AbortController();
      const reason = new Error('stream silent for 150 ms');
      const events: ProviderStreamEvent[] = [];
      let abortedAt = 0;
      const reading = (async () => {
        for await (const event of p.stream(ASK, controller.signal)) {
          events.push(event);
          setTimeout(() => {
            abortedAt = Date.now();
            controller.abort(reason);
          }, 150);
        }
      })();
      await expect(reading).rejects.toBe(reason);
      expect(Date.now() - abortedAt).toBeLessThan(500);
      expect(events).toEqual([{ type: 'text', text: 'Hello ' }]);
      await waitFor(() => fake.openSockets() === 0, 2000, 'the stalled socket to close');
      expect(fake.requests.length).toBe(1);
    });
  });

  it('aborting a stream silent after its headers rejects with the reason and closes the socket', async () => {
    await withOwnFake(async (fake) => {
      fake.script({ silent: true });
      const p = openaiProvider({ apiKey: KEY, baseURL: fake.url, model: 'm', timeoutMs: 50 });
      const controller = new AbortController();
      const reason = new Error('no first token within 200 ms');
      setTimeout(() => controller.abort(reason), 200);
      const outcome = await drain(p.stream(ASK, controller.signal));
      // timeoutMs (50 ms) bounds the headers only: the silent stream lives until the abort.
      expect(outcome.error).toBe(reason);
      expect(outcome.events).toEqual([]);
      await waitFor(() => fake.openSockets() === 0, 2000, 'the silent socket to close');
    });
  });

  it('aborting while the server hangs before its headers rejects with the reason, not a failure', async () => {
    await withOwnFake(async (fake) => {
      fake.script({ hang: true });
      const p = openaiProvider({ apiKey: KEY, baseURL: fake.url, model: 'm' });
      const controller = new AbortController();
      const reason = new Error('hedge lost');
      setTimeout(() => controller.abort(reason), 100);
      const outcome = await drain(p.stream(ASK, controller.signal));
      expect(outcome.error).toBe(reason);
      await waitFor(() => fake.openSockets() === 0, 2000, 'the hanging socket to close');
    });
  });

  it('a signal aborted before the call sends no request at all', async () => {
    await withOwnFake(async (fake) => {
      const p = openaiProvider({ apiKey: KEY, baseURL: fake.url, model: 'm' });
      const reason = new Error('already cancelled');
      const outcome = await drain(p.stream(ASK, AbortSignal.abort(reason)));
      expect(outcome.error).toBe(reason);
      expect(fake.requests.length).toBe(0);
    });
  });

  it('connectTimeoutMs bounds the wait for headers: a timeout failure, and the socket is closed', async () => {
    await withOwnFake(async (fake) => {
      fake.script({ hang: true });
      const p = openaiProvider({
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
      fake.script({ text: 'one two three', stallAfterDeltas: 1 });
      const p = openaiProvider({ apiKey: KEY, baseURL: fake.url, model: 'm' });
      const seen: string[] = [];
      for await (const event of p.stream(ASK)) {
        if (event.type === 'text') {
          seen.push(event.text);
          break;
        }
      }
      expect(seen).toEqual(['one ']);
      await waitFor(() => fake.openSockets() === 0, 2000, 'the abandoned socket to close');
    });
  });

  it('a finished stream leaves its connection open for reuse (the socket count is real)', async () => {
    await withOwnFake(async (fake) => {
      fake.script({ text: 'ok' });
      const p = openaiProvider({ apiKey: KEY, baseURL: fake.url, model: 'm' });
      const { error } = await drain(p.stream(ASK));
      expect(error).toBeUndefined();
      expect(fake.openSockets()).toBe(1);
    });
  });
});
