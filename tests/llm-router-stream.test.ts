/**
 * The router over streams, end to end: the real SDKs, through the adapters, against the fake
 * servers on 127.0.0.1. Failover before the first token is silent; after it, a `restart` event
 * comes before the next tier's answer; silent, stalled and cut streams are timed out or counted as
 * truncated; hedging races two tiers; L01 and L02 at the router.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { anthropicProvider } from '../adapters/llm/anthropic.ts';
import { openaiProvider } from '../adapters/llm/openai.ts';
import {
  createRouter,
  LlmRejectedError,
  LlmUnavailableError,
  type Attempt,
  type RoutedStreamEvent,
  type RouterOptions,
  type RouterTier,
} from '../engine/llm/router.ts';
import { memoryTierStates } from '../engine/llm/tier-state.ts';
import type { LlmRequest } from '../engine/llm/types.ts';
import type { Clock } from '../engine/time.ts';
import { startFakeAnthropic, type FakeAnthropic } from './support/fake-anthropic.ts';
import { startFakeOpenAI, type FakeOpenAI } from './support/fake-openai.ts';
import { waitFor } from './support/index.ts';

const KEY = 'sk-test-stream-router-0123456789';
const REQUEST: LlmRequest = { messages: [{ role: 'user', content: 'hi' }], maxTokens: 64 };

/** Real time for timestamps; retry waits recorded and skipped. */
function quickClock(): Clock & { waits: number[] } {
  const waits: number[] = [];
  return {
    waits,
    now: () => Date.now(),
    sleep: (ms) => {
      waits.push(ms);
      return Promise.resolve();
    },
  };
}

let claude: FakeAnthropic;
let gpt: FakeOpenAI;
let clock: ReturnType<typeof quickClock>;
const unhandled: unknown[] = [];
const onUnhandled = (reason: unknown) => unhandled.push(reason);

beforeEach(async () => {
  [claude, gpt] = await Promise.all([startFakeAnthropic(), startFakeOpenAI()]);
  clock = quickClock();
  unhandled.length = 0;
  process.on('unhandledRejection', onUnhandled);
});

afterEach(async () => {
  process.off('unhandledRejection', onUnhandled);
  await Promise.all([claude.close(), gpt.close()]);
  expect(unhandled).toEqual([]);
});

function tiers(): RouterTier[] {
  return [
    {
      name: 'claude',
      provider: anthropicProvider({ apiKey: KEY, baseURL: claude.url, model: 'claude-x' }),
    },
    { name: 'gpt', provider: openaiProvider({ apiKey: KEY, baseURL: gpt.url, model: 'gpt-y' }) },
  ];
}

function router(over: Partial<RouterOptions> = {}) {
  return createRouter({ tiers: tiers(), clock, random: () => 1, ...over });
}

async function events(stream: AsyncIterable<RoutedStreamEvent>): Promise<RoutedStreamEvent[]> {
  const seen: RoutedStreamEvent[] = [];
  for await (const event of stream) seen.push(event);
  return seen;
}

/** Events without the final response, and the response's text and tier. */
function story(seen: RoutedStreamEvent[]) {
  return seen.map((e) =>
    e.type === 'done'
      ? `done:${e.response.tier}:${e.response.text}`
      : e.type === 'text'
        ? e.text
        : `restart:${e.tier}`,
  );
}

const brief = (attempts: Attempt[]) =>
  attempts.map((a) => [a.tier, a.class ?? null, a.status ?? null, a.cancelled === true]);

const text = (t: string) => ({ content: [{ type: 'text' as const, text: t }], chunkSize: 2 });

