/**
 * The queue's policies in isolation: the park schedule (seeded jitter, retry-after and breaker
 * cooldowns taking precedence), a workflow that refuses the offline tier, and a workflow's
 * concurrency limit under a worker. Real SQLite files; the LLM tier is the real OpenAI SDK
 * against the fake server.
 */
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { openEngine, workflow, type Engine } from '../adapters/index.ts';
import { openaiProvider } from '../adapters/llm/openai.ts';
import { degradedProvider } from '../engine/llm/degraded.ts';
import { createRouter, LlmUnavailableError } from '../engine/llm/router.ts';
import { curableWait, type ParkPolicy } from '../engine/queue.ts';
import { startFakeOpenAI, type FakeOpenAI } from './support/fake-openai.ts';
import { tempDir } from './support/index.ts';

const dir = tempDir('keel-queue-policy-');
let n = 0;
const engines: Engine[] = [];
afterEach(async () => {
  await Promise.all(engines.splice(0).map((e) => e.close()));
});

describe('the park schedule', () => {
  const policy: ParkPolicy = {
    parkAfterMs: 1_000,
    parkBackoffMs: 1_000,
    maxParkBackoffMs: 300_000,
  };
  const now = 1_800_000_000_000;
  const deps = { clock: { now: () => now, sleep: () => Promise.resolve() }, random: () => 0.5 };
  const outage = new LlmUnavailableError('down', [], undefined);

  it('doubles its ceiling with each park, up to the cap, with full jitter (seeded here at 0.5)', () => {
    const waits = Array.from({ length: 11 }, (_, parks) =>
      curableWait(deps, policy, parks, outage),
    );
    expect(waits).toEqual([
      500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 150_000, 150_000,
    ]);
  });

  it("a provider's retry-after wins over a shorter backoff, and a shorter one does not shorten it", () => {
    const asked = new LlmUnavailableError('busy', [], 45_000);
    expect(curableWait(deps, policy, 0, asked)).toBe(45_000);
    expect(curableWait(deps, policy, 9, new LlmUnavailableError('busy', [], 5_000))).toBe(150_000);
  });

  it('every tier cooling down: the wait lasts at least until the first may be tried again', () => {
    const cooling = new LlmUnavailableError('open', [], 2_000, now + 70_000);
    expect(curableWait(deps, policy, 0, cooling)).toBe(70_000);
  });
});

describe('a workflow that refuses the offline tier', () => {
  let fake: FakeOpenAI;
  beforeEach(async () => {
    fake = await startFakeOpenAI();
    fake.otherwise(() => ({ status: 503, error: { message: 'down', type: 'server_error' } }));
  });
  afterEach(() => fake.close());

  function open() {
    const engine = openEngine({
      db: join(dir, `p${++n}.db`),
      llm: (states) =>
        createRouter({
          tiers: [
            {
              name: 'gpt',
              provider: openaiProvider({ apiKey: 'k', baseURL: fake.url, model: 'g' }),
            },
            { name: 'offline', provider: degradedProvider(), degraded: true },
          ],
          clock: { now: () => Date.now(), sleep: () => Promise.resolve() },
          states,
        }),
    });
    engines.push(engine);
    return engine;
  }

  const ask = (degraded: boolean | undefined) =>
    workflow<{ text?: string }>(`ask-${String(degraded)}`, {
      version: 1,
      maxWait: '1ms',
      ...(degraded === undefined ? {} : { degraded }),
    }).step('ask', async (state, ctx) => {
      const res = await ctx.llm({
        messages: [{ role: 'user', content: 'Keel resumes interrupted runs from checkpoints.' }],
        maxTokens: 64,
      });
      state.text = `${res.tier}:${res.text}`;
    });

  it('by default, the offline tier answers when every real tier is down', async () => {
    const result = await open().start(ask(undefined), {});
    expect(result.status).toBe('completed');
    expect((result.state as { text: string }).text).toBe(
      'offline:Keel resumes interrupted runs from checkpoints.',
    );
  });

  it('with degraded: false the call fails instead, and the run waits (here: past its 1 ms limit, dead-lettered)', async () => {
    const engine = open();
    const result = await engine.start(ask(false), {});
    expect(result.status).toBe('failed');
    expect(result.error?.code).toBe('LLM_UNAVAILABLE');
    const letter = await engine.deadLetter(result.id);
    expect([letter.step, letter.reason]).toEqual(['ask', 'wait_limit']);
    expect((await engine.get(result.id)).llmCalls[0]!.attempts.map((a) => a.tier)).not.toContain(
      'offline',
    );
  });
});

describe("a workflow's concurrency limit", () => {
  it('concurrency: 1 runs one at a time even with a worker of four', async () => {
    const spans: [number, number][] = [];
    const single = workflow<{ i: number }>('single-file', { version: 1, concurrency: 1 }).step(
      'work',
      async () => {
        const start = Date.now();
        await sleep(80);
        spans.push([start, Date.now()]);
      },
    );
    const engine = openEngine({ db: join(dir, `c${++n}.db`) }).register(single);
    engines.push(engine);
    for (let i = 0; i < 4; i++) await engine.enqueue(single, { i });
    const report = await engine.work({ concurrency: 4, untilIdle: true, pollMs: 20 });
    expect(report.completed).toBe(4);
    spans.sort((a, b) => a[0] - b[0]);
    for (let i = 1; i < spans.length; i++)
      expect(spans[i]![0]).toBeGreaterThanOrEqual(spans[i - 1]![1]);
  });

  it('a concurrency that is not a whole number of runs is refused with the workflow', () => {
    const bad = workflow<object>('bad-limit', { version: 1, concurrency: 0 }).step('s', () => {});
    expect(() => bad.validate()).toThrow(
      'workflow "bad-limit" has concurrency 0; it must be a whole number of runs, at least 1.',
    );
  });
});
