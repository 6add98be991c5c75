/**
 * Section 5: the queue. Runs of a one-step no-op workflow are enqueued, then drained by worker
 * processes (one, then two on the same database) working until idle. Measured: runs per second
 * from the moment the workers are told to go until the last one reports.
 */
import { join } from 'node:path';
import { openEngine } from '../../adapters/index.ts';
import { startChild } from '../children.ts';
import { noop } from '../workflows.ts';
import { alternate, row, withGoal, type Row } from '../lib.ts';

async function drain(db: string, runs: number, workers: number, concurrency: number) {
  const engine = openEngine({ db }).register(noop);
  for (let i = 0; i < runs; i++) await engine.enqueue(noop, { n: i });
  await engine.close();
  const children = await Promise.all(
    Array.from({ length: workers }, () => startChild(['drain', db, String(concurrency)])),
  );
  for (const child of children) await child.next();
  const started = process.hrtime.bigint();
  for (const child of children) child.process.stdin!.end('go\n');
  const reports = await Promise.all(children.map((child) => child.next()));
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  await Promise.all(children.map((child) => child.exited));
  const completed = reports.reduce((sum, r) => sum + (r.completed as number), 0);
  if (completed !== runs) throw new Error(`${workers} worker(s) drained ${completed} of ${runs}`);
  return runs / seconds;
}

export async function queueSection(dir: string, reps: number, runs: number, concurrency: number) {
  let files = 0;
  const results = await alternate(reps, {
    one: () => drain(join(dir, `queue-${++files}.db`), runs, 1, concurrency),
    two: () => drain(join(dir, `queue-${++files}.db`), runs, 2, concurrency),
  });
  const rows: Row[] = [];
  for (const [name, workers] of [
    ['one', 1],
    ['two', 2],
  ] as const) {
    const r = row({
      section: '5. queue',
      subject:
        `keel, ${workers} worker process${workers > 1 ? 'es' : ''} ` +
        `(concurrency ${concurrency}), ${runs.toLocaleString('en')} runs`,
      metric: 'runs drained per second',
      unit: 'runs/s',
      samples: results[name],
    });
    rows.push(withGoal(r, '≥ 5,000', (x) => x.median >= 5000));
  }
  return rows;
}
