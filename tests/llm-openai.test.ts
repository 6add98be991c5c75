import { createServer } from 'node:net';
import type { AddressInfo } from 'node:net';
import OpenAI from 'openai';
import type { ChatCompletion } from 'openai/resources/chat/completions';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  fromOpenAICompletion,
  openaiProvider,
  presetOptions,
  PRESETS,
  ProviderError,
  toOpenAIParams,
} from '../adapters/llm/openai.ts';
import type { LlmRequest } from '../engine/llm/types.ts';
import { DEFAULT_ANSWER, startFakeOpenAI, type FakeOpenAI } from './support/fake-openai.ts';

const KEY = 'sk-test-9f8e7d6c5b4a39281706';

function completion(over: Partial<ChatCompletion> & { choices: ChatCompletion['choices'] }) {
  return {
    id: 'chatcmpl-1',
    object: 'chat.completion',
    created: 1,
    model: 'gpt-test',
    ...over,
  } as ChatCompletion;
}

function choice(
  message: Partial<ChatCompletion.Choice['message']>,
  finish_reason: string,
): ChatCompletion.Choice {
  return {
    index: 0,
    message: { role: 'assistant', content: null, refusal: null, ...message },
    finish_reason,
    logprobs: null,
  } as ChatCompletion.Choice;
}

async function caught(p: Promise<unknown>): Promise<ProviderError> {
  try {
    await p;
  } catch (err) {
    if (err instanceof ProviderError) return err;
    throw err;
  }
  throw new Error('expected a ProviderError');
}

