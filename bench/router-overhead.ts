/**
 * The LLM router's own cost per call: the same request to the same loopback fake OpenAI server,
 * once through the `openai` SDK directly and once through the router (translation, policy, and
 * tier state read from a SQLite database as `ctx.llm` does), alternating batches, several
 * repetitions. Also the added latency per call while the primary is hard-down (connection
 * refused) with its breaker open: the router should go straight to the secondary.
 *
 *   npx tsx bench/router-overhead.ts [--calls 500] [--reps 7]
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import OpenAI from 'openai';
import { openSqliteStore } from '../adapters/sqlite/store.ts';
import { openaiProvider } from '../adapters/llm/openai.ts';
import { createRouter } from '../engine/llm/router.ts';
import { systemClock } from '../engine/time.ts';
import { startFakeOpenAI } from '../tests/support/fake-openai.ts';

const { values } = parseArgs({
  options: {
    calls: { type: 'string', default: '500' },
    reps: { type: 'string', default: '7' },
  },
});
const calls = Number(values.calls);
const reps = Number(values.reps);
const KEY = 'sk-bench-not-a-real-key';
const dir = mkdtempSync(join(tmpdir(), 'keel-router-bench-'));

const fake = await startFakeOpenAI();
const store = openSqliteStore(join(dir, 'router.db'));
const client = new OpenAI({ apiKey: KEY, baseURL: fake.url, maxRetries: 0 });
const provider = () => openaiProvider({ apiKey: KEY, baseURL: fake.url, model: 'gpt-bench' });

const router = createRouter({
  tiers: [{ name: 'primary', provider: provider() }],
  clock: systemClock,
  states: store,
});
/** The same, sending plain calls whole instead of as streams (no silence timeouts then). */
const plainRouter = createRouter({
  tiers: [{ name: 'primary', provider: provider() }],
  clock: systemClock,
  states: store,
  streamPlainCalls: false,
});
/** 127.0.0.1:9 refuses connections: a provider that is hard-down. */
const downRouter = createRouter({
  tiers: [
    {
      name: 'down',
      provider: openaiProvider({ apiKey: KEY, baseURL: 'http://127.0.0.1:9/v1', model: 'x' }),
    },
    { name: 'secondary', provider: provider() },
  ],
  clock: systemClock,
  states: store,
  breaker: { failureThreshold: 1, cooldownMs: 3_600_000 },
  backoffMs: 0,
});

const request = { messages: [{ role: 'user' as const, content: 'ping' }], maxTokens: 8 };

const directCall = () =>
  client.chat.completions.create({
    model: 'gpt-bench',
    messages: [{ role: 'user', content: 'ping' }],
    max_completion_tokens: 8,
  });

/** Microseconds one call takes. */
async function timed(call: () => Promise<unknown>): Promise<number> {
  const started = process.hrtime.bigint();
  await call();
  return Number(process.hrtime.bigint() - started) / 1000;
}

/**
 * One repetition: the three ways interleaved call by call, so that load on the machine falls on
 * all of them alike; the median call of each.
 */
async function repetition(): Promise<[number, number, number, number]> {
  const d: number[] = [];
  const r: number[] = [];
  const p: number[] = [];
  const down: number[] = [];
  for (let i = 0; i < calls; i++) {
    d.push(await timed(directCall));
    r.push(await timed(() => router.complete(request)));
    p.push(await timed(() => plainRouter.complete(request)));
    down.push(await timed(() => downRouter.complete(request)));
  }
  fake.requests.length = 0;
  return [median(d), median(r), median(p), median(down)];
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const fmt = (xs: number[]) =>
  `${median(xs).toFixed(1)} µs (${Math.min(...xs).toFixed(1)}–${Math.max(...xs).toFixed(1)})`;

// Warm up: connections, JIT, prepared statements; and open the down tier's breaker.
for (let i = 0; i < 50; i++) {
  await directCall();
  await router.complete(request);
  await plainRouter.complete(request);
}
await downRouter.complete(request);
if (downRouter.breakers().down?.state !== 'open') throw new Error('the down tier should be open');

const directUs: number[] = [];
const routerUs: number[] = [];
const plainUs: number[] = [];
const downUs: number[] = [];
for (let rep = 0; rep < reps; rep++) {
  const [d, r, p, down] = await repetition();
  directUs.push(d);
  routerUs.push(r);
  plainUs.push(p);
  downUs.push(down);
}
const overhead = directUs.map((d, i) => routerUs[i]! - d);
const plainOverhead = directUs.map((d, i) => plainUs[i]! - d);
const downAdded = directUs.map((d, i) => downUs[i]! - d);
console.log(`LLM router: ${calls} calls per repetition, ${reps} repetitions; median call of each`);
console.log(`repetition, then median and min–max over repetitions`);
console.log(`  SDK directly                       ${fmt(directUs)}`);
console.log(`  through the router                 ${fmt(routerUs)}`);
console.log(`  router overhead per call           ${fmt(overhead)}`);
console.log(`  through the router, sent whole     ${fmt(plainUs)}`);
console.log(`  overhead per call, sent whole      ${fmt(plainOverhead)}`);
console.log(`  primary down, breaker open         ${fmt(downUs)}`);
console.log(`  added per call while primary down  ${fmt(downAdded)}`);

await store.close();
await fake.close();
rmSync(dir, { recursive: true, force: true });
