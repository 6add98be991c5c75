import { createServer } from 'node:net';
import type { AddressInfo } from 'node:net';
import Anthropic from '@anthropic-ai/sdk';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  anthropicProvider,
  fromAnthropicMessage,
  JSON_INSTRUCTION,
  ProviderError,
  toAnthropicParams,
  type AnthropicMessageLike,
} from '../adapters/llm/anthropic.ts';
import type { LlmRequest } from '../engine/llm/types.ts';
import { startFakeAnthropic, type FakeAnthropic } from './support/fake-anthropic.ts';

const KEY = 'sk-ant-test-7f3c9e1d2b4a6f80secret';

function message(partial: Partial<AnthropicMessageLike>): AnthropicMessageLike {
  return {
    model: 'claude-test',
    content: [],
    stop_reason: 'end_turn',
    usage: { input_tokens: 1, output_tokens: 1 },
    ...partial,
  };
}

async function failureOf(promise: Promise<unknown>): Promise<ProviderError> {
  try {
    await promise;
  } catch (err) {
    if (err instanceof ProviderError) return err;
    throw new Error(`expected a ProviderError, got ${String(err)}`);
  }
  throw new Error('expected the call to fail');
}

async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

describe('toAnthropicParams', () => {
  it('system prompt travels as the top-level system field, not as a message', () => {
    expect(
      toAnthropicParams(
        { system: 'Be terse.', messages: [{ role: 'user', content: 'hi' }], maxTokens: 50 },
        'claude-default',
      ),
    ).toEqual({
      model: 'claude-default',
      max_tokens: 50,
      system: 'Be terse.',
      messages: [{ role: 'user', content: 'hi' }],
    });
  });

  it('a request model overrides the default; temperature and stop sequences are sent', () => {
    expect(
      toAnthropicParams(
        {
          model: 'claude-other',
          messages: [{ role: 'user', content: 'x' }],
          maxTokens: 9,
          temperature: 0.2,
          stopSequences: ['END', '###'],
        },
        'claude-default',
      ),
    ).toEqual({
      model: 'claude-other',
      max_tokens: 9,
      messages: [{ role: 'user', content: 'x' }],
      temperature: 0.2,
      stop_sequences: ['END', '###'],
    });
  });

  it('multi-turn tool_use then tool_result (with is_error) keeps ids and order', () => {
    const request: LlmRequest = {
      maxTokens: 100,
      messages: [
        { role: 'user', content: [{ type: 'text', text: 'weather in Oslo?' }] },
        {
          role: 'assistant',
          content: [
            { type: 'text', text: 'Checking.' },
            { type: 'tool_call', id: 'tu_1', name: 'weather', input: { city: 'Oslo' } },
          ],
        },
        {
          role: 'user',
          content: [
            { type: 'tool_result', toolCallId: 'tu_1', content: 'rain, 4C' },
            { type: 'tool_result', toolCallId: 'tu_2', content: 'boom', isError: true },
          ],
        },
      ],
    };
    expect(toAnthropicParams(request, 'm').messages).toEqual([
      { role: 'user', content: [{ type: 'text', text: 'weather in Oslo?' }] },
      {
        role: 'assistant',
        content: [
          { type: 'text', text: 'Checking.' },
          { type: 'tool_use', id: 'tu_1', name: 'weather', input: { city: 'Oslo' } },
        ],
      },
      {
        role: 'user',
        content: [
          { type: 'tool_result', tool_use_id: 'tu_1', content: 'rain, 4C' },
          { type: 'tool_result', tool_use_id: 'tu_2', content: 'boom', is_error: true },
        ],
      },
    ]);
  });

  it('images are sent as base64 and url sources with their media type', () => {
    const params = toAnthropicParams(
      {
        maxTokens: 10,
        messages: [
          {
            role: 'user',
            content: [
              {
                type: 'image',
                source: { kind: 'base64', mediaType: 'image/jpeg', data: 'AAAA' },
              },
              { type: 'image', source: { kind: 'url', url: 'https://example.test/a.png' } },
            ],
          },
        ],
      },
      'm',
    );
    expect(params.messages).toEqual([
      {
        role: 'user',
        content: [
          { type: 'image', source: { type: 'base64', media_type: 'image/jpeg', data: 'AAAA' } },
          { type: 'image', source: { type: 'url', url: 'https://example.test/a.png' } },
        ],
      },
    ]);
  });

  it('tools become input_schema tools and every tool choice maps to its Anthropic form', () => {
    const base: LlmRequest = {
      maxTokens: 10,
      messages: [{ role: 'user', content: 'go' }],
      tools: [
        {
          name: 'lookup',
          description: 'Look a word up',
          inputSchema: { type: 'object', properties: { word: { type: 'string' } } },
        },
        { name: 'noop', inputSchema: { type: 'object' } },
      ],
    };
    expect(toAnthropicParams(base, 'm').tools).toEqual([
      {
        name: 'lookup',
        description: 'Look a word up',
        input_schema: { type: 'object', properties: { word: { type: 'string' } } },
      },
      { name: 'noop', input_schema: { type: 'object' } },
    ]);
    expect(toAnthropicParams(base, 'm').tool_choice).toBeUndefined();
    expect(toAnthropicParams({ ...base, toolChoice: 'auto' }, 'm').tool_choice).toEqual({
      type: 'auto',
    });
    expect(toAnthropicParams({ ...base, toolChoice: 'none' }, 'm').tool_choice).toEqual({
      type: 'none',
    });
    expect(toAnthropicParams({ ...base, toolChoice: 'required' }, 'm').tool_choice).toEqual({
      type: 'any',
    });
    expect(toAnthropicParams({ ...base, toolChoice: { name: 'lookup' } }, 'm').tool_choice).toEqual(
      { type: 'tool', name: 'lookup' },
    );
  });

  it('JSON mode appends the JSON instruction to the system prompt (or makes it the prompt)', () => {
    const messages: LlmRequest['messages'] = [{ role: 'user', content: 'list' }];
    expect(toAnthropicParams({ messages, maxTokens: 5, json: true }, 'm').system).toBe(
      JSON_INSTRUCTION,
    );
    expect(
      toAnthropicParams({ system: 'You sort.', messages, maxTokens: 5, json: true }, 'm').system,
    ).toBe(`You sort.\n\n${JSON_INSTRUCTION}`);
    expect(JSON_INSTRUCTION).toContain('JSON object');
  });
});