describe('translation to Chat Completions parameters', () => {
  it('the system prompt, tool calls and tool results keep their OpenAI shapes and order', () => {
    const request: LlmRequest = {
      system: 'Be brief.',
      maxTokens: 200,
      messages: [
        { role: 'user', content: 'Weather in Oslo and Rome?' },
        {
          role: 'assistant',
          content: [
            { type: 'text', text: 'Checking.' },
            { type: 'tool_call', id: 'call_1', name: 'weather', input: { city: 'Oslo' } },
            { type: 'tool_call', id: 'call_2', name: 'weather', input: { city: 'Rome', days: 2 } },
          ],
        },
        {
          role: 'user',
          content: [
            { type: 'tool_result', toolCallId: 'call_1', content: '3C rain' },
            { type: 'tool_result', toolCallId: 'call_2', content: 'no data', isError: true },
            { type: 'text', text: 'Summarise.' },
          ],
        },
        { role: 'assistant', content: [{ type: 'tool_call', id: 'c3', name: 'noop', input: {} }] },
        { role: 'assistant', content: 'Plain reply.' },
      ],
    };
    expect(toOpenAIParams(request, 'gpt-default')).toEqual({
      model: 'gpt-default',
      max_tokens: 200,
      messages: [
        { role: 'system', content: 'Be brief.' },
        { role: 'user', content: 'Weather in Oslo and Rome?' },
        {
          role: 'assistant',
          content: 'Checking.',
          tool_calls: [
            {
              id: 'call_1',
              type: 'function',
              function: { name: 'weather', arguments: '{"city":"Oslo"}' },
            },
            {
              id: 'call_2',
              type: 'function',
              function: { name: 'weather', arguments: '{"city":"Rome","days":2}' },
            },
          ],
        },
        { role: 'tool', tool_call_id: 'call_1', content: '3C rain' },
        { role: 'tool', tool_call_id: 'call_2', content: 'Error: no data' },
        { role: 'user', content: [{ type: 'text', text: 'Summarise.' }] },
        {
          role: 'assistant',
          content: null,
          tool_calls: [{ id: 'c3', type: 'function', function: { name: 'noop', arguments: '{}' } }],
        },
        { role: 'assistant', content: 'Plain reply.' },
      ],
    });
  });

  it('base64 images become data: URLs and URL images pass through', () => {
    const params = toOpenAIParams(
      {
        maxTokens: 10,
        model: 'gpt-vision',
        messages: [
          {
            role: 'user',
            content: [
              { type: 'text', text: 'Compare.' },
              { type: 'image', source: { kind: 'base64', mediaType: 'image/png', data: 'iVBOR' } },
              { type: 'image', source: { kind: 'url', url: 'https://example.test/a.jpg' } },
            ],
          },
        ],
      },
      'gpt-default',
    );
    expect(params).toEqual({
      model: 'gpt-vision',
      max_tokens: 10,
      messages: [
        {
          role: 'user',
          content: [
            { type: 'text', text: 'Compare.' },
            { type: 'image_url', image_url: { url: 'data:image/png;base64,iVBOR' } },
            { type: 'image_url', image_url: { url: 'https://example.test/a.jpg' } },
          ],
        },
      ],
    });
  });

  it('tools, every tool choice, temperature, stop sequences and JSON mode are all sent', () => {
    const base: LlmRequest = {
      maxTokens: 50,
      messages: [{ role: 'user', content: 'hi' }],
      tools: [
        {
          name: 'lookup',
          description: 'Finds a thing',
          inputSchema: { type: 'object', properties: { q: { type: 'string' } } },
        },
        { name: 'bare', inputSchema: { type: 'object' } },
      ],
      temperature: 0.2,
      stopSequences: ['END', '###'],
      json: true,
    };
    const tools = [
      {
        type: 'function',
        function: {
          name: 'lookup',
          description: 'Finds a thing',
          parameters: { type: 'object', properties: { q: { type: 'string' } } },
        },
      },
      { type: 'function', function: { name: 'bare', parameters: { type: 'object' } } },
    ];
    expect(toOpenAIParams(base, 'm')).toEqual({
      model: 'm',
      max_tokens: 50,
      messages: [{ role: 'user', content: 'hi' }],
      tools,
      temperature: 0.2,
      stop: ['END', '###'],
      response_format: { type: 'json_object' },
    });
    expect(toOpenAIParams({ ...base, toolChoice: 'auto' }, 'm').tool_choice).toBe('auto');
    expect(toOpenAIParams({ ...base, toolChoice: 'none' }, 'm').tool_choice).toBe('none');
    expect(toOpenAIParams({ ...base, toolChoice: 'required' }, 'm').tool_choice).toBe('required');
    expect(toOpenAIParams({ ...base, toolChoice: { name: 'lookup' } }, 'm').tool_choice).toEqual({
      type: 'function',
      function: { name: 'lookup' },
    });
  });
});

describe('translation from Chat Completions answers', () => {
  it('tool call arguments are parsed from their JSON strings, invalid ones kept raw', () => {
    const res = fromOpenAICompletion(
      completion({
        choices: [
          choice(
            {
              content: null,
              tool_calls: [
                {
                  id: 'call_a',
                  type: 'function',
                  function: { name: 'weather', arguments: '{"city":"Oslo","days":[1,2]}' },
                },
                { id: 'call_b', type: 'function', function: { name: 'w2', arguments: '{"city":' } },
                { id: 'call_c', type: 'function', function: { name: 'w3', arguments: '' } },
              ],
            },
            'tool_calls',
          ),
        ],
        usage: { prompt_tokens: 120, completion_tokens: 30, total_tokens: 150 },
      }),
      42,
      'openai',
    );
    expect(res).toEqual({
      text: '',
      toolCalls: [
        { id: 'call_a', name: 'weather', input: { city: 'Oslo', days: [1, 2] } },
        { id: 'call_b', name: 'w2', input: { _raw: '{"city":' } },
        { id: 'call_c', name: 'w3', input: {} },
      ],
      stopReason: 'tool_use',
      usage: { inputTokens: 120, outputTokens: 30 },
      provider: 'openai',
      model: 'gpt-test',
      tier: '',
      degraded: false,
      latencyMs: 42,
    });
  });

  it('every finish reason maps to its own stop reason, unknown ones to other', () => {
    const reasons = ['stop', 'length', 'tool_calls', 'content_filter', 'function_call', 'eos'];
    const mapped = reasons.map(
      (r) =>
        fromOpenAICompletion(completion({ choices: [choice({ content: 'x' }, r)] }), 0, 'p')
          .stopReason,
    );
    expect(mapped).toEqual(['end', 'max_tokens', 'tool_use', 'refusal', 'tool_use', 'other']);
  });

  it('cached prompt tokens are reported as cache reads', () => {
    const res = fromOpenAICompletion(
      completion({
        choices: [choice({ content: 'hello' }, 'stop')],
        usage: {
          prompt_tokens: 2000,
          completion_tokens: 12,
          total_tokens: 2012,
          prompt_tokens_details: { cached_tokens: 1536 },
        },
      }),
      5,
      'openai',
    );
    expect(res.text).toBe('hello');
    expect(res.usage).toEqual({ inputTokens: 2000, outputTokens: 12, cacheReadTokens: 1536 });
  });

  it('a refusal with no content is a refusal with its text', () => {
    const res = fromOpenAICompletion(
      completion({ choices: [choice({ content: null, refusal: 'I cannot help.' }, 'stop')] }),
      0,
      'openai',
    );
    expect([res.text, res.stopReason]).toEqual(['I cannot help.', 'refusal']);
  });
});

