import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { anthropicProvider } from '../adapters/llm/anthropic.ts';
import { openaiProvider } from '../adapters/llm/openai.ts';
import {
  createRouter,
  type Attempt,
  LlmRejectedError,
  LlmUnavailableError,
  type RouterOptions,
  type RouterTier,
} from '../engine/llm/router.ts';
import type { LlmRequest } from '../engine/llm/types.ts';
import type { Clock } from '../engine/time.ts';
import { startFakeAnthropic, type FakeAnthropic } from './support/fake-anthropic.ts';
import { DEFAULT_ANSWER, startFakeOpenAI, type FakeOpenAI } from './support/fake-openai.ts';

const KEY = 'sk-test-router-0123456789';
const START = 1_700_000_000_000;
const REQUEST: LlmRequest = { messages: [{ role: 'user', content: 'hi' }], maxTokens: 16 };

type FakeClock = Clock & { waits: number[]; advance(ms: number): void };

function fakeClock(): FakeClock {
  let t = START;
  const waits: number[] = [];
  return {
    waits,
    now: () => t,
    sleep(ms) {
      waits.push(ms);
      t += ms;
      return Promise.resolve();
    },
    advance(ms) {
      t += ms;
    },
  };
}

let a: FakeOpenAI;
let b: FakeAnthropic;
let c: FakeOpenAI;
let clock: FakeClock;

beforeEach(async () => {
  [a, b, c] = await Promise.all([startFakeOpenAI(), startFakeAnthropic(), startFakeOpenAI()]);
  clock = fakeClock();
});

afterEach(async () => {
  await Promise.all([a.close(), b.close(), c.close()]);
});

function tiers(windows: [number?, number?, number?] = []): RouterTier[] {
  const list: RouterTier[] = [
    {
      name: 'primary',
      provider: openaiProvider({ apiKey: KEY, baseURL: a.url, model: 'gpt-a' }),
    },
    {
      name: 'secondary',
      provider: anthropicProvider({ apiKey: KEY, baseURL: b.url, model: 'claude-b' }),
    },
    {
      name: 'tertiary',
      provider: openaiProvider({ apiKey: KEY, baseURL: c.url, model: 'gpt-c', name: 'local' }),
    },
  ];
  windows.forEach((w, i) => {
    if (w !== undefined) list[i]!.contextWindow = w;
  });
  return list;
}

function router(over: Partial<RouterOptions> = {}) {
  return createRouter({ tiers: tiers(), clock, random: () => 1, ...over });
}

/** The policy-relevant part of each attempt (latency, usage and reason are checked apart). */
const brief = (attempts: Attempt[]) =>
  attempts.map(({ latencyMs: _l, usage: _u, reason: _r, ...rest }) => rest);

const counts = () => [a.requests.length, b.requests.length, c.requests.length];

const server500 = { status: 500, error: { message: 'boom', type: 'server_error' } };

