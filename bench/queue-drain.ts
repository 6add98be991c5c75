/**
 * Queue drain rate: runs of a one-step no-op workflow enqueued, then drained by a worker
 * (`engine.work({ untilIdle: true })`), on a SQLite file; runs per second, median and min-max over
 * repetitions. With `--workers 2`, two engines (two connections) drain the same database at once.
 *
 *   npx tsx bench/queue-drain.ts [--runs 2000] [--reps 3] [--concurrency 8] [--workers 1]
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { openEngine, workflow } from '../adapters/index.ts';

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '2000' },
    reps: { type: 'string', default: '3' },
    concurrency: { type: 'string', default: '8' },
    workers: { type: 'string', default: '1' },
  },
});
const runs = Number(values.runs);
const reps = Number(values.reps);
const concurrency = Number(values.concurrency);
const workers = Number(values.workers);
const dir = mkdtempSync(join(tmpdir(), 'keel-drain-'));

const noop = workflow<{ n: number }>('drain-noop', { version: 1 }).step('only', (state) => {
  state.n += 1;
});

async function repetition(rep: number): Promise<{ enqueuePerS: number; drainPerS: number }> {
  const db = join(dir, `drain-${rep}.db`);
  const engines = Array.from({ length: workers }, () =>
    openEngine({ db, llm: () => Promise.reject(new Error('no LLM here')) }).register(noop),
  );
  const first = engines[0]!;
  let started = process.hrtime.bigint();
  for (let i = 0; i < runs; i++) await first.enqueue(noop, { n: i });
  const enqueueS = Number(process.hrtime.bigint() - started) / 1e9;
  started = process.hrtime.bigint();
  const reports = await Promise.all(
    engines.map((e) => e.work({ concurrency, untilIdle: true, pollMs: 50 })),
  );
  const drainS = Number(process.hrtime.bigint() - started) / 1e9;
  const completed = reports.reduce((sum, r) => sum + r.completed, 0);
  if (completed !== runs) throw new Error(`drained ${completed} of ${runs} runs`);
  for (const e of engines) await e.close();
  return { enqueuePerS: runs / enqueueS, drainPerS: runs / drainS };
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const fmt = (xs: number[]) =>
  `${median(xs).toFixed(0)} /s (${Math.min(...xs).toFixed(0)}-${Math.max(...xs).toFixed(0)})`;

const enqueue: number[] = [];
const drain: number[] = [];
for (let rep = 0; rep < reps; rep++) {
  const r = await repetition(rep);
  enqueue.push(r.enqueuePerS);
  drain.push(r.drainPerS);
}
console.log(
  `Queue: ${runs} one-step no-op runs, ${workers} worker(s) of concurrency ${concurrency}, ${reps} repetitions (median, min-max)`,
);
console.log(`  enqueued  ${fmt(enqueue)}`);
console.log(`  drained   ${fmt(drain)}`);
rmSync(dir, { recursive: true, force: true });