describe('the real SDK against a loopback Chat Completions server', () => {
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
  const ask: LlmRequest = {
    system: 'sys',
    maxTokens: 64,
    messages: [{ role: 'user', content: 'hello' }],
  };

  it('a text answer arrives whole, with usage and the model that answered', async () => {
    fake.script({
      text: 'Hi there.',
      model: 'gpt-fake-0613',
      usage: { promptTokens: 9, completionTokens: 3, cachedTokens: 4 },
    });
    const res = await provider().complete(ask);
    expect(res.latencyMs).toBeGreaterThanOrEqual(0);
    expect({ ...res, latencyMs: 0 }).toEqual({
      text: 'Hi there.',
      toolCalls: [],
      stopReason: 'end',
      usage: { inputTokens: 9, outputTokens: 3, cacheReadTokens: 4 },
      provider: 'openai',
      model: 'gpt-fake-0613',
      tier: '',
      degraded: false,
      latencyMs: 0,
    });
  });

  it('the server receives exactly the translated body, the key as a bearer token, once', async () => {
    const request: LlmRequest = {
      ...ask,
      tools: [{ name: 'f', inputSchema: { type: 'object' } }],
      toolChoice: { name: 'f' },
      json: true,
    };
    await provider().complete(request);
    expect(fake.requests.length).toBe(1);
    const [got] = fake.requests;
    expect(got?.method).toBe('POST');
    expect(got?.path).toBe('/v1/chat/completions');
    expect(got?.headers.authorization).toBe(`Bearer ${KEY}`);
    expect(got?.body).toEqual({
      model: 'gpt-fake',
      max_tokens: 64,
      messages: [
        { role: 'system', content: 'sys' },
        { role: 'user', content: 'hello' },
      ],
      tools: [{ type: 'function', function: { name: 'f', parameters: { type: 'object' } } }],
      tool_choice: { type: 'function', function: { name: 'f' } },
      response_format: { type: 'json_object' },
    });
  });

  it('a tool-call answer comes back with parsed arguments and tool_use', async () => {
    fake.script({
      toolCalls: [{ id: 'call_9', name: 'search', arguments: '{"q":"keel","limit":3}' }],
    });
    const res = await provider().complete(ask);
    expect([res.text, res.toolCalls, res.stopReason]).toEqual([
      '',
      [{ id: 'call_9', name: 'search', input: { q: 'keel', limit: 3 } }],
      'tool_use',
    ]);
  });

  it('an unscripted request gets the default answer, and a provider name is kept', async () => {
    const res = await openaiProvider({
      apiKey: 'ollama',
      baseURL: fake.url,
      model: 'llama3',
      name: 'ollama',
    }).complete(ask);
    expect([res.text, res.provider, res.model]).toEqual([DEFAULT_ANSWER, 'ollama', 'llama3']);
  });

  it('a 429 insufficient_quota is a ProviderError with status, body code, one request', async () => {
    fake.script({
      status: 429,
      error: {
        message: 'You exceeded your current quota.',
        type: 'insufficient_quota',
        code: 'insufficient_quota',
      },
    });
    const err = await caught(provider().complete(ask));
    expect(err.failure.status).toBe(429);
    expect(err.failure.body).toEqual({
      error: {
        message: 'You exceeded your current quota.',
        type: 'insufficient_quota',
        code: 'insufficient_quota',
        param: null,
      },
    });
    expect(err.message).toBe('openai: 429 You exceeded your current quota.');
    expect(fake.requests.length).toBe(1);
  });

  it('a 400 context_length_exceeded keeps its code and param, with no retry', async () => {
    fake.script({
      status: 400,
      error: {
        message: "This model's maximum context length is 8192 tokens.",
        code: 'context_length_exceeded',
        param: 'messages',
      },
    });
    const err = await caught(provider().complete(ask));
    expect(err.failure.status).toBe(400);
    expect(err.failure.body).toEqual({
      error: {
        message: "This model's maximum context length is 8192 tokens.",
        type: 'invalid_request_error',
        code: 'context_length_exceeded',
        param: 'messages',
      },
    });
    expect(fake.requests.length).toBe(1);
  });

  it('a 503 with retry-after is not retried by the SDK and its headers come back', async () => {
    fake.script({
      status: 503,
      error: { message: 'Service unavailable', type: 'server_error' },
      headers: { 'retry-after': '7', 'Retry-After-Ms': '6500' },
    });
    const err = await caught(provider().complete(ask));
    expect(err.failure.status).toBe(503);
    expect(err.failure.headers?.['retry-after']).toBe('7');
    expect(err.failure.headers?.['retry-after-ms']).toBe('6500');
    expect(err.failure.kind).toBeUndefined();
    expect(fake.requests.length).toBe(1);
  });

  it('a non-JSON error body is kept in the message', async () => {
    fake.script({ status: 502, rawBody: 'Bad gateway' });
    const err = await caught(provider().complete(ask));
    expect([err.failure.status, err.failure.body, err.failure.message]).toEqual([
      502,
      undefined,
      '502 Bad gateway',
    ]);
  });

  it('the key never appears in the error message or the failure, even when echoed back', async () => {
    fake.script({
      status: 401,
      error: {
        message: `Incorrect API key provided: ${KEY}. You can find your key elsewhere.`,
        type: 'invalid_request_error',
        code: 'invalid_api_key',
      },
      headers: { 'x-echo': KEY },
    });
    const err = await caught(provider().complete(ask));
    expect(err.failure.status).toBe(401);
    expect(err.message).not.toContain(KEY);
    expect(err.message).not.toContain('9f8e7d6c5b4a');
    expect(JSON.stringify(err.failure)).not.toContain(KEY);
    expect(JSON.stringify(err.failure)).not.toContain('9f8e7d6c5b4a');
    expect(err.failure.headers?.['x-echo']).toBe('[key]');
  });

  it('a server that sends headers then falls silent is a timeout failure, not a hang', async () => {
    fake.script({ silent: true });
    const p = openaiProvider({ apiKey: KEY, baseURL: fake.url, model: 'm', timeoutMs: 300 });
    const err = await caught(p.complete(ask));
    expect([err.failure.kind, err.failure.status]).toEqual(['timeout', undefined]);
    expect(fake.requests.length).toBe(1);
  });

  it('an aborted call rejects with the abort reason, not a provider failure', async () => {
    fake.script({ delayMs: 2000 });
    const ac = new AbortController();
    const p = provider().complete(ask, ac.signal);
    setTimeout(() => ac.abort(new Error('hedge lost')), 50);
    await expect(p).rejects.toThrow('hedge lost');
  });
});

