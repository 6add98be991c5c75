/**
 * Sections 1 and 2: the cost of a checkpointed step. A linear workflow of no-op steps (each changes
 * one small field of the state), run by keel at `synchronous=NORMAL` and `FULL`, against a bare
 * better-sqlite3 WAL transaction writing as many bytes per step at the same setting (the floor no
 * durable engine on SQLite can go under) and against the peers, all on files in one folder.
 * With a 100 KB state, what matters is the bytes written per step: they should follow the size of
 * the change, not of the state.
 */
import Database from 'better-sqlite3';
import { join } from 'node:path';
import { openEngine, workflow, type Workflow } from '../../adapters/index.ts';
import { alternate, bytesWritten, row, usSince, withGoal, type Row } from '../lib.ts';
import type { Peer } from '../peers.ts';

type Sync = 'NORMAL' | 'FULL';
type State = { i: number; note: string; blob: string };
interface Sample {
  usPerStep: number;
  bytesPerStep: number | null;
}

export interface StepOptions {
  dir: string;
  reps: number;
  steps: number;
  /** Steps the peers run in the large-state case, where they are slow. */
  peerLargeSteps: number;
  peers: readonly Peer[];
}

const linear = (steps: number): Workflow<State> => {
  let wf = workflow<State>(`linear-${steps}`, { version: 1, maxSteps: steps });
  for (let i = 0; i < steps; i++) {
    wf = wf.step(`s${i}`, (state) => {
      state.i += 1;
      state.note = `step ${state.i}`;
    });
  }
  return wf;
};

/** Times `body` and counts the bytes the process wrote meanwhile, per step. */
async function measure(steps: number, body: () => Promise<void>): Promise<Sample> {
  const before = bytesWritten();
  const started = process.hrtime.bigint();
  await body();
  const us = usSince(started);
  const after = bytesWritten();
  return {
    usPerStep: us / steps,
    bytesPerStep: before === null || after === null ? null : (after - before) / steps,
  };
}

let files = 0;
const fresh = (dir: string, name: string) => join(dir, `${name}-${++files}.db`);

function keel(dir: string, wf: Workflow<State>, steps: number, stateBytes: number, sync: Sync) {
  return async (): Promise<Sample> => {
    const engine = openEngine({ db: fresh(dir, `keel-${sync}`), synchronous: sync });
    try {
      let status = '';
      const sample = await measure(steps, async () => {
        const result = await engine.start(wf, { i: 0, note: '', blob: 'x'.repeat(stateBytes) });
        status = `${result.status} ${result.state.i}`;
      });
      if (status !== `completed ${steps}`) throw new Error(`keel's run ended ${status}`);
      return sample;
    } finally {
      await engine.close();
    }
  };
}

/**
 * The floor: one `BEGIN IMMEDIATE` transaction per step inserting one row of `rowBytes` into a
 * table keyed like keel's checkpoints, on a WAL database at the same `synchronous`.
 */
function bare(dir: string, steps: number, rowBytes: () => number, sync: Sync) {
  return async (): Promise<Sample> => {
    const sqlite = new Database(fresh(dir, `bare-${sync}`));
    try {
      sqlite.pragma('journal_mode = WAL');
      sqlite.pragma(`synchronous = ${sync}`);
      sqlite.exec(
        'CREATE TABLE t (run_id TEXT, seq INTEGER, data TEXT, PRIMARY KEY (run_id, seq)) WITHOUT ROWID',
      );
      const insert = sqlite.prepare('INSERT INTO t VALUES (?, ?, ?)');
      const payload = 'x'.repeat(rowBytes());
      const tx = sqlite.transaction((seq: number) => insert.run('run', seq, payload));
      return await measure(steps, async () => {
        for (let i = 0; i < steps; i++) tx.immediate(i);
      });
    } finally {
      sqlite.close();
    }
  };
}

function peer(dir: string, p: Peer, steps: number, stateBytes: number) {
  return async (): Promise<Sample> => {
    const prepared = await p.prepareLinear({
      file: fresh(dir, p.name.replace(/\W+/g, '-')),
      steps,
      stateBytes,
      synchronous: 'NORMAL',
    });
    try {
      let ran = 0;
      const sample = await measure(steps, async () => {
        ran = (await prepared.run()).stepsRun;
      });
      if (ran !== steps) throw new Error(`${p.name} ran ${ran} of ${steps} steps`);
      return sample;
    } finally {
      await prepared.close();
    }
  };
}

