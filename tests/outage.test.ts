/**
 * A twenty-minute outage of every LLM tier, under a fake clock: 200 queued runs park, none is
 * dead-lettered, the providers see only the breakers' probes while they are down, and every run
 * completes once they recover, with its effect applied once. The real SDKs talk to the fake
 * servers on 127.0.0.1; only time is simulated, so the test takes seconds.
 */
import { join } from 'node:path';
import { afterEach, beforeEach, expect, it } from 'vitest';
import { openEngine, workflow, type Engine, type RunEvent } from '../adapters/index.ts';
import { anthropicProvider } from '../adapters/llm/anthropic.ts';
import { openaiProvider } from '../adapters/llm/openai.ts';
import { createRouter } from '../engine/llm/router.ts';
import type { Clock } from '../engine/time.ts';
import { startFakeAnthropic, type FakeAnthropic } from './support/fake-anthropic.ts';
import { startFakeOpenAI, type FakeOpenAI } from './support/fake-openai.ts';
import { tempDir } from './support/index.ts';

const START = Date.parse('2026-12-01T00:00:00Z');
const OUTAGE_MS = 20 * 60_000;
const RUNS = 200;

/**
 * Simulated time: a sleep waits for the clock to reach its deadline, and the clock jumps to the
 * earliest deadline whenever the process has had a few real milliseconds with nothing else to do.
 */
function simulatedClock(): Clock & { stop(): void } {
  let t = START;
  const sleepers: { at: number; wake: () => void }[] = [];
  const driver = setInterval(() => {
    if (sleepers.length === 0) return;
    sleepers.sort((a, b) => a.at - b.at);
    t = Math.max(t, sleepers[0]!.at);
    for (const s of sleepers.filter((x) => x.at <= t)) {
      sleepers.splice(sleepers.indexOf(s), 1);
      s.wake();
    }
  }, 3);
  return {
    now: () => t,
    sleep: (ms, signal) =>
      new Promise<void>((resolve, reject) => {
        if (signal?.aborted) return reject(signal.reason as Error);
        const sleeper = {
          at: t + ms,
          wake: () => {
            signal?.removeEventListener('abort', onAbort);
            resolve();
          },
        };
        const onAbort = () => {
          sleepers.splice(sleepers.indexOf(sleeper), 1);
          reject(signal?.reason as Error);
        };
        signal?.addEventListener('abort', onAbort, { once: true });
        sleepers.push(sleeper);
      }),
    stop: () => clearInterval(driver),
  };
}

let claude: FakeAnthropic;
let gpt: FakeOpenAI;
let engine: Engine | undefined;

beforeEach(async () => {
  [claude, gpt] = await Promise.all([startFakeAnthropic(), startFakeOpenAI()]);
});
afterEach(async () => {
  await engine?.close();
  await Promise.all([claude.close(), gpt.close()]);
});

it('200 queued runs wait out a 20-minute outage of every tier and all complete after it, each effect once', async () => {
  const clock = simulatedClock();
  const down = () => clock.now() < START + OUTAGE_MS;
  /** Simulated arrival time of each request the providers received. */
  const arrivals: number[] = [];
  claude.otherwise(() => {
    arrivals.push(clock.now());
    return down() ? { status: 503 } : { content: [{ type: 'text', text: 'summary from claude' }] };
  });
  gpt.otherwise(() => {
    arrivals.push(clock.now());
    return down()
      ? { status: 503, error: { message: 'down', type: 'server_error' } }
      : { text: 'summary from gpt' };
  });
  const sink = new Map<string, number>();
  const events: RunEvent[] = [];
  let seed = 42;
  const random = () => {
    seed = (seed * 1_103_515_245 + 12_345) % 2_147_483_648;
    return seed / 2_147_483_648;
  };

  type Job = { topic: string; summary?: string };
  const job = workflow<Job>('outage-job', { version: 1 })
    .step('write', async (state, ctx) => {
      const res = await ctx.llm({
        messages: [{ role: 'user', content: `Summarize ${state.topic}` }],
        maxTokens: 32,
      });
      state.summary = res.text;
    })
    .effect('publish', {
      key: (state) => `publish:${state.topic}`,
      run: (state, { key }) => {
        sink.set(key, (sink.get(key) ?? 0) + 1);
        return { published: state.topic };
      },
    });

  const dir = tempDir('keel-outage-');
  engine = openEngine({
    db: join(dir, 'outage.db'),
    clock,
    random,
    leaseMs: 3_600_000,
    onEvent: (e) => events.push(e),
    parkBackoffMs: 30_000,
    maxParkBackoffMs: 300_000,
    llm: (states) =>
      createRouter({
        tiers: [
          {
            name: 'claude',
            provider: anthropicProvider({ apiKey: 'k1', baseURL: claude.url, model: 'c' }),
          },
          { name: 'gpt', provider: openaiProvider({ apiKey: 'k2', baseURL: gpt.url, model: 'g' }) },
        ],
        clock,
        random,
        states,
        budget: 4,
        breaker: { failureThreshold: 3, cooldownMs: 30_000 },
      }),
  });
  engine.register(job);
  for (let i = 0; i < RUNS; i++) await engine.enqueue(job, { topic: `t${i}` });

  const report = await engine.work({ concurrency: 20, pollMs: 1_000, untilIdle: true });
  clock.stop();

  const { waiting, ...rest } = report;
  expect(rest).toEqual({ completed: RUNS, failed: 0, other: 0, errors: 0 });
  // Each time the worker carried a run on and the run parked again counts once.
  expect(waiting).toBe(events.filter((e) => e.type === 'run-parked').length);
  const runs = await engine.list({ workflow: 'outage-job' });
  expect(runs).toHaveLength(RUNS);
  expect(runs.filter((r) => r.status !== 'completed')).toEqual([]);
  expect(await engine.deadLetters()).toEqual([]);
  expect(sink.size).toBe(RUNS);
  expect([...sink.values()].every((n) => n === 1)).toBe(true);

  // Every run parked at least once, and none ran past its LLM call during the outage.
  const parked = new Set(events.filter((e) => e.type === 'run-parked').map((e) => e.runId));
  expect(parked.size).toBe(RUNS);
  const completedAt = events.filter((e) => e.type === 'run-ended' && e.status === 'completed');
  expect(completedAt).toHaveLength(RUNS);
  expect(clock.now()).toBeGreaterThanOrEqual(START + OUTAGE_MS);

  // While the providers were down they saw the first failures that opened the breakers, then
  // only one probe per tier per cooldown: 20 minutes / 30 s = 40 per tier, not 200 runs' retries.
  const duringOutage = arrivals.filter((t) => t < START + OUTAGE_MS).length;
  expect(duringOutage).toBeGreaterThan(0);
  expect(duringOutage).toBeLessThanOrEqual(2 * (OUTAGE_MS / 30_000 + 3) + 20);
});
