/**
 * The failure classifier decides what the router does after every failed attempt: a wrong class
 * retries a request that can never succeed, pays twice, or gives up on a provider that only asked
 * for a short wait. Each row is a wire-level failure and the exact class and wait it must produce.
 */
import { describe, expect, it } from 'vitest';
import {
  CONTEXT_OVERFLOW_PATTERNS,
  NETWORK_ERROR_CODES,
  classifyFailure,
  isContextOverflowMessage,
  parseRetryAfter,
} from '../engine/llm/classify.ts';
import type { FailureClass, ProviderFailure } from '../engine/llm/types.ts';

const NOW = Date.UTC(2026, 0, 1, 0, 0, 0);

const anthropic = (type: string, message: string) => ({
  type: 'error',
  error: { type, message },
});
const openai = (message: string, type: string, code: string | null) => ({
  error: { message, type, param: null, code },
});

type Row = {
  name: string;
  failure: ProviderFailure;
  class: FailureClass;
  retryAfterMs?: number;
  reason?: string;
};

const rows: Row[] = [
  // rate limits and quota (L02, L06)
  {
    name: 'a bare 429 is a rate limit',
    failure: { status: 429, message: 'Too Many Requests', headers: { 'retry-after': '7' } },
    class: 'rate_limited',
    retryAfterMs: 7000,
    reason: '429 rate limited (retry after 7000 ms)',
  },
  {
    name: 'L02: retry-after-ms 1500 is waited in milliseconds',
    failure: { status: 429, message: 'x', headers: { 'retry-after-ms': '1500' } },
    class: 'rate_limited',
    retryAfterMs: 1500,
  },
  {
    name: 'L02: retry-after as an HTTP date is the wait from now',
    failure: {
      status: 429,
      message: 'x',
      headers: { 'retry-after': 'Thu, 01 Jan 2026 00:00:30 GMT' },
    },
    class: 'rate_limited',
    retryAfterMs: 30000,
  },
  {
    name: 'L02: retry-after 3600 is an hour, reported in full for the router to refuse',
    failure: { status: 429, message: 'x', headers: { 'retry-after': '3600' } },
    class: 'rate_limited',
    retryAfterMs: 3600000,
  },
  {
    name: 'an Anthropic rate_limit_error 429',
    failure: { status: 429, message: 'x', body: anthropic('rate_limit_error', 'slow down') },
    class: 'rate_limited',
    reason: '429 rate_limit_error',
  },
  {
    name: 'L06: OpenAI insufficient_quota 429 is quota, not a rate limit',
    failure: {
      status: 429,
      message: 'x',
      body: openai('You exceeded your current quota', 'insufficient_quota', 'insufficient_quota'),
    },
    class: 'quota',
    reason: '429 insufficient_quota',
  },
  {
    name: 'L06: insufficient_quota in error.type alone is quota',
    failure: { status: 429, message: 'x', body: { error: { type: 'insufficient_quota' } } },
    class: 'quota',
  },
  {
    name: 'L06: insufficient_quota in error.code alone is quota',
    failure: {
      status: 429,
      message: 'x',
      body: openai('quota', 'requests', 'insufficient_quota'),
    },
    class: 'quota',
    reason: '429 insufficient_quota',
  },
  {
    name: 'L06: an OpenAI rate_limit_exceeded 429 stays a rate limit',
    failure: {
      status: 429,
      message: 'x',
      body: openai('Rate limit reached', 'requests', 'rate_limit_exceeded'),
      headers: { 'retry-after-ms': '250' },
    },
    class: 'rate_limited',
    retryAfterMs: 250,
    reason: '429 rate_limit_exceeded (retry after 250 ms)',
  },
  // overloaded (L03)
  {
    name: 'Anthropic 529 is overloaded',
    failure: { status: 529, message: 'x', body: anthropic('overloaded_error', 'Overloaded') },
    class: 'overloaded',
    reason: '529 overloaded_error',
  },
  {
    name: 'a bare 529 is overloaded',
    failure: { status: 529, message: 'x' },
    class: 'overloaded',
    reason: '529 overloaded',
  },
  {
    name: 'L03: an overloaded_error event before any text, with no status, is overloaded',
    failure: { message: 'stream error', body: anthropic('overloaded_error', 'Overloaded') },
    class: 'overloaded',
    reason: 'overloaded_error in stream',
  },
  {
    name: 'L03: an overloaded_error event after "Hel", with no status, is overloaded',
    failure: {
      message: 'stream error after text',
      body: { type: 'error', error: { type: 'overloaded_error', message: 'Overloaded' } },
    },
    class: 'overloaded',
    reason: 'overloaded_error in stream',
  },
  {
    name: 'an overloaded_error body on a 500 is still overloaded',
    failure: { status: 500, message: 'x', body: anthropic('overloaded_error', 'Overloaded') },
    class: 'overloaded',
  },
  {
    name: 'a status-less api_error event is a server error, not unknown',
    failure: { message: 'x', body: anthropic('api_error', 'Internal server error') },
    class: 'server',
    reason: 'api_error in stream',
  },
  {
    name: 'a status-less rate_limit_error event is a rate limit',
    failure: { message: 'x', body: anthropic('rate_limit_error', 'slow') },
    class: 'rate_limited',
    reason: 'rate_limit_error in stream',
  },
  {
    name: 'a status-less insufficient_quota event is quota',
    failure: { message: 'x', body: openai('quota', 'insufficient_quota', 'insufficient_quota') },
    class: 'quota',
    reason: 'insufficient_quota in stream',
  },
  {
    name: 'a status-less invalid_request_error event is a bad request',
    failure: { message: 'x', body: anthropic('invalid_request_error', 'bad field') },
    class: 'bad_request',
  },
  {
    name: 'a status-less event whose message is an overflow is context length',
    failure: { message: 'x', body: { error: 'the request exceeds the available context size' } },
    class: 'context_length',
    reason: 'context length exceeded in stream',
  },
  {
    name: 'a status-less failure with nothing to go on is a retryable server error',
    failure: { message: 'mystery' },
    class: 'server',
    reason: 'unknown failure',
  },
  // server, network, timeout, truncated (L05)
  ...[500, 502, 503, 504, 507].map((status): Row => ({
    name: `${status} is a server error`,
    failure: { status, message: 'x' },
    class: 'server',
    reason: `${status} server error`,
  })),
  {
    name: 'a 503 with retry-after keeps the wait',
    failure: { status: 503, message: 'x', headers: { 'retry-after': '2' } },
    class: 'server',
    retryAfterMs: 2000,
  },
  ...[
    'ECONNREFUSED',
    'ECONNRESET',
    'EPIPE',
    'ETIMEDOUT',
    'ENOTFOUND',
    'EAI_AGAIN',
    'UND_ERR_SOCKET',
  ].map((code): Row => ({
    name: `${code} is a network failure`,
    failure: { code, message: `connect ${code} 127.0.0.1:1` },
    class: 'network',
    reason: `network error ${code}`,
  })),
  {
    name: "the adapter's network verdict is a network failure",
    failure: { kind: 'network', message: 'fetch failed' },
    class: 'network',
    reason: 'network error',
  },
  {
    name: "the adapter's timeout verdict is a timeout",
    failure: { kind: 'timeout', message: 'first token timeout' },
    class: 'timeout',
    reason: 'timeout',
  },
  {
    name: 'L05: a stream cut without its end event is truncated',
    failure: { kind: 'truncated', message: 'stream ended after 3 deltas' },
    class: 'truncated',
    reason: 'stream truncated',
  },
  // misconfiguration
  {
    name: '401 is auth',
    failure: {
      status: 401,
      message: 'x',
      body: anthropic('authentication_error', 'invalid x-api-key'),
    },
    class: 'auth',
    reason: '401 authentication_error',
  },
  {
    name: '403 is auth',
    failure: { status: 403, message: 'x' },
    class: 'auth',
    reason: '403 not authorized',
  },
  {
    name: 'Ollama 404 for a model not pulled is not_found',
    failure: {
      status: 404,
      message: 'x',
      body: { error: 'model "llama9" not found, try pulling it first' },
    },
    class: 'not_found',
    reason: '404 not found',
  },
  // context length (L01)
  {
    name: 'Anthropic 400 "prompt is too long" is context length',
    failure: {
      status: 400,
      message: 'x',
      body: anthropic(
        'invalid_request_error',
        'prompt is too long: 210000 tokens > 200000 maximum',
      ),
    },
    class: 'context_length',
    reason: '400 invalid_request_error',
  },
  {
    name: 'Anthropic 413 request_too_large is context length',
    failure: {
      status: 413,
      message: 'x',
      body: anthropic('request_too_large', 'Request exceeds the maximum allowed number of bytes.'),
    },
    class: 'context_length',
    reason: '413 request_too_large',
  },
  {
    name: 'OpenAI context_length_exceeded is context length',
    failure: {
      status: 400,
      message: 'x',
      body: openai(
        "This model's maximum context length is 128000 tokens. However, your messages resulted in 130000 tokens.",
        'invalid_request_error',
        'context_length_exceeded',
      ),
    },
    class: 'context_length',
    reason: '400 context_length_exceeded',
  },
  {
    name: 'L01: llama.cpp "exceeds the available context size" is context length',
    failure: {
      status: 400,
      message: 'x',
      body: {
        error: {
          code: 400,
          message: 'the request exceeds the available context size, try increasing it',
          type: 'exceed_context_size_error',
        },
      },
    },
    class: 'context_length',
  },
  {
    name: 'L01: vLLM "maximum context length is" is context length',
    failure: {
      status: 400,
      message: 'x',
      body: {
        object: 'error',
        message:
          "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (4000 in the messages, 1000 in the completion).",
        type: 'BadRequestError',
        code: 400,
      },
    },
    class: 'context_length',
    reason: '400 context length exceeded',
  },
  {
    name: 'L01: Ollama "input length exceeds the context length" is context length',
    failure: {
      status: 400,
      message: 'x',
      body: { error: 'input length exceeds the context length' },
    },
    class: 'context_length',
  },
  {
    name: 'L01: "too many tokens" in a plain text body is context length',
    failure: { status: 400, message: 'x', body: 'Too many tokens in the prompt' },
    class: 'context_length',
  },
  {
    name: 'L01: LM Studio "when context the overflows" is context length',
    failure: {
      status: 400,
      message: 'x',
      body: {
        error:
          'Trying to keep the first 5000 tokens when context the overflows. However, the model is loaded with context length of only 4096 tokens, which is not enough.',
      },
    },
    class: 'context_length',
  },
  {
    name: 'L01: LM Studio "context length of only" alone is context length',
    failure: {
      status: 400,
      message: 'x',
      body: { error: { message: 'Context Length Of Only 2048' } },
    },
    class: 'context_length',
  },
  {
    name: 'L01: TGI "`inputs` tokens + `max_new_tokens` must be <=" is context length',
    failure: {
      status: 422,
      message: 'x',
      body: { error: 'Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096' },
    },
    class: 'context_length',
  },
  // bad requests
  {
    name: 'another 400 is a bad request',
    failure: {
      status: 400,
      message: 'x',
      body: anthropic('invalid_request_error', 'messages: field required'),
    },
    class: 'bad_request',
    reason: '400 invalid_request_error',
  },
  {
    name: 'Ollama 400 for tools on a model without tool support is a bad request',
    failure: {
      status: 400,
      message: 'x',
      body: { error: 'registry.ollama.ai/library/gemma does not support tools' },
    },
    class: 'bad_request',
    reason: '400 bad request',
  },
  {
    name: '422 without an overflow wording is a bad request',
    failure: { status: 422, message: 'x', body: 'unprocessable' },
    class: 'bad_request',
  },
  {
    name: 'a "prompt is too long" message on a 401 is still auth',
    failure: { status: 401, message: 'x', body: 'prompt is too long' },
    class: 'auth',
  },
  {
    name: 'a 429 saying "too many tokens" is a rate limit, not context length',
    failure: {
      status: 429,
      message: 'x',
      body: { error: { message: 'Too many tokens per minute' } },
    },
    class: 'rate_limited',
  },
  {
    name: '408 is a timeout, not a bad request that would never be retried',
    failure: { status: 408, message: 'x' },
    class: 'timeout',
  },
];