describe('llm router', () => {
  it('L02: an overloaded primary asking for 2 s is retried on the same tier after exactly 2000 ms', async () => {
    const [openai, anthropic] = tiers();
    const r = createRouter({
      tiers: [
        { name: 'primary', provider: anthropic!.provider },
        { name: 'secondary', provider: openai!.provider },
      ],
      clock,
      random: () => 1,
    });
    b.script([{ status: 529, headers: { 'retry-after': '2' } }]);
    const res = await r.complete(REQUEST);
    expect(res.tier).toBe('primary');
    expect(res.provider).toBe('anthropic');
    expect(res.text).toBe('ok');
    expect(res.degraded).toBe(false);
    expect(brief(res.attempts)).toEqual([
      { tier: 'primary', class: 'overloaded', status: 529, waitMs: 2000 },
      { tier: 'primary' },
    ]);
    expect(clock.waits).toEqual([2000]);
    expect(counts()).toEqual([0, 2, 0]);
  });

  it('L02: a 429 asking for an hour moves to the next tier at once instead of sleeping', async () => {
    a.script({
      status: 429,
      error: { message: 'slow down', type: 'requests', code: 'rate_limit_exceeded' },
      headers: { 'retry-after': '3600' },
    });
    const res = await router().complete(REQUEST);
    expect(res.tier).toBe('secondary');
    expect(res.provider).toBe('anthropic');
    expect(brief(res.attempts)).toEqual([
      { tier: 'primary', class: 'rate_limited', status: 429 },
      { tier: 'secondary' },
    ]);
    expect(clock.waits).toEqual([]);
    expect(counts()).toEqual([1, 1, 0]);
  });

  it('L06: insufficient_quota takes the tier down for the cooldown, with no retry on it', async () => {
    const r = router({ quotaCooldownMs: 600_000 });
    a.script({
      status: 429,
      error: { message: 'You exceeded your quota', type: 'insufficient_quota', code: null },
    });
    const first = await r.complete(REQUEST);
    expect(first.tier).toBe('secondary');
    expect(brief(first.attempts)).toEqual([
      { tier: 'primary', class: 'quota', status: 429 },
      { tier: 'secondary' },
    ]);
    expect(clock.waits).toEqual([]);
    expect(r.downUntil()).toEqual({ primary: START + 600_000 });
    expect(counts()).toEqual([1, 1, 0]);

    const second = await r.complete(REQUEST);
    expect(brief(second.attempts)).toEqual([{ tier: 'secondary' }]);
    expect(counts()).toEqual([1, 2, 0]);

    clock.advance(599_999);
    await r.complete(REQUEST);
    expect(counts()).toEqual([1, 3, 0]);

    clock.advance(1);
    const later = await r.complete(REQUEST);
    expect(later.tier).toBe('primary');
    expect(later.text).toBe(DEFAULT_ANSWER);
    expect(r.downUntil()).toEqual({});
    expect(counts()).toEqual([2, 3, 0]);
  });

  it('L06: a 401 tier is skipped without a retry and reported as misconfigured', async () => {
    const r = router();
    a.script({
      status: 401,
      error: {
        message: 'Incorrect API key',
        type: 'invalid_request_error',
        code: 'invalid_api_key',
      },
    });
    const res = await r.complete(REQUEST);
    expect(res.tier).toBe('secondary');
    expect(brief(res.attempts)).toEqual([
      { tier: 'primary', class: 'auth', status: 401 },
      { tier: 'secondary' },
    ]);
    expect(r.misconfigured()).toEqual(['primary']);
    expect(clock.waits).toEqual([]);
    expect(counts()).toEqual([1, 1, 0]);
  });

  it('L07: when every tier answers 500 the whole call sends exactly the budget of requests', async () => {
    const r = router({ budget: 4 });
    a.script(server500, server500);
    b.script([{ status: 500 }, { status: 500 }]);
    c.script(server500, server500);
    const err = await r.complete(REQUEST).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(LlmUnavailableError);
    const e = err as LlmUnavailableError;
    expect(e.name).toBe('LlmUnavailableError');
    expect(e.message).toContain('budget of 4 attempts spent');
    expect(e.retryAfterMs).toBeUndefined();
    expect(brief(e.attempts)).toEqual([
      { tier: 'primary', class: 'server', status: 500, waitMs: 250 },
      { tier: 'secondary', class: 'server', status: 500, waitMs: 500 },
      { tier: 'tertiary', class: 'server', status: 500, waitMs: 1000 },
      { tier: 'primary', class: 'server', status: 500 },
    ]);
    expect(counts()).toEqual([2, 1, 1]);
    expect(a.requests.length + b.requests.length + c.requests.length).toBe(4);
    expect(clock.waits).toEqual([250, 500, 1000]);
  });

  it('L07: a retried rate limit spends the same budget as the other tiers', async () => {
    const r = router({ budget: 3 });
    const limited = {
      status: 429,
      error: { message: 'slow down', type: 'requests', code: 'rate_limit_exceeded' },
      headers: { 'retry-after-ms': '700' },
    };
    a.script(limited, limited, limited, limited);
    const e = (await r.complete(REQUEST).catch((x: unknown) => x)) as LlmUnavailableError;
    expect(e).toBeInstanceOf(LlmUnavailableError);
    expect(e.retryAfterMs).toBe(700);
    expect(e.attempts.map((x) => x.tier)).toEqual(['primary', 'primary', 'primary']);
    expect(clock.waits).toEqual([700, 700]);
    expect(counts()).toEqual([3, 0, 0]);
  });

  it('an error that is not a provider failure counts as a network failure and fails over', async () => {
    const broken: RouterTier = {
      name: 'broken',
      provider: {
        name: 'broken',
        model: 'none',
        complete: () => Promise.reject(new TypeError('socket hung up')),
      },
    };
    const r = createRouter({ tiers: [broken, tiers()[1]!], clock, random: () => 1 });
    const res = await r.complete(REQUEST);
    expect(res.tier).toBe('secondary');
    expect(brief(res.attempts)).toEqual([
      { tier: 'broken', class: 'network', waitMs: 250 },
      { tier: 'secondary' },
    ]);
    expect(r.breakers().broken).toEqual({ state: 'closed', failures: 1, openUntil: 0 });
    expect(counts()).toEqual([0, 1, 0]);
  });

  it('a bad request fails at once after one request and never reaches another tier', async () => {
    a.script({
      status: 400,
      error: { message: "Invalid 'temperature'", type: 'invalid_request_error', code: null },
    });
    const err = await router()
      .complete(REQUEST)
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(LlmRejectedError);
    expect((err as LlmRejectedError).failureClass).toBe('bad_request');
    expect(brief((err as LlmRejectedError).attempts)).toEqual([
      { tier: 'primary', class: 'bad_request', status: 400 },
    ]);
    expect(clock.waits).toEqual([]);
    expect(counts()).toEqual([1, 0, 0]);
  });

  it('a prompt too long for a tier goes to the next tier with a larger context window', async () => {
    const r = createRouter({ tiers: tiers([8_000, 4_000, 200_000]), clock, random: () => 1 });
    a.script({
      status: 400,
      error: {
        message: "This model's maximum context length is 8000 tokens.",
        type: 'invalid_request_error',
        code: 'context_length_exceeded',
      },
    });
    const res = await r.complete(REQUEST);
    expect(res.tier).toBe('tertiary');
    expect(res.provider).toBe('local');
    expect(brief(res.attempts)).toEqual([
      { tier: 'primary', class: 'context_length', status: 400 },
      { tier: 'tertiary' },
    ]);
    expect(counts()).toEqual([1, 0, 1]);
  });

  it('a prompt too long for the largest window fails at once', async () => {
    const r = createRouter({ tiers: tiers([8_000, 4_000, 2_000]), clock, random: () => 1 });
    a.script({
      status: 400,
      error: {
        message: 'too long',
        type: 'invalid_request_error',
        code: 'context_length_exceeded',
      },
    });
    const err = await r.complete(REQUEST).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(LlmRejectedError);
    expect((err as LlmRejectedError).failureClass).toBe('context_length');
    expect(counts()).toEqual([1, 0, 0]);
  });

  it('breaker: three 500s in a row open it; open sends nothing; one probe after the cooldown closes it', async () => {
    const r = router({ breaker: { failureThreshold: 3, cooldownMs: 30_000 } });
    a.script(server500, server500, server500);
    for (let i = 0; i < 3; i++) {
      const res = await r.complete(REQUEST);
      expect(res.tier).toBe('secondary');
    }
    expect(clock.waits).toEqual([250, 250, 250]);
    expect(r.breakers().primary).toEqual({
      state: 'open',
      failures: 3,
      openUntil: START + 500 + 30_000,
    });
    expect(counts()).toEqual([3, 3, 0]);

    const skipped = await r.complete(REQUEST);
    expect(brief(skipped.attempts)).toEqual([{ tier: 'secondary' }]);
    expect(counts()).toEqual([3, 4, 0]);

    clock.advance(30_000);
    const probe = await r.complete(REQUEST);
    expect(probe.tier).toBe('primary');
    expect(brief(probe.attempts)).toEqual([{ tier: 'primary' }]);
    expect(r.breakers().primary).toEqual({ state: 'closed', failures: 0, openUntil: 0 });
    expect(counts()).toEqual([4, 4, 0]);
  });

  it('breaker: a failed half-open probe opens it again for a full cooldown', async () => {
    const r = router({ breaker: { failureThreshold: 1, cooldownMs: 10_000 } });
    a.script(server500, server500);
    await r.complete(REQUEST);
    expect(r.breakers().primary?.state).toBe('open');
    clock.advance(10_000);
    const res = await r.complete(REQUEST);
    expect(res.tier).toBe('secondary');
    expect(r.breakers().primary).toEqual({
      state: 'open',
      failures: 2,
      openUntil: START + 10_250 + 10_000,
    });
    expect(counts()).toEqual([2, 2, 0]);
  });
});