/** What keel writes to its tables per step of this workflow: the bare side writes as much. */
function keelRowBytes(dir: string, wf: Workflow<State>, steps: number) {
  let bytes = 0;
  return {
    get: () => bytes,
    async measure() {
      const db = fresh(dir, 'keel-size');
      const engine = openEngine({ db });
      await engine.start(wf, { i: 0, note: '', blob: '' });
      await engine.close();
      const sqlite = new Database(db, { readonly: true });
      const sum = (sql: string) => (sqlite.prepare(sql).get() as { b: number }).b;
      bytes = Math.round(
        (sum(
          `SELECT sum(length(data) + length(step) + 16) AS b FROM checkpoints WHERE kind = 'patch'`,
        ) +
          sum(`SELECT sum(length(name) + length(status) + 40) AS b FROM steps`)) /
          steps,
      );
      sqlite.close();
    },
  };
}

export async function stepSections(options: StepOptions): Promise<Row[]> {
  const { dir, reps, steps, peers } = options;
  const wf = linear(steps);
  const size = keelRowBytes(dir, wf, steps);
  await size.measure();
  // Warm up: module loading, JIT, the first file in the folder.
  await keel(dir, wf, steps, 0, 'NORMAL')();
  await bare(dir, steps, size.get, 'NORMAL')();

  const rows: Row[] = [];
  for (const sync of ['NORMAL', 'FULL'] as const) {
    const contenders: Record<string, () => Promise<Sample>> = {
      bare: bare(dir, steps, size.get, sync),
      keel: keel(dir, wf, steps, 0, sync),
    };
    if (sync === 'NORMAL') for (const p of peers) contenders[p.name] = peer(dir, p, steps, 0);
    const results = await alternate(reps, contenders);
    const floor = {
      subject: `bare (${sync})`,
      samples: results.bare!.map((s) => s.usPerStep),
    };
    const section = `1. ${steps} no-op steps`;
    const subject = (name: string) =>
      name === 'bare'
        ? `bare better-sqlite3 transaction (${sync}, ${size.get()} B/step)`
        : name === 'keel'
          ? `keel (${sync})`
          : `${name} (${peers.find((p) => p.name === name)!.describe})`;
    for (const [name, samples] of Object.entries(results)) {
      const r = row(
        {
          section,
          subject: subject(name),
          metric: 'time per step',
          unit: 'µs',
          samples: samples.map((s) => s.usPerStep),
        },
        name === 'bare' ? undefined : floor,
      );
      rows.push(name === 'keel' ? withGoal(r, '≤ 1.3x floor', (x) => x.ratio! <= 1.3) : r);
      const written = samples.map((s) => s.bytesPerStep);
      if (written.every((b) => b !== null)) {
        rows.push(
          row({
            section,
            subject: subject(name),
            metric: 'written per step',
            unit: 'B',
            samples: written,
          }),
        );
      }
    }
  }
  rows.push(...(await largeState(options, wf, size.get)));
  return rows;
}

/** Section 2: the same workflow carrying a 100 KB string the steps never touch. */
async function largeState(
  options: StepOptions,
  wf: Workflow<State>,
  rowBytes: () => number,
): Promise<Row[]> {
  const { dir, reps, steps, peers, peerLargeSteps } = options;
  const stateBytes = 100_000;
  const contenders: Record<string, () => Promise<Sample>> = {
    bare: bare(dir, steps, rowBytes, 'NORMAL'),
    keel: keel(dir, wf, steps, stateBytes, 'NORMAL'),
  };
  for (const p of peers) contenders[p.name] = peer(dir, p, peerLargeSteps, stateBytes);
  const results = await alternate(reps, contenders);
  const section = '2. 100 KB state';
  const rows: Row[] = [];
  const floor = { subject: 'bare (NORMAL)', samples: results.bare!.map((s) => s.usPerStep) };
  for (const [name, samples] of Object.entries(results)) {
    const subject =
      name === 'bare'
        ? `bare better-sqlite3 transaction (NORMAL, ${rowBytes()} B/step)`
        : name === 'keel'
          ? `keel (NORMAL), ${steps} steps`
          : `${name}, ${peerLargeSteps} steps`;
    rows.push(
      row(
        {
          section,
          subject,
          metric: 'time per step',
          unit: 'µs',
          samples: samples.map((s) => s.usPerStep),
        },
        name === 'bare' ? undefined : floor,
      ),
    );
    const written = samples.map((s) => s.bytesPerStep);
    if (written.some((b) => b === null)) continue;
    const r = row({
      section,
      subject,
      metric: 'written per step',
      unit: 'B',
      samples: written as number[],
    });
    rows.push(name === 'keel' ? withGoal(r, '≤ 2 KB', (x) => x.median <= 2048) : r);
  }
  return rows;
}
