/**
 * Per-step overhead: a linear workflow of no-op steps (each changes one small field) against a bare
 * better-sqlite3 WAL transaction inserting a row of the same size, both at the same `synchronous`
 * setting, on files in the same folder, alternating, several repetitions.
 *
 *   npx tsx bench/step-overhead.ts [--steps 1000] [--reps 5] [--sync NORMAL|FULL]
 */
import Database from 'better-sqlite3';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { openEngine, workflow } from '../adapters/index.ts';

const { values } = parseArgs({
  options: {
    steps: { type: 'string', default: '1000' },
    reps: { type: 'string', default: '5' },
    sync: { type: 'string', default: 'NORMAL' },
  },
});
const steps = Number(values.steps);
const reps = Number(values.reps);
const sync = values.sync === 'FULL' ? 'FULL' : 'NORMAL';
const dir = mkdtempSync(join(tmpdir(), 'keel-bench-'));

type S = { i: number; note: string };
let wf = workflow<S>('bench', { version: 1, maxSteps: steps });
for (let i = 0; i < steps; i++) {
  wf = wf.step(`s${i}`, (state) => {
    state.i += 1;
    state.note = `step ${state.i}`;
  });
}

async function keelRun(rep: number): Promise<{ usPerStep: number; bytesPerStep: number }> {
  const db = join(dir, `keel-${rep}.db`);
  const engine = openEngine({ db, synchronous: sync });
  const started = process.hrtime.bigint();
  const result = await engine.start(wf, { i: 0, note: '' });
  const elapsed = Number(process.hrtime.bigint() - started) / 1000;
  if (result.status !== 'completed') throw new Error(`bench run ${result.status}`);
  const store = (engine as unknown as { deps: { store: { sqlite: Database.Database } } }).deps
    .store;
  const bytes = store.sqlite
    .prepare('SELECT sum(length(data)) AS b FROM checkpoints WHERE kind = ?')
    .get('patch') as { b: number };
  await engine.close();
  return { usPerStep: elapsed / steps, bytesPerStep: bytes.b / steps };
}

function bareRun(rep: number, rowBytes: number): number {
  const sqlite = new Database(join(dir, `bare-${rep}.db`));
  sqlite.pragma('journal_mode = WAL');
  sqlite.pragma(`synchronous = ${sync}`);
  sqlite.exec('CREATE TABLE t (run_id TEXT, seq INTEGER, data TEXT, PRIMARY KEY (run_id, seq))');
  const insert = sqlite.prepare('INSERT INTO t VALUES (?, ?, ?)');
  const tx = sqlite.transaction((seq: number) => insert.run('run', seq, 'x'.repeat(rowBytes)));
  const started = process.hrtime.bigint();
  for (let i = 0; i < steps; i++) tx.immediate(i);
  const elapsed = Number(process.hrtime.bigint() - started) / 1000;
  sqlite.close();
  return elapsed / steps;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const keelTimes: number[] = [];
const bareTimes: number[] = [];
let rowBytes = 200;
await keelRun(-1); // warm-up: module loading, JIT
for (let rep = 0; rep < reps; rep++) {
  const k = await keelRun(rep);
  keelTimes.push(k.usPerStep);
  // the bare side writes what keel's step milestone writes: the patch plus the step record
  rowBytes = Math.round(k.bytesPerStep) + 120;
  bareTimes.push(bareRun(rep, rowBytes));
}
rmSync(dir, { recursive: true, force: true });
const fmt = (xs: number[]) =>
  `median ${median(xs).toFixed(1)} µs (min ${Math.min(...xs).toFixed(1)}, max ${Math.max(...xs).toFixed(1)})`;
console.log(`synchronous=${sync}, ${steps} steps x ${reps} reps, ~${rowBytes} bytes per row`);
console.log(`keel step:        ${fmt(keelTimes)}`);
console.log(`bare transaction: ${fmt(bareTimes)}`);
console.log(`ratio:            ${(median(keelTimes) / median(bareTimes)).toFixed(2)}x`);