describe('fromAnthropicMessage', () => {
  it('text blocks are joined and tool_use blocks become exact tool calls', () => {
    expect(
      fromAnthropicMessage(
        message({
          content: [
            { type: 'text', text: 'Let me ' },
            { type: 'text', text: 'look.' },
            { type: 'tool_use', id: 'toolu_9', name: 'lookup', input: { word: 'keel' } },
          ],
          stop_reason: 'tool_use',
          usage: { input_tokens: 30, output_tokens: 12 },
        }),
        42,
      ),
    ).toEqual({
      text: 'Let me look.',
      toolCalls: [{ id: 'toolu_9', name: 'lookup', input: { word: 'keel' } }],
      stopReason: 'tool_use',
      usage: { inputTokens: 30, outputTokens: 12 },
      provider: 'anthropic',
      model: 'claude-test',
      tier: '',
      degraded: false,
      latencyMs: 42,
    });
  });

  it('every Anthropic stop reason maps to the unified one, unknown ones to other', () => {
    const cases: [string | null, string][] = [
      ['end_turn', 'end'],
      ['max_tokens', 'max_tokens'],
      ['stop_sequence', 'stop_sequence'],
      ['tool_use', 'tool_use'],
      ['refusal', 'refusal'],
      ['pause_turn', 'other'],
      ['model_context_window_exceeded', 'other'],
      [null, 'other'],
    ];
    for (const [wire, unified] of cases) {
      expect(fromAnthropicMessage(message({ stop_reason: wire }), 0).stopReason).toBe(unified);
    }
  });

  it('cache read and cache creation tokens are reported; nulls are left out', () => {
    expect(
      fromAnthropicMessage(
        message({
          usage: {
            input_tokens: 5,
            output_tokens: 7,
            cache_read_input_tokens: 1000,
            cache_creation_input_tokens: 200,
          },
        }),
        0,
      ).usage,
    ).toEqual({ inputTokens: 5, outputTokens: 7, cacheReadTokens: 1000, cacheWriteTokens: 200 });
    expect(
      fromAnthropicMessage(
        message({
          usage: {
            input_tokens: 5,
            output_tokens: 7,
            cache_read_input_tokens: null,
            cache_creation_input_tokens: null,
          },
        }),
        0,
      ).usage,
    ).toEqual({ inputTokens: 5, outputTokens: 7 });
  });

  it('JSON mode strips a code fence around the answer; without it the text is untouched', () => {
    const fenced = '```json\n{"a": 1}\n```';
    expect(
      fromAnthropicMessage(message({ content: [{ type: 'text', text: fenced }] }), 0, {
        json: true,
      }).text,
    ).toBe('{"a": 1}');
    expect(
      fromAnthropicMessage(message({ content: [{ type: 'text', text: '```\n[1,2]\n```' }] }), 0, {
        json: true,
      }).text,
    ).toBe('[1,2]');
    expect(
      fromAnthropicMessage(message({ content: [{ type: 'text', text: '{"b":2}' }] }), 0, {
        json: true,
      }).text,
    ).toBe('{"b":2}');
    expect(
      fromAnthropicMessage(message({ content: [{ type: 'text', text: fenced }] }), 0).text,
    ).toBe(fenced);
  });
});