describe('classifyFailure', () => {
  it.each(rows)('$name', (row) => {
    const got = classifyFailure(row.failure, NOW);
    expect({ class: got.class, retryAfterMs: got.retryAfterMs }).toEqual({
      class: row.class,
      retryAfterMs: row.retryAfterMs,
    });
    if (row.reason !== undefined) expect(got.reason).toBe(row.reason);
    expect(got.reason.length).toBeGreaterThan(0);
    expect(got.reason.length).toBeLessThanOrEqual(200);
  });

  it('the retry wait is absent from the result when no header asked for one', () => {
    expect(classifyFailure({ status: 429, message: 'x' }, NOW)).toStrictEqual({
      class: 'rate_limited',
      reason: '429 rate limited',
    });
  });

  it('a reason never carries a key from the body or a header, nor the message', () => {
    const got = classifyFailure(
      {
        status: 401,
        message: 'Incorrect API key provided: sk-test-SECRET',
        headers: {
          authorization: 'Bearer sk-test-SECRET',
          'x-api-key': 'sk-test-SECRET',
          'retry-after': '3',
        },
        body: {
          error: {
            message: 'Incorrect API key provided: sk-test-SECRET',
            type: 'sk-test-SECRET',
            code: 'sk-test-SECRET',
            param: 'sk-test-SECRET',
          },
          key: 'sk-test-SECRET',
        },
      },
      NOW,
    );
    expect(got).toStrictEqual({
      class: 'auth',
      retryAfterMs: 3000,
      reason: '401 not authorized (retry after 3000 ms)',
    });
    expect(got.reason).not.toContain('SECRET');
  });

  it('a reason never echoes the prompt quoted back in an overflow message', () => {
    const prompt = 'Summarise the quarterly report for ACME-CONFIDENTIAL';
    const got = classifyFailure(
      { status: 400, message: prompt, body: `too many tokens in: ${prompt}` },
      NOW,
    );
    expect(got).toStrictEqual({ class: 'context_length', reason: '400 context length exceeded' });
  });

  it('a network code that is not a plain code name is left out of the reason', () => {
    const got = classifyFailure({ kind: 'network', code: 'sk-test-SECRET', message: 'x' }, NOW);
    expect(got).toStrictEqual({ class: 'network', reason: 'network error' });
  });
});

