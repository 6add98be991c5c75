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
  /** What the process passed to write(2), per step: WAL frames are whole pages. */
  bytesPerStep: number | null;
  /** keel only: the bytes of the rows its milestones stored, per step. */
  storedPerStep?: number;
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
    const db = fresh(dir, `keel-${sync}`);
    const engine = openEngine({ db, synchronous: sync });
    try {
      let status = '';
      const sample = await measure(steps, async () => {
        const result = await engine.start(wf, { i: 0, note: '', blob: 'x'.repeat(stateBytes) });
        status = `${result.status} ${result.state.i}`;
      });
      if (status !== `completed ${steps}`) throw new Error(`keel's run ended ${status}`);
      return { ...sample, storedPerStep: storedBytes(db) / steps };
    } finally {
      await engine.close();
    }
  };
}

/**
 * The bytes of the rows a run's milestones stored: every checkpoint after the first (the input's
 * snapshot) and every step record, counted as the text they hold plus their keys.
 */
function storedBytes(db: string): number {
  const sqlite = new Database(db, { readonly: true });
  try {
    const sum = (sql: string) => (sqlite.prepare(sql).get() as { b: number | null }).b ?? 0;
    return (
      sum(`SELECT sum(length(run_id) + length(step) + length(data) + 24) AS b FROM checkpoints
           WHERE seq > 1`) +
      sum(`SELECT sum(length(run_id) + length(name) + length(status) + ifnull(length(next), 0)
             + ifnull(length(error), 0) + 48) AS b FROM steps`)
    );
  } finally {
    sqlite.close();
  }
}

/**
 * The floor: one `BEGIN IMMEDIATE` transaction per step inserting one row of `rowBytes` into a
 * table keyed like keel's checkpoints, on a WAL database at the same `synchronous`.
 */
function bare(dir: string, steps: number, rowBytes: number, sync: Sync) {
  return async (): Promise<Sample> => {
    const sqlite = new Database(fresh(dir, `bare-${sync}`));
    try {
      sqlite.pragma('journal_mode = WAL');
      sqlite.pragma(`synchronous = ${sync}`);
      sqlite.exec(
        `CREATE TABLE t (run_id TEXT, seq INTEGER, data TEXT, PRIMARY KEY (run_id, seq))
         WITHOUT ROWID`,
      );
      const insert = sqlite.prepare('INSERT INTO t VALUES (?, ?, ?)');
      const payload = 'x'.repeat(rowBytes);
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

/** What keel's milestones store per step of this workflow: the bare side writes as much. */
async function keelRowBytes(dir: string, wf: Workflow<State>, steps: number): Promise<number> {
  const db = fresh(dir, 'keel-size');
  const engine = openEngine({ db });
  await engine.start(wf, { i: 0, note: '', blob: '' });
  await engine.close();
  return Math.round(storedBytes(db) / steps);
}

export async function stepSections(options: StepOptions): Promise<Row[]> {
  const { dir, reps, steps, peers } = options;
  const wf = linear(steps);
  const rowBytes = await keelRowBytes(dir, wf, steps);
  // Warm up: module loading, JIT, the first file in the folder.
  await keel(dir, wf, steps, 0, 'NORMAL')();
  await bare(dir, steps, rowBytes, 'NORMAL')();

  const rows: Row[] = [];
  for (const sync of ['NORMAL', 'FULL'] as const) {
    const contenders: Record<string, () => Promise<Sample>> = {
      [`bare (${sync})`]: bare(dir, steps, rowBytes, sync),
      [`keel (${sync})`]: keel(dir, wf, steps, 0, sync),
    };
    if (sync === 'NORMAL') for (const p of peers) contenders[p.name] = peer(dir, p, steps, 0);
    const results = await alternate(reps, contenders);
    rows.push(
      ...table(
        `1. ${steps.toLocaleString('en')} no-op steps`,
        rowBytes,
        results,
        `bare (${sync})`,
        (r) => withGoal(r, '≤ 1.3x floor', (x) => x.ratio! <= 1.3),
      ),
    );
  }
  rows.push(...(await largeState(options, wf, rowBytes)));
  return rows;
}

/**
 * Rows for one comparison: time per step against the floor, bytes the process wrote per step, and
 * for keel the bytes its rows hold per step. `goal` marks keel's time row.
 */
function table(
  section: string,
  rowBytes: number,
  results: Record<string, Sample[]>,
  floor: string,
  goal?: (r: Row) => Row,
  storedGoal?: (r: Row) => Row,
): Row[] {
  const reference = { subject: floor, samples: results[floor]!.map((s) => s.usPerStep) };
  const floorNote =
    `The floor: one BEGIN IMMEDIATE transaction per step inserting one row of ${rowBytes} B ` +
    "(what keel's milestone stores for a step) into a WITHOUT ROWID table on a WAL database " +
    'at the same synchronous setting.';
  const rows: Row[] = [];
  for (const [subject, samples] of Object.entries(results)) {
    const isKeel = subject.startsWith('keel');
    const time = row(
      {
        section,
        subject,
        metric: 'time per step',
        unit: 'µs',
        samples: samples.map((s) => s.usPerStep),
      },
      subject === floor ? undefined : reference,
    );
    if (subject === floor) time.note = floorNote;
    rows.push(isKeel && goal ? goal(time) : time);
    const written = samples.map((s) => s.bytesPerStep);
    if (written.every((b) => b !== null)) {
      rows.push(
        row({
          section,
          subject,
          metric: 'written per step',
          unit: 'B',
          samples: written,
        }),
      );
    }
    if (isKeel) {
      const stored = row({
        section,
        subject,
        metric: 'stored in rows per step',
        unit: 'B',
        samples: samples.map((s) => s.storedPerStep!),
      });
      rows.push(storedGoal ? storedGoal(stored) : stored);
    }
  }
  return rows;
}

/** Section 2: the same workflow carrying a 100 KB string the steps never touch. */
async function largeState(options: StepOptions, wf: Workflow<State>, rowBytes: number) {
  const { dir, reps, steps, peers, peerLargeSteps } = options;
  const stateBytes = 100_000;
  const contenders: Record<string, () => Promise<Sample>> = {
    'bare (NORMAL)': bare(dir, steps, rowBytes, 'NORMAL'),
    'keel (NORMAL)': keel(dir, wf, steps, stateBytes, 'NORMAL'),
  };
  for (const p of peers) {
    contenders[`${p.name}, ${peerLargeSteps} steps`] = peer(dir, p, peerLargeSteps, stateBytes);
  }
  const results = await alternate(reps, contenders);
  return table('2. 100 KB state', rowBytes, results, 'bare (NORMAL)', undefined, (r) =>
    withGoal(r, '≤ 2 KB', (x) => x.median <= 2048),
  );
}
