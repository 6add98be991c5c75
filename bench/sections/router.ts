/**
 * Section 4: the LLM router's own cost per call. The same request to the same loopback fake OpenAI
 * server, through the `openai` SDK directly and through the router (translation, policy, tier
 * state read from SQLite as `ctx.llm` does), interleaved call by call; the median call of each
 * repetition. Also the latency a call gains while the primary is hard-down (connection refused)
 * and its breaker open: the router should go straight to the secondary.
 */
import { join } from 'node:path';
import OpenAI from 'openai';
import { openaiProvider } from '../../adapters/llm/openai.ts';
import { openSqliteStore } from '../../adapters/sqlite/store.ts';
import { createRouter } from '../../engine/llm/router.ts';
import { systemClock } from '../../engine/time.ts';
import { startFakeOpenAI } from '../../tests/support/fake-openai.ts';
import { row, stats, usSince, withGoal, type Row } from '../lib.ts';

const KEY = 'sk-bench-not-a-real-key';

export async function routerSection(dir: string, reps: number, calls: number): Promise<Row[]> {
  const fake = await startFakeOpenAI();
  const store = openSqliteStore(join(dir, 'router.db'));
  try {
    const client = new OpenAI({ apiKey: KEY, baseURL: fake.url, maxRetries: 0 });
    const provider = () => openaiProvider({ apiKey: KEY, baseURL: fake.url, model: 'gpt-bench' });
    const common = { clock: systemClock, states: store };
    const streamed = createRouter({
      ...common,
      tiers: [{ name: 'primary', provider: provider() }],
    });
    const whole = createRouter({
      ...common,
      tiers: [{ name: 'primary', provider: provider() }],
      streamPlainCalls: false,
    });
    /** 127.0.0.1:9 refuses connections: a provider that is hard-down. */
    const down = createRouter({
      ...common,
      tiers: [
        {
          name: 'down',
          provider: openaiProvider({ apiKey: KEY, baseURL: 'http://127.0.0.1:9/v1', model: 'x' }),
        },
        { name: 'secondary', provider: provider() },
      ],
      breaker: { failureThreshold: 1, cooldownMs: 3_600_000 },
      backoffMs: 0,
      streamPlainCalls: false,
    });
    const request = { messages: [{ role: 'user' as const, content: 'ping' }], maxTokens: 8 };
    const ways = {
      direct: () =>
        client.chat.completions.create({
          model: 'gpt-bench',
          messages: [{ role: 'user', content: 'ping' }],
          max_completion_tokens: 8,
        }),
      whole: () => whole.complete(request),
      streamed: () => streamed.complete(request),
      down: () => down.complete(request),
    };
    // Warm up: connections, JIT, prepared statements; and open the down tier's breaker.
    for (let i = 0; i < 50; i++) for (const call of Object.values(ways)) await call();
    if (down.breakers().down?.state !== 'open') throw new Error('the down tier should be open');

    const medians = {
      direct: [] as number[],
      whole: [] as number[],
      streamed: [] as number[],
      down: [] as number[],
    };
    for (let rep = 0; rep < reps; rep++) {
      const times = {
        direct: [] as number[],
        whole: [] as number[],
        streamed: [] as number[],
        down: [] as number[],
      };
      for (let i = 0; i < calls; i++) {
        for (const [name, call] of Object.entries(ways) as [
          keyof typeof ways,
          () => Promise<unknown>,
        ][]) {
          const started = process.hrtime.bigint();
          await call();
          times[name].push(usSince(started));
        }
      }
      for (const name of Object.keys(times) as (keyof typeof times)[])
        medians[name].push(stats(times[name]).median);
      fake.requests.length = 0;
    }
    const section = '4. LLM router';
    const minus = (xs: number[]) => xs.map((x, i) => x - medians.direct[i]!);
    const goal = (r: Row) => withGoal(r, '≤ 50 µs', (x) => x.median <= 50);
    return [
      row({
        section,
        subject: 'openai SDK directly, loopback fake',
        metric: 'time per call',
        unit: 'µs',
        samples: medians.direct,
      }),
      goal(
        row({
          section,
          subject: 'router, sent whole like the direct call',
          metric: 'added per call',
          unit: 'µs',
          samples: minus(medians.whole),
        }),
      ),
      row({
        section,
        subject: 'router, sent as a stream (the default)',
        metric: 'added per call',
        unit: 'µs',
        samples: minus(medians.streamed),
      }),
      row({
        section,
        subject: 'router, primary hard-down, breaker open',
        metric: 'added per call',
        unit: 'µs',
        samples: minus(medians.down),
      }),
    ];
  } finally {
    await store.close();
    await fake.close();
  }
}