describe('anthropicProvider against the fake Messages API', () => {
  let fake: FakeAnthropic;
  beforeAll(async () => {
    fake = await startFakeAnthropic();
  });
  afterAll(async () => {
    await fake.close();
  });
  beforeEach(() => {
    fake.reset();
  });

  const provider = () =>
    anthropicProvider({ apiKey: KEY, baseURL: fake.url, model: 'claude-fake-1' });

  it('a plain text answer comes back through the real SDK with usage and stop reason', async () => {
    fake.script([
      {
        content: [{ type: 'text', text: 'Hello there.' }],
        usage: { input_tokens: 11, output_tokens: 3, cache_read_input_tokens: 8 },
      },
    ]);
    const p = provider();
    expect(p.name).toBe('anthropic');
    expect(p.model).toBe('claude-fake-1');
    const res = await p.complete({ messages: [{ role: 'user', content: 'hi' }], maxTokens: 64 });
    expect({ ...res, latencyMs: 0 }).toEqual({
      text: 'Hello there.',
      toolCalls: [],
      stopReason: 'end',
      usage: { inputTokens: 11, outputTokens: 3, cacheReadTokens: 8 },
      provider: 'anthropic',
      model: 'claude-fake-1',
      tier: '',
      degraded: false,
      latencyMs: 0,
    });
    expect(res.latencyMs).toBeGreaterThanOrEqual(0);
    expect(fake.requests.length).toBe(1);
  });

  it('a tool call answer yields exact toolCalls, and the server got the exact request body', async () => {
    fake.script([
      {
        content: [
          { type: 'text', text: 'Looking it up.' },
          { type: 'tool_use', id: 'toolu_01', name: 'lookup', input: { word: 'keel', n: 2 } },
        ],
      },
    ]);
    const res = await provider().complete({
      system: 'Use tools.',
      messages: [{ role: 'user', content: 'define keel' }],
      maxTokens: 128,
      tools: [{ name: 'lookup', inputSchema: { type: 'object' } }],
      toolChoice: { name: 'lookup' },
      temperature: 0,
      stopSequences: ['STOP'],
    });
    expect(res.toolCalls).toEqual([
      { id: 'toolu_01', name: 'lookup', input: { word: 'keel', n: 2 } },
    ]);
    expect(res.text).toBe('Looking it up.');
    expect(res.stopReason).toBe('tool_use');
    expect(fake.requests.length).toBe(1);
    const [req] = fake.requests;
    expect(req?.method).toBe('POST');
    expect(req?.path).toBe('/v1/messages');
    expect(req?.headers.authorization).toBe(`Bearer ${KEY}`);
    expect(req?.headers['x-stainless-retry-count']).toBe('0');
    expect(req?.body).toEqual({
      model: 'claude-fake-1',
      max_tokens: 128,
      system: 'Use tools.',
      messages: [{ role: 'user', content: 'define keel' }],
      tools: [{ name: 'lookup', input_schema: { type: 'object' } }],
      tool_choice: { type: 'tool', name: 'lookup' },
      temperature: 0,
      stop_sequences: ['STOP'],
    });
  });

  it('JSON mode: a fenced answer from the server is unwrapped', async () => {
    fake.script([{ content: [{ type: 'text', text: '```json\n{"ok":true}\n```' }] }]);
    const res = await provider().complete({
      messages: [{ role: 'user', content: 'status?' }],
      maxTokens: 20,
      json: true,
    });
    expect(JSON.parse(res.text)).toEqual({ ok: true });
    expect((fake.requests[0]?.body as { system?: string }).system).toBe(JSON_INSTRUCTION);
  });

  it('a 529 overloaded answer becomes a ProviderError with status, body and retry-after, after one request', async () => {
    fake.script([
      {
        status: 529,
        error: { type: 'overloaded_error', message: 'Overloaded' },
        headers: { 'retry-after': '7', 'x-should-retry': 'true' },
      },
    ]);
    const err = await failureOf(
      provider().complete({ messages: [{ role: 'user', content: 'hi' }], maxTokens: 5 }),
    );
    expect(err.name).toBe('ProviderError');
    expect(err.failure.status).toBe(529);
    expect(err.failure.body).toEqual({
      type: 'error',
      error: { type: 'overloaded_error', message: 'Overloaded' },
    });
    expect(err.failure.headers?.['retry-after']).toBe('7');
    expect(err.failure.headers?.['x-should-retry']).toBe('true');
    expect(err.failure.code).toBeUndefined();
    expect(err.failure.kind).toBeUndefined();
    expect(fake.requests.length).toBe(1);
  });

  it('a 429 with retry-after-ms is not retried by the SDK and keeps its header', async () => {
    fake.script([
      {
        status: 429,
        error: { type: 'rate_limit_error', message: 'slow down' },
        headers: { 'retry-after-ms': '1500' },
      },
    ]);
    const err = await failureOf(
      provider().complete({ messages: [{ role: 'user', content: 'hi' }], maxTokens: 5 }),
    );
    expect(err.failure.status).toBe(429);
    expect(err.failure.headers?.['retry-after-ms']).toBe('1500');
    expect(err.failure.body).toEqual({
      type: 'error',
      error: { type: 'rate_limit_error', message: 'slow down' },
    });
    expect(fake.requests.length).toBe(1);
  });

  it('a 500 is not retried either: exactly one HTTP request per call', async () => {
    fake.script([{ status: 500 }, { status: 500 }, { status: 500 }]);
    const err = await failureOf(
      provider().complete({ messages: [{ role: 'user', content: 'hi' }], maxTokens: 5 }),
    );
    expect(err.failure.status).toBe(500);
    expect(fake.requests.length).toBe(1);
  });

  it('the API key never appears in the error message or the serialised failure', async () => {
    fake.script([
      {
        status: 401,
        error: { type: 'authentication_error', message: `invalid x-api-key: ${KEY}` },
      },
    ]);
    const err = await failureOf(
      provider().complete({ messages: [{ role: 'user', content: 'hi' }], maxTokens: 5 }),
    );
    expect(err.failure.status).toBe(401);
    expect(err.message).not.toContain(KEY);
    expect(JSON.stringify(err.failure)).not.toContain(KEY);
    expect(String(err.stack)).not.toContain(KEY);
    expect(JSON.stringify(err.failure)).toContain('authentication_error');
  });

  it('connection refused (a closed port) is a network failure with ECONNREFUSED and no key', async () => {
    const port = await closedPort();
    const p = anthropicProvider({
      apiKey: KEY,
      baseURL: `http://127.0.0.1:${port}`,
      model: 'claude-fake-1',
    });
    const err = await failureOf(
      p.complete({ messages: [{ role: 'user', content: 'hi' }], maxTokens: 5 }),
    );
    expect(err.failure.kind).toBe('network');
    expect(err.failure.code).toBe('ECONNREFUSED');
    expect(err.failure.status).toBeUndefined();
    expect(err.message).not.toContain(KEY);
    expect(JSON.stringify(err.failure)).not.toContain(KEY);
  });

  it('a server slower than timeoutMs gives a timeout failure after one request', async () => {
    fake.script([{ delayMs: 1500 }]);
    const p = anthropicProvider({
      apiKey: KEY,
      baseURL: fake.url,
      model: 'claude-fake-1',
      timeoutMs: 200,
    });
    const err = await failureOf(
      p.complete({ messages: [{ role: 'user', content: 'hi' }], maxTokens: 5 }),
    );
    expect(err.failure.kind).toBe('timeout');
    expect(err.failure.status).toBeUndefined();
    expect(fake.requests.length).toBe(1);
  });

  it('an aborted signal ends the call with a network failure, not an answer', async () => {
    fake.script([{ delayMs: 1500 }]);
    const controller = new AbortController();
    const pending = provider().complete(
      { messages: [{ role: 'user', content: 'hi' }], maxTokens: 5 },
      controller.signal,
    );
    setTimeout(() => controller.abort(), 50);
    const err = await failureOf(pending);
    expect(err.failure.kind).toBe('network');
    expect(err.failure.code).toBe('ABORT_ERR');
  });
});