describe('parseRetryAfter', () => {
  it.each([
    ['retry-after 7 is 7000 ms', { 'retry-after': '7' }, 7000],
    ['fractional retry-after 0.3 is 300 ms', { 'retry-after': '0.3' }, 300],
    ['fractional retry-after-ms rounds up', { 'retry-after-ms': '1500.2' }, 1501],
    [
      'retry-after-ms wins over retry-after',
      { 'retry-after-ms': '1500', 'retry-after': '7' },
      1500,
    ],
    [
      'an unparseable retry-after-ms falls back to retry-after',
      { 'retry-after-ms': 'soon', 'retry-after': '2' },
      2000,
    ],
    ['an HTTP date in the past is no wait', { 'retry-after': 'Wed, 31 Dec 2025 23:59:00 GMT' }, 0],
    ['an RFC 850 date is understood', { 'retry-after': 'Thursday, 01-Jan-26 00:00:10 GMT' }, 10000],
    ['header names are matched whatever their case', { 'Retry-After': '4' }, 4000],
    ['whitespace around the value is ignored', { 'retry-after': ' 5 ' }, 5000],
  ])('%s', (_name, headers: Record<string, string>, expected) => {
    expect(parseRetryAfter(headers, NOW)).toBe(expected);
  });

  it.each([
    ['no headers', undefined],
    ['an empty value', { 'retry-after': '' }],
    ['a negative number', { 'retry-after': '-5' }],
    ['words', { 'retry-after': 'later' }],
    ['a bare number that Date.parse would accept as a year', { 'retry-after': '2026-01-01' }],
    ['an unparseable date', { 'retry-after': 'Thu, 99 Foo 2026 99:99:99 GMT' }],
  ])('ignores %s', (_name, headers: Record<string, string> | undefined) => {
    expect(parseRetryAfter(headers, NOW)).toBeUndefined();
  });
});

describe('the exported overflow wordings', () => {
  it('recognise each local server wording and none of the ordinary errors', () => {
    const overflow = [
      'prompt is too long: 210000 tokens > 200000 maximum',
      'the request exceeds the available context size, try increasing it',
      "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens",
      'input length exceeds the context length',
      'Too many tokens',
      'Trying to keep the first 5000 tokens when context the overflows.',
      'the model is loaded with context length of only 4096 tokens',
      'Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096',
      'Context window exceeded',
    ];
    const ordinary = [
      'messages: field required',
      'model "llama9" not found, try pulling it first',
      'Overloaded',
      'does not support tools',
    ];
    expect(overflow.filter((m) => !isContextOverflowMessage(m))).toEqual([]);
    expect(ordinary.filter((m) => isContextOverflowMessage(m))).toEqual([]);
    expect(CONTEXT_OVERFLOW_PATTERNS.length).toBeGreaterThanOrEqual(4);
    expect(CONTEXT_OVERFLOW_PATTERNS.every((p) => p.flags.includes('i') && !p.global)).toBe(true);
    expect(NETWORK_ERROR_CODES).toContain('UND_ERR_SOCKET');
  });
});
