/**
 * Section 6: memory. Peak resident set size of a worker process that enqueues 10,000 runs and
 * drains them, and of one that runs a workflow whose state is 10 MB, next to a process that only
 * opens the engine.
 */
import { join } from 'node:path';
import { runChild } from '../children.ts';
import { alternate, row, type Row } from '../lib.ts';

const MB = 1024 * 1024;

export async function memorySection(dir: string, reps: number, runs: number, stateMb: number) {
  let files = 0;
  const peak = async (args: string[]) =>
    ((await runChild([args[0]!, join(dir, `memory-${++files}.db`), ...args.slice(1)]))
      .peakRss as number) / MB;
  const results = await alternate(reps, {
    baseline: () => peak(['baseline']),
    queue: () => peak(['queue-memory', String(runs)]),
    state: () => peak(['state-memory', String(stateMb)]),
  });
  const section = '6. memory';
  const rows: Row[] = [
    row({
      section,
      subject: 'keel, engine open, nothing else',
      metric: 'peak RSS',
      unit: 'MB',
      samples: results.baseline,
    }),
    row({
      section,
      subject: `keel, ${runs.toLocaleString('en')} runs enqueued and drained`,
      metric: 'peak RSS',
      unit: 'MB',
      samples: results.queue,
    }),
    row({
      section,
      subject: `keel, a run with a ${stateMb} MB state`,
      metric: 'peak RSS',
      unit: 'MB',
      samples: results.state,
    }),
  ];
  return rows;
}