describe('fake Anthropic streaming, read by the real SDK', () => {
  let fake: FakeAnthropic;
  beforeAll(async () => {
    fake = await startFakeAnthropic();
  });
  afterAll(async () => {
    await fake.close();
  });

  const client = () => new Anthropic({ apiKey: KEY, baseURL: fake.url, maxRetries: 0 });

  it('a streamed answer (text deltas and tool input_json_delta) assembles into the full message', async () => {
    fake.script([
      {
        content: [
          { type: 'text', text: 'abcdefgh' },
          { type: 'tool_use', id: 'toolu_s', name: 'f', input: { x: [1, 2] } },
        ],
        chunkSize: 3,
        usage: { input_tokens: 4, output_tokens: 9 },
      },
    ]);
    const deltas: string[] = [];
    const stream = client().messages.stream({
      model: 'claude-s',
      max_tokens: 10,
      messages: [{ role: 'user', content: 'go' }],
    });
    stream.on('text', (t) => deltas.push(t));
    const final = await stream.finalMessage();
    expect(deltas).toEqual(['abc', 'def', 'gh']);
    expect(final.content).toEqual([
      { type: 'text', text: 'abcdefgh' },
      { type: 'tool_use', id: 'toolu_s', name: 'f', input: { x: [1, 2] } },
    ]);
    expect(final.stop_reason).toBe('tool_use');
    expect(final.usage.output_tokens).toBe(9);
    expect((fake.requests.at(-1)?.body as { stream?: boolean }).stream).toBe(true);
  });

  it('an overloaded_error event after K deltas surfaces as an SDK error mid-stream', async () => {
    fake.script([
      { content: [{ type: 'text', text: 'abcdef' }], chunkSize: 2, overloadedAfterDeltas: 2 },
    ]);
    const deltas: string[] = [];
    const stream = client().messages.stream({
      model: 'claude-s',
      max_tokens: 10,
      messages: [{ role: 'user', content: 'go' }],
    });
    stream.on('text', (t) => deltas.push(t));
    await expect(stream.finalMessage()).rejects.toThrow(/overloaded_error/);
    expect(deltas).toEqual(['ab', 'cd']);
  });

  it('a cut after K deltas ends the stream without message_stop, which the SDK reports', async () => {
    fake.script([{ content: [{ type: 'text', text: 'abcdef' }], chunkSize: 2, cutAfterDeltas: 1 }]);
    const deltas: string[] = [];
    const stream = client().messages.stream({
      model: 'claude-s',
      max_tokens: 10,
      messages: [{ role: 'user', content: 'go' }],
    });
    stream.on('text', (t) => deltas.push(t));
    await expect(stream.finalMessage()).rejects.toThrow();
    expect(deltas).toEqual(['ab']);
  });

  it('an unscripted request gets the default text answer', async () => {
    const res = await client().messages.create({
      model: 'claude-d',
      max_tokens: 10,
      messages: [{ role: 'user', content: 'go' }],
    });
    expect(res.content).toEqual([{ type: 'text', text: 'ok' }]);
    expect(res.stop_reason).toBe('end_turn');
    expect(res.model).toBe('claude-d');
  });
});