describe('connection failures', () => {
  it('connection refused is a network failure with ECONNREFUSED and no status', async () => {
    const probe = createServer();
    await new Promise<void>((r) => probe.listen(0, '127.0.0.1', r));
    const { port } = probe.address() as AddressInfo;
    await new Promise<void>((r) => probe.close(() => r()));
    const p = openaiProvider({ apiKey: KEY, baseURL: `http://127.0.0.1:${port}/v1`, model: 'm' });
    const err = await caught(
      p.complete({ maxTokens: 5, messages: [{ role: 'user', content: 'x' }] }),
    );
    expect(err.failure.kind).toBe('network');
    expect(err.failure.code).toBe('ECONNREFUSED');
    expect(err.failure.status).toBeUndefined();
    expect(JSON.stringify(err.failure)).not.toContain(KEY);
  });
});

describe('the fake server streams like the API', () => {
  let fake: FakeOpenAI;
  beforeAll(async () => {
    fake = await startFakeOpenAI();
  });
  afterAll(async () => {
    await fake.close();
  });

  async function chunks(client: OpenAI) {
    const stream = await client.chat.completions.create({
      model: 'gpt-fake',
      messages: [{ role: 'user', content: 'hi' }],
      stream: true,
      stream_options: { include_usage: true },
    });
    const out: { text: string; finish: (string | null)[]; usage: unknown[] } = {
      text: '',
      finish: [],
      usage: [],
    };
    for await (const c of stream) {
      out.text += c.choices[0]?.delta.content ?? '';
      if (c.choices[0]) out.finish.push(c.choices[0].finish_reason);
      if (c.usage) out.usage.push(c.usage);
    }
    return out;
  }

  it('a full stream ends with a finish_reason and a usage chunk the SDK reads', async () => {
    const client = new OpenAI({ apiKey: KEY, baseURL: fake.url, maxRetries: 0 });
    fake.script({ text: 'one two three', usage: { promptTokens: 4, completionTokens: 3 } });
    const out = await chunks(client);
    expect(out).toEqual({
      text: 'one two three',
      finish: [null, null, null, null, 'stop'],
      usage: [{ prompt_tokens: 4, completion_tokens: 3, total_tokens: 7 }],
    });
  });

  it('a stream cut after K chunks has no finish_reason at all', async () => {
    const client = new OpenAI({ apiKey: KEY, baseURL: fake.url, maxRetries: 0 });
    fake.script({ text: 'one two three', cutAfterChunks: 2 });
    const out = await chunks(client);
    expect(out).toEqual({ text: 'one ', finish: [null, null], usage: [] });
  });
});

describe('presets', () => {
  it('each preset points at its documented endpoint', () => {
    expect(PRESETS).toEqual({
      ollama: { baseURL: 'http://127.0.0.1:11434/v1', apiKey: 'ollama' },
      lmstudio: { baseURL: 'http://127.0.0.1:1234/v1', apiKey: 'lm-studio' },
      gemini: {
        baseURL: 'https://generativelanguage.googleapis.com/v1beta/openai/',
        apiKeyEnv: 'GEMINI_API_KEY',
      },
      xai: { baseURL: 'https://api.x.ai/v1', apiKeyEnv: 'XAI_API_KEY' },
    });
  });

  it('hosted presets take their key from the environment and refuse without one', () => {
    expect(presetOptions('gemini', 'gemini-2.0-flash', { GEMINI_API_KEY: 'g-key' })).toEqual({
      apiKey: 'g-key',
      baseURL: 'https://generativelanguage.googleapis.com/v1beta/openai/',
      model: 'gemini-2.0-flash',
      name: 'gemini',
    });
    expect(() => presetOptions('xai', 'grok-3', {})).toThrow('preset xai needs XAI_API_KEY');
    expect(presetOptions('ollama', 'llama3', {}).apiKey).toBe('ollama');
  });
});