describe('streams through the router', () => {
  it('a 529 before the first token fails over silently: no restart event, the answer once', async () => {
    claude.script([{ status: 529 }, { status: 529 }, { status: 529 }]);
    gpt.script({ text: 'Hello' });
    const seen = await events(router({ breaker: { failureThreshold: 1 } }).stream(REQUEST));
    expect(story(seen).join('|')).not.toContain('restart');
    const done = seen.at(-1)!;
    if (done.type !== 'done') throw new Error('no done');
    expect(done.response.text).toBe('Hello');
    expect(brief(done.response.attempts)).toEqual([
      ['claude', 'overloaded', 529, false],
      ['gpt', null, null, false],
    ]);
  });

  it('L03: overloaded_error before any text is retried like a 529; the answer comes once', async () => {
    claude.script([{ ...text('Hello'), errorAfterDeltas: 0 }, text('Hello')]);
    const seen = await events(router().stream(REQUEST));
    expect(story(seen)).toEqual(['He', 'll', 'o', 'done:claude:Hello']);
    const done = seen.at(-1) as Extract<RoutedStreamEvent, { type: 'done' }>;
    expect(brief(done.response.attempts)).toEqual([
      ['claude', 'overloaded', null, false],
      ['claude', null, null, false],
    ]);
    expect(clock.waits).toHaveLength(1);
  });

  it('L03: overloaded_error after "Hel": the consumer is told to restart, and never gets "HelHello"', async () => {
    claude.script([
      { content: [{ type: 'text', text: 'Hello' }], chunkSize: 3, errorAfterDeltas: 1 },
      { content: [{ type: 'text', text: 'Hello' }], chunkSize: 3 },
    ]);
    const seen = await events(router().stream(REQUEST));
    expect(story(seen)).toEqual(['Hel', 'restart:claude', 'Hel', 'lo', 'done:claude:Hello']);
    const restart = seen.find((e) => e.type === 'restart');
    expect(restart).toEqual({
      type: 'restart',
      tier: 'claude',
      reason: 'claude: overloaded_error in stream',
    });
  });

  it('L04: headers then only keep-alives: the first-token timeout closes the socket and the next tier answers', async () => {
    claude.script([{ ...text('never'), stallAfterDeltas: 0, keepAliveMs: 20 }]);
    gpt.script({ text: 'from gpt' });
    const started = Date.now();
    const seen = await events(router({ timeouts: { firstTokenMs: 300 } }).stream(REQUEST));
    const elapsed = Date.now() - started;
    expect(story(seen)).toEqual(['from ', 'gpt', 'done:gpt:from gpt']);
    const done = seen.at(-1) as Extract<RoutedStreamEvent, { type: 'done' }>;
    expect(brief(done.response.attempts)).toEqual([
      ['claude', 'timeout', null, false],
      ['gpt', null, null, false],
    ]);
    expect(elapsed).toBeGreaterThanOrEqual(290);
    await waitFor(() => claude.openSockets() === 0, 5_000);
  });

  it('L04: a stream that keeps producing is not cut by the silence timeouts, however long it runs', async () => {
    // 40 deltas 30 ms apart: 1.2 s in all, four times the first-token and idle limits.
    const long = 'x'.repeat(40);
    claude.script([{ content: [{ type: 'text', text: long }], chunkSize: 1, deltaIntervalMs: 30 }]);
    const seen = await events(
      router({ timeouts: { firstTokenMs: 300, idleMs: 300 } }).stream(REQUEST),
    );
    const done = seen.at(-1) as Extract<RoutedStreamEvent, { type: 'done' }>;
    expect(done.response.text).toBe(long);
    expect(seen.filter((e) => e.type === 'text')).toHaveLength(40);
    expect(gpt.requests).toHaveLength(0);
  });

  it('idle timeout: a stream that stalls after two deltas restarts on the next tier, and says so', async () => {
    claude.script([{ ...text('Hello there'), stallAfterDeltas: 2, keepAliveMs: 20 }]);
    gpt.script({ text: 'Fine' });
    const seen = await events(
      router({ timeouts: { firstTokenMs: 2_000, idleMs: 250 } }).stream(REQUEST),
    );
    expect(story(seen)).toEqual(['He', 'll', 'restart:gpt', 'Fine', 'done:gpt:Fine']);
    const restart = seen.find((e) => e.type === 'restart');
    expect(restart).toEqual({ type: 'restart', tier: 'gpt', reason: 'claude: timeout' });
    await waitFor(() => claude.openSockets() === 0, 5_000);
  });

  it('L05: a stream cut without its end event is truncated, failed over, and its text never in the answer', async () => {
    claude.script([{ ...text('Partial answer'), endWithoutStopAfterDeltas: 3 }]);
    gpt.script({ text: 'Whole' });
    const seen = await events(router().stream(REQUEST));
    expect(story(seen)).toEqual(['Pa', 'rt', 'ia', 'restart:gpt', 'Whole', 'done:gpt:Whole']);
    const done = seen.at(-1) as Extract<RoutedStreamEvent, { type: 'done' }>;
    expect(brief(done.response.attempts)).toEqual([
      ['claude', 'truncated', null, false],
      ['gpt', null, null, false],
    ]);
  });

  it('every tier failing mid-stream ends in LlmUnavailableError after exactly the budget', async () => {
    claude.script(
      Array.from({ length: 4 }, () => ({ ...text('abc'), endWithoutStopAfterDeltas: 1 })),
    );
    gpt.script(...Array.from({ length: 4 }, () => ({ text: 'abc', cutAfterChunks: 1 })));
    const r = router({ budget: 3 });
    const seen: RoutedStreamEvent[] = [];
    let error: unknown;
    try {
      for await (const e of r.stream(REQUEST)) seen.push(e);
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(LlmUnavailableError);
    expect(brief((error as LlmUnavailableError).attempts)).toEqual([
      ['claude', 'truncated', null, false],
      ['gpt', 'truncated', null, false],
      ['claude', 'truncated', null, false],
    ]);
    expect(claude.requests.length + gpt.requests.length).toBe(3);
    // gpt's cut came before any text, so only the claude text delivered first is void.
    expect(story(seen)).toEqual(['ab', 'restart:claude', 'ab']);
  });

  it('a consumer that stops early closes the provider socket', async () => {
    claude.script([
      { content: [{ type: 'text', text: 'y'.repeat(50) }], chunkSize: 1, deltaIntervalMs: 20 },
    ]);
    for await (const e of router().stream(REQUEST)) {
      if (e.type === 'text') break;
    }
    await waitFor(() => claude.openSockets() === 0, 5_000);
  });
});

describe('the other timeouts', () => {
  it('connect: a server that never sends its headers is a timeout after connectTimeoutMs, then the next tier', async () => {
    claude.script([{ hang: true }]);
    gpt.script({ text: 'ok' });
    const r = createRouter({
      tiers: [
        {
          name: 'claude',
          provider: anthropicProvider({
            apiKey: KEY,
            baseURL: claude.url,
            model: 'claude-x',
            connectTimeoutMs: 200,
          }),
        },
        tiers()[1]!,
      ],
      clock,
      random: () => 1,
    });
    const seen = await events(r.stream(REQUEST));
    const done = seen.at(-1) as Extract<RoutedStreamEvent, { type: 'done' }>;
    expect(brief(done.response.attempts)).toEqual([
      ['claude', 'timeout', null, false],
      ['gpt', null, null, false],
    ]);
    await waitFor(() => claude.openSockets() === 0, 5_000);
  });

  it('total: a plain call slower than totalMs is a timeout, and the next tier answers', async () => {
    claude.script([{ ...text('too late'), delayMs: 2_000 }]);
    gpt.script({ text: 'in time' });
    const started = Date.now();
    const res = await router({ timeouts: { totalMs: 250 } }).complete(REQUEST);
    expect(Date.now() - started).toBeLessThan(1_500);
    expect([res.tier, res.text]).toEqual(['gpt', 'in time']);
    expect(brief(res.attempts)).toEqual([
      ['claude', 'timeout', null, false],
      ['gpt', null, null, false],
    ]);
    await waitFor(() => claude.openSockets() === 0, 5_000);
  });
});

describe('breakers shared between routers', () => {
  it('half-open admits one probe across routers: the other goes to the next tier meanwhile', async () => {
    const states = memoryTierStates();
    let now = 1_000_000;
    const shared = { now: () => now, sleep: () => Promise.resolve() };
    const make = () =>
      createRouter({
        tiers: tiers(),
        clock: shared,
        random: () => 1,
        states,
        breaker: { failureThreshold: 1, cooldownMs: 10_000 },
      });
    const [one, two] = [make(), make()];
    claude.script([{ status: 500 }]);
    expect((await one.complete(REQUEST)).tier).toBe('gpt');
    now += 10_000;
    // `one` probes claude, which answers slowly; `two` meanwhile must not probe it too.
    claude.script([{ ...text('probe ok'), delayMs: 400 }]);
    const probe = one.complete(REQUEST);
    await waitFor(() => claude.requests.length === 2, 5_000);
    const other = await two.complete(REQUEST);
    expect(other.tier).toBe('gpt');
    expect((await probe).tier).toBe('claude');
    expect(claude.requests).toHaveLength(2);
    expect(one.breakers().claude).toEqual({ state: 'closed', failures: 0, openUntil: 0 });
  });
});

describe('hedging', () => {
  it('a slow first token starts the next tier; the first to answer wins and the other is cancelled', async () => {
    claude.script([{ ...text('slow'), delayMs: 1_500 }]);
    gpt.script({ text: 'quick', usage: { promptTokens: 7, completionTokens: 1 } });
    const started = Date.now();
    const res = await router({ hedgeAfterMs: 150 }).complete(REQUEST);
    expect(Date.now() - started).toBeLessThan(1_400);
    expect([res.tier, res.text]).toEqual(['gpt', 'quick']);
    expect(brief(res.attempts)).toEqual([
      ['claude', null, null, true],
      ['gpt', null, null, false],
    ]);
    expect(res.attempts[1]!.hedge).toBe(true);
    expect(res.attempts[1]!.usage).toEqual({ inputTokens: 7, outputTokens: 1 });
    expect([claude.requests.length, gpt.requests.length]).toEqual([1, 1]);
    await waitFor(() => claude.openSockets() === 0, 5_000);
  });

  it('no hedge when the first token comes before the delay', async () => {
    claude.script([text('fast')]);
    const res = await router({ hedgeAfterMs: 1_000 }).complete(REQUEST);
    expect(res.tier).toBe('claude');
    expect(gpt.requests).toHaveLength(0);
  });

  it("a streamed hedge: the text the caller sees is the winner's only", async () => {
    claude.script([{ ...text('late answer'), delayMs: 1_000 }]);
    gpt.script({ text: 'hedged' });
    const seen = await events(router({ hedgeAfterMs: 100 }).stream(REQUEST));
    expect(story(seen)).toEqual(['hedged', 'done:gpt:hedged']);
  });
});

describe('L01 and L02 at the router', () => {
  const overflow = [
    'the request exceeds the available context size, try increasing it',
    "This model's maximum context length is 4096 tokens. However, you requested 9000 tokens.",
    'input length exceeds the context length',
    'Trying to keep the first 5000 tokens when context the overflows. However, the model is loaded with context length of only 4096 tokens',
  ];
  it.each(overflow)(
    'L01: a local server saying "%s" gets one call to the larger tier, no retry',
    async (message) => {
      const local = await startFakeOpenAI();
      try {
        local.script({ status: 400, error: { message } });
        gpt.script({ text: 'big window' });
        const r = createRouter({
          tiers: [
            {
              name: 'local',
              provider: openaiProvider({ apiKey: 'x', baseURL: local.url, model: 'l' }),
              contextWindow: 4_096,
            },
            {
              name: 'gpt',
              provider: openaiProvider({ apiKey: KEY, baseURL: gpt.url, model: 'g' }),
              contextWindow: 128_000,
            },
          ],
          clock,
        });
        const res = await r.complete(REQUEST);
        expect(res.tier).toBe('gpt');
        expect(brief(res.attempts)).toEqual([
          ['local', 'context_length', 400, false],
          ['gpt', null, null, false],
        ]);
        expect([local.requests.length, gpt.requests.length]).toEqual([1, 1]);
        expect(clock.waits).toEqual([]);
      } finally {
        await local.close();
      }
    },
  );

  it('L02: retry-after 7 s and retry-after-ms 1500 are honoured on the same tier', async () => {
    claude.script([
      { status: 429, headers: { 'retry-after': '7' } },
      { status: 429, headers: { 'retry-after-ms': '1500' } },
      text('ok'),
    ]);
    const res = await router({ budget: 4 }).complete(REQUEST);
    expect(res.tier).toBe('claude');
    expect(clock.waits).toEqual([7_000, 1_500]);
    expect(gpt.requests).toHaveLength(0);
  });

  it('L02: a retry-after given as an HTTP date is a wait until then', async () => {
    const inNine = new Date(Date.now() + 9_000).toUTCString();
    claude.script([{ status: 429, headers: { 'retry-after': inNine } }, text('ok')]);
    const res = await router().complete(REQUEST);
    expect(res.tier).toBe('claude');
    // About nine seconds, less the time the call took (an HTTP date has whole seconds).
    expect(clock.waits[0]).toBeGreaterThan(7_000);
    expect(clock.waits[0]).toBeLessThanOrEqual(9_000);
  });

  it('a tier that stays rate limited gets two retries, then the next tier has the rest of the budget', async () => {
    claude.script(
      Array.from({ length: 5 }, () => ({ status: 429, headers: { 'retry-after': '1' } })),
    );
    gpt.script({ text: 'not limited' });
    const res = await router({ budget: 5 }).complete(REQUEST);
    expect([res.tier, res.text]).toEqual(['gpt', 'not limited']);
    expect(brief(res.attempts)).toEqual([
      ['claude', 'rate_limited', 429, false],
      ['claude', 'rate_limited', 429, false],
      ['claude', 'rate_limited', 429, false],
      ['gpt', null, null, false],
    ]);
    expect(clock.waits).toEqual([1_000, 1_000]);
  });
});

describe('misconfigured tiers', () => {
  const refused = { status: 401, error: { type: 'authentication_error', message: 'invalid key' } };

  it('a tier that refused its key is skipped by the next calls of the same router, without a request', async () => {
    claude.script([refused]);
    gpt.script({ text: 'one' }, { text: 'two' });
    const r = router();
    expect((await r.complete(REQUEST)).tier).toBe('gpt');
    const second = await r.complete(REQUEST);
    expect(brief(second.attempts)).toEqual([['gpt', null, null, false]]);
    expect(claude.requests).toHaveLength(1);
    expect(r.misconfigured()).toEqual(['claude']);
    // Another router (another process, perhaps with the right key) tries it again.
    claude.script([text('fixed')]);
    expect((await router().complete(REQUEST)).tier).toBe('claude');
  });

  it('every tier refusing its key is LLM_REJECTED (a retry cannot help), not an outage', async () => {
    claude.script([refused]);
    gpt.script({ status: 401, error: { message: 'Incorrect API key', code: 'invalid_api_key' } });
    const error = await router()
      .complete(REQUEST)
      .then(
        () => undefined,
        (e: unknown) => e,
      );
    expect(error).toBeInstanceOf(LlmRejectedError);
    expect((error as LlmRejectedError).code).toBe('LLM_REJECTED');
    expect((error as LlmRejectedError).failureClass).toBe('auth');
    expect((error as Error).message).toContain(
      'every tier refused the call as misconfigured (claude, gpt)',
    );
  });
});

describe('in-flight limit per tier', () => {
  it('maxInFlight 2: six concurrent calls reach the provider two at a time', async () => {
    const arrivals: number[] = [];
    let open = 0;
    let most = 0;
    gpt.otherwise(() => {
      arrivals.push(Date.now());
      open += 1;
      most = Math.max(most, open);
      setTimeout(() => (open -= 1), 150);
      return { text: 'ok', delayMs: 150 };
    });
    const r = createRouter({
      tiers: [{ ...tiers()[1]!, maxInFlight: 2 }],
      clock,
      random: () => 1,
    });
    const answers = await Promise.all(Array.from({ length: 6 }, () => r.complete(REQUEST)));
    expect(answers.map((a) => a.tier)).toEqual(Array(6).fill('gpt'));
    expect(arrivals).toHaveLength(6);
    expect(most).toBe(2);
  });
});
