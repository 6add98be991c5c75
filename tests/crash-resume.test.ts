/**
 * Real crashes: `keel run` in a child process killed with SIGKILL at named crash points (and once by
 * the test itself, at a seeded random moment), then `keel resume`. Each test compares what the outside
 * world saw (an append-only sink) and what the store holds (read with better-sqlite3, directly from
 * the database file, right after the kill) with an uninterrupted run of the same input.
 */
import Database from 'better-sqlite3';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import {
  FIXTURES,
  collect,
  keel,
  keelJson,
  killHard,
  lines,
  spawnKeel,
  tempDir,
  waitFor,
  type KeelResult,
} from './support/index.ts';
import { NODE_NAMES, type SinkLine, type ThirtyState } from './fixtures/thirty-steps.ts';
import type { Order, Payment } from './fixtures/charge-notify.ts';

const THIRTY = join(FIXTURES, 'thirty-steps.ts');
const CHARGE = join(FIXTURES, 'charge-notify.ts');
const INPUT: ThirtyState = { order: 'A-1', n: 0, trail: [], receipts: {}, loop: [], loopVisits: 0 };
const ALL_LOOP = [0, 1, 2, 3, 4, 5];

type ShownRun = {
  id: string;
  status: string;
  state: unknown;
  steps: { name: string; status: string }[];
  effects: { name: string; key: string; status: string; result: unknown }[];
};

type Sandbox = { dir: string; db: string; env: Record<string, string> };

function sandbox(root: string, name: string): Sandbox {
  const dir = join(root, name);
  mkdirSync(dir);
  return { dir, db: join(dir, 'keel.db'), env: { SINK_DIR: dir } };
}

function readDb<T>(file: string, read: (db: Database.Database) => T): T {
  const db = new Database(file, { readonly: true, fileMustExist: true });
  try {
    return read(db);
  } finally {
    db.close();
  }
}

function onlyRunId(file: string): string {
  const rows = readDb(file, (db) => db.prepare('SELECT id FROM runs').all() as { id: string }[]);
  expect(rows).toHaveLength(1);
  return rows[0]!.id;
}

type RunRow = { status: string; cursor: string | null; step_count: number; seq: number };
type EffectRow = {
  name: string;
  key: string;
  status: string;
  result: string | null;
  completion_order: number | null;
};

/** The rows a milestone can touch, as they stand in the file. */
function tables(file: string, id: string) {
  return readDb(file, (db) => ({
    run: db
      .prepare('SELECT status, cursor, step_count, seq FROM runs WHERE id = ?')
      .get(id) as RunRow,
    steps: db.prepare('SELECT name FROM steps WHERE run_id = ? ORDER BY idx, epoch').all(id) as {
      name: string;
    }[],
    checkpoints: db
      .prepare('SELECT seq, step FROM checkpoints WHERE run_id = ? ORDER BY seq')
      .all(id) as { seq: number; step: string | null }[],
    effects: db
      .prepare(
        'SELECT name, key, status, result, completion_order FROM effects WHERE run_id = ? ORDER BY started_at, key',
      )
      .all(id) as EffectRow[],
  }));
}

/** An effect as the ledger records it, without its timings and attempt counts. */
function ledgerEntry(e: ShownRun['effects'][number]) {
  return { name: e.name, key: e.key, status: e.status, result: e.result };
}

function sink(dir: string): SinkLine[] {
  return lines(join(dir, 'sink.log')).map((line) => JSON.parse(line) as SinkLine);
}

/** Effect calls grouped by effect name: the keys each call carried, in order. */
function callsByName(lines: SinkLine[]): Record<string, string[]> {
  const calls: Record<string, string[]> = {};
  for (const line of lines) if (line.kind === 'effect') (calls[line.name] ??= []).push(line.key);
  return calls;
}

function loopIterations(lines: SinkLine[]): number[] {
  return lines.flatMap((line) => (line.kind === 'loop' ? [line.i] : []));
}

function thirtyArgs(box: Sandbox): string[] {
  return ['--db', box.db, 'run', THIRTY, '--input', JSON.stringify(INPUT)];
}

async function runThirty(box: Sandbox, env: Record<string, string> = {}): Promise<KeelResult> {
  return keel(thirtyArgs(box), { env: { ...box.env, ...env } });
}

async function resumeAll(box: Sandbox, env: Record<string, string> = {}): Promise<KeelResult> {
  return keel(['--db', box.db, 'resume', '--all'], { env: { ...box.env, ...env } });
}

function expectKilled(result: KeelResult): void {
  expect({ code: result.code, signal: result.signal }).toEqual({ code: null, signal: 'SIGKILL' });
}

/** Seeded pseudo-random numbers in [0, 1) (mulberry32), so that a failing draw can be replayed. */
function seeded(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe.concurrent('a 30-step run killed with SIGKILL and resumed', () => {
  const root = tempDir('keel-crash-');
  let baseline: ShownRun;
  let baselineCalls: Record<string, string[]>;

  beforeAll(async () => {
    const box = sandbox(root, 'baseline');
    const done = await runThirty(box);
    expect(done.code, done.stderr).toBe(0);
    baseline = await keelJson<ShownRun>(['--db', box.db, 'show', onlyRunId(box.db)]);
    baselineCalls = callsByName(sink(box.dir));
  });

  it('runs uninterrupted once as the reference: 30 steps, 9 effects each called once', () => {
    expect(baseline.status).toBe('completed');
    expect(baseline.steps.map((s) => s.name)).toEqual(NODE_NAMES);
    expect(Object.keys(baselineCalls)).toEqual([
      'fx04',
      'note06',
      'fx11',
      'note13',
      'fx17',
      'note19',
      'fx23',
      'note25',
      'fx29',
    ]);
    for (const keys of Object.values(baselineCalls)) expect(keys).toHaveLength(1);
    expect((baseline.state as ThirtyState).loop).toEqual(ALL_LOOP);
    expect((baseline.state as ThirtyState).loopVisits).toBe(6);
  });

  /**
   * Kills the run, checks that it died there, resumes it, and compares with the uninterrupted run.
   * `twice` names the effects in flight at the kill, which must be called again with the same key.
   */
  async function crashAndResume(
    name: string,
    crashAt: string,
    expected: { twice?: string[]; loop?: number[] },
    atKill?: (db: string, id: string) => void,
  ): Promise<{ box: Sandbox; id: string; shown: ShownRun }> {
    const box = sandbox(root, name);
    expectKilled(await runThirty(box, { KEEL_CRASH_AT: crashAt }));
    const id = onlyRunId(box.db);
    expect(tables(box.db, id).run.status).toBe('running');
    atKill?.(box.db, id);
    const resumed = await resumeAll(box);
    expect(resumed.code, resumed.stderr).toBe(0);
    expect(resumed.stdout).toContain(`${id} (thirty-steps): completed`);
    const shown = await keelJson<ShownRun>(['--db', box.db, 'show', id]);
    expectSameAsBaseline(box, shown, expected);
    return { box, id, shown };
  }

  function expectSameAsBaseline(
    box: Sandbox,
    shown: ShownRun,
    expected: { twice?: string[]; loop?: number[] },
  ): void {
    expect(shown.status).toBe('completed');
    expect(shown.state).toEqual(baseline.state);
    expect(shown.steps.map((s) => s.name)).toEqual(NODE_NAMES);
    expect(shown.effects.map(ledgerEntry)).toEqual(baseline.effects.map(ledgerEntry));
    const want = Object.fromEntries(
      Object.entries(baselineCalls).map(([effect, keys]) => [
        effect,
        expected.twice?.includes(effect) ? [...keys, ...keys] : keys,
      ]),
    );
    const lines = sink(box.dir);
    expect(callsByName(lines)).toEqual(want);
    expect(loopIterations(lines)).toEqual(expected.loop ?? ALL_LOOP);
  }

  const cases: { fault: string; crashAt: string; twice?: string[]; loop?: number[] }[] = [
    {
      fault: 'a kill before an inline effect records its intent loses nothing and runs it once',
      crashAt: 'effect:before-intent@2',
    },
    {
      fault: 'a kill before the intent commit of an effect step runs that effect once',
      crashAt: 'effect-intent:before-commit@5',
    },
    {
      fault: 'an effect step applied but not recorded runs again with the same key only',
      crashAt: 'effect:after-run@1',
      twice: ['fx04'],
    },
    {
      fault: 'a ctx.effect applied but not recorded runs again with the same key only',
      crashAt: 'effect:after-run@4',
      twice: ['note13'],
    },
    {
      fault:
        'a ctx.effect recorded before its step committed is not sent again when the step re-runs',
      crashAt: 'effect-record:after-commit@2',
    },
    {
      fault: 'a kill between steps re-runs no step and no effect',
      crashAt: 'step:after-commit@7',
    },
    {
      fault: 'a kill before a ctx.checkpoint() commit redoes only the iteration it was committing',
      crashAt: 'checkpoint:before-commit@3',
      loop: [0, 1, 2, 2, 3, 4, 5],
    },
    {
      fault: 'a kill inside a ctx.checkpoint() commit redoes only the iteration it was committing',
      crashAt: 'checkpoint:inside-commit@5',
      loop: [0, 1, 2, 3, 4, 4, 5],
    },
  ];

  for (const c of cases) {
    it(`${c.fault} (${c.crashAt})`, async () => {
      const expected = {
        ...(c.twice ? { twice: c.twice } : {}),
        ...(c.loop ? { loop: c.loop } : {}),
      };
      await crashAndResume(c.crashAt.replace(/[:@]/g, '-'), c.crashAt, expected);
    });
  }

  it('a SIGKILL at a seeded random moment (not a crash point) resumes to the same end', async () => {
    const seed = Number(process.env.KEEL_TEST_SEED ?? 20_261_204);
    const delayMs = Math.floor(seeded(seed)() * 500);
    const box = sandbox(root, 'timed');
    const child = spawnKeel(thirtyArgs(box), { env: { ...box.env, STEP_DELAY_MS: '40' } });
    const exited = collect(child);
    await waitFor(() => sink(box.dir).length > 0, 20_000, 'the first effect');
    await new Promise((r) => setTimeout(r, delayMs));
    await killHard(child);
    expectKilled(await exited);

    const id = onlyRunId(box.db);
    const atKill = tables(box.db, id);
    expect(atKill.run.status, `seed ${seed}: the run ended before the kill`).toBe('running');
    const sinkAtKill = sink(box.dir);
    const recorded = new Set(atKill.effects.filter((e) => e.status === 'done').map((e) => e.key));
    // In flight: called, but the kill came before its result was recorded.
    const inFlight = Object.entries(callsByName(sinkAtKill))
      .filter(([, keys]) => !recorded.has(keys[0]!))
      .map(([effect]) => effect);
    expect(inFlight.length).toBeLessThanOrEqual(1);
    // Each loop iteration commits one checkpoint; the loop step's own milestone adds a seventh.
    const loopCheckpoints = atKill.checkpoints.filter((c) => c.step === 'loop09').length;
    const committedLoop = Math.min(loopCheckpoints, ALL_LOOP.length);

    const resumed = await resumeAll(box);
    expect(resumed.code, resumed.stderr).toBe(0);
    const shown = await keelJson<ShownRun>(['--db', box.db, 'show', id]);
    expectSameAsBaseline(box, shown, {
      twice: inFlight,
      loop: [...loopIterations(sinkAtKill), ...ALL_LOOP.slice(committedLoop)],
    });
  });

  it('a resume that is itself killed is resumed again, each in-flight effect re-sent with its key', async () => {
    const box = sandbox(root, 'twice-killed');
    expectKilled(await runThirty(box, { KEEL_CRASH_AT: 'effect:after-run@2' }));
    const id = onlyRunId(box.db);
    // The resume re-sends note06 (its first effect call), then fx11, then dies after note13.
    expectKilled(await resumeAll(box, { KEEL_CRASH_AT: 'effect:after-run@3' }));
    const between = tables(box.db, id);
    expect(between.run.status).toBe('running');
    expect(between.run.cursor).toBe('in13');
    expect(between.effects.map((e) => [e.name, e.status])).toEqual([
      ['fx04', 'done'],
      ['note06', 'done'],
      ['fx11', 'done'],
      ['note13', 'started'],
    ]);
    const resumed = await resumeAll(box);
    expect(resumed.code, resumed.stderr).toBe(0);
    const shown = await keelJson<ShownRun>(['--db', box.db, 'show', id]);
    expectSameAsBaseline(box, shown, { twice: ['note06', 'note13'] });
  });

  describe('C12: a milestone lands whole or not at all', () => {
    it('C12: a kill inside a step commit leaves no checkpoint, step record or cursor move of it', async () => {
      const { box, id } = await crashAndResume(
        'c12-step',
        'step:inside-commit@12',
        {},
        (db, runId) => {
          const at = tables(db, runId);
          expect(at.run).toMatchObject({ cursor: 's12', step_count: 11 });
          expect(at.run.seq).toBe(at.checkpoints.at(-1)!.seq);
          expect(at.steps.map((s) => s.name)).toEqual(NODE_NAMES.slice(0, 11));
          expect(at.checkpoints.filter((c) => c.step === 's12')).toEqual([]);
        },
      );
      const after = tables(box.db, id);
      expect(after.steps.filter((s) => s.name === 's12')).toHaveLength(1);
      expect(after.checkpoints.filter((c) => c.step === 's12')).toHaveLength(1);
      expect(after.checkpoints.map((c) => c.seq)).toEqual(
        Array.from({ length: after.run.seq }, (_, i) => i + 1),
      );
    });

    it("C12: a kill inside an effect step's commit leaves the effect started and no step record", async () => {
      const { box, id } = await crashAndResume(
        'c12-effect-step',
        'step:inside-commit@11',
        { twice: ['fx11'] },
        (db, runId) => {
          const at = tables(db, runId);
          expect(at.run).toMatchObject({ cursor: 'fx11', step_count: 10 });
          expect(at.steps.map((s) => s.name)).toEqual(NODE_NAMES.slice(0, 10));
          expect(at.effects.find((e) => e.name === 'fx11')).toMatchObject({
            status: 'started',
            result: null,
            completion_order: null,
          });
        },
      );
      const after = tables(box.db, id);
      expect(after.steps.filter((s) => s.name === 'fx11')).toHaveLength(1);
      const fx11 = after.effects.find((e) => e.name === 'fx11')!;
      expect(fx11).toMatchObject({ status: 'done', completion_order: 3 });
      expect(JSON.parse(fx11.result!)).toEqual({ receipt: `receipt:${fx11.key}` });
    });

    it("C12: a kill inside a ctx.effect's record commit leaves neither its result nor its checkpoint", async () => {
      const { box, id } = await crashAndResume(
        'c12-inline',
        'effect-record:inside-commit@2',
        { twice: ['note13'] },
        (db, runId) => {
          const at = tables(db, runId);
          expect(at.run).toMatchObject({ cursor: 'in13', step_count: 12 });
          expect(at.run.seq).toBe(at.checkpoints.at(-1)!.seq);
          expect(at.checkpoints.filter((c) => c.step === 'in13')).toEqual([]);
          expect(at.effects.find((e) => e.name === 'note13')).toMatchObject({
            status: 'started',
            result: null,
            completion_order: null,
          });
        },
      );
      const after = tables(box.db, id);
      // The effect's record (with the step's state so far), then the step's own milestone.
      expect(after.checkpoints.filter((c) => c.step === 'in13')).toHaveLength(2);
      expect(after.steps.filter((s) => s.name === 'in13')).toHaveLength(1);
      expect(after.effects.find((e) => e.name === 'note13')).toMatchObject({
        status: 'done',
        completion_order: 4,
      });
    });
  });
});

describe.concurrent('C01: a charge and its receipt are recorded together', () => {
  const root = tempDir('keel-c01-');
  const ORDER: Order = { order: 'O-1', amount: 4200 };
  const KEY = 'charge:O-1';

  function payments(dir: string): Payment[] {
    return lines(join(dir, 'payments.log')).map((l) => JSON.parse(l) as Payment);
  }
  function paymentCalls(dir: string): string[] {
    return lines(join(dir, 'payment-calls.log')).map((l) => (JSON.parse(l) as { key: string }).key);
  }
  function notified(dir: string): string[] {
    return lines(join(dir, 'notify.log')).map(
      (l) => (JSON.parse(l) as { receipt: string }).receipt,
    );
  }

  /** What the store says about charge at this moment, read straight from the file. */
  function chargeAsStored(file: string, id: string) {
    return readDb(file, (db) => ({
      cursor: (db.prepare('SELECT cursor FROM runs WHERE id = ?').get(id) as { cursor: string })
        .cursor,
      effect: db
        .prepare('SELECT status, result FROM effects WHERE run_id = ? AND key = ?')
        .get(id, KEY) as { status: string; result: string | null } | undefined,
    }));
  }

  type Boundary = {
    crashAt: string;
    /** The charge's ledger row and the run's cursor right after the kill. */
    atKill: { effect: 'none' | 'started' | 'done'; cursor: string };
    /** Calls the payment sink received before the kill. */
    callsAtKill: number;
  };

  const effectStep: Boundary[] = [
    {
      crashAt: 'effect-intent:before-commit',
      atKill: { effect: 'none', cursor: 'charge' },
      callsAtKill: 0,
    },
    {
      crashAt: 'effect-intent:inside-commit',
      atKill: { effect: 'none', cursor: 'charge' },
      callsAtKill: 0,
    },
    {
      crashAt: 'effect-intent:after-commit',
      atKill: { effect: 'started', cursor: 'charge' },
      callsAtKill: 0,
    },
    {
      crashAt: 'effect:after-run',
      atKill: { effect: 'started', cursor: 'charge' },
      callsAtKill: 1,
    },
    {
      crashAt: 'step:before-commit@1',
      atKill: { effect: 'started', cursor: 'charge' },
      callsAtKill: 1,
    },
    {
      crashAt: 'step:inside-commit@1',
      atKill: { effect: 'started', cursor: 'charge' },
      callsAtKill: 1,
    },
    {
      crashAt: 'step:after-commit@1',
      atKill: { effect: 'done', cursor: 'notify' },
      callsAtKill: 1,
    },
  ];

  // Only the boundaries this shape adds: its inline record commit, and a step commit after it.
  const inStep: Boundary[] = [
    {
      crashAt: 'effect-record:before-commit',
      atKill: { effect: 'started', cursor: 'charge' },
      callsAtKill: 1,
    },
    {
      crashAt: 'effect-record:inside-commit',
      atKill: { effect: 'started', cursor: 'charge' },
      callsAtKill: 1,
    },
    {
      crashAt: 'effect-record:after-commit',
      atKill: { effect: 'done', cursor: 'charge' },
      callsAtKill: 1,
    },
    {
      crashAt: 'step:inside-commit@1',
      atKill: { effect: 'done', cursor: 'charge' },
      callsAtKill: 1,
    },
  ];

  const variants = [
    { workflow: 'charge-notify', what: 'an effect step', boundaries: effectStep },
    { workflow: 'charge-in-step', what: 'ctx.effect in a step', boundaries: inStep },
  ];

  for (const { workflow, what, boundaries } of variants) {
    for (const b of boundaries) {
      it(`C01: a kill at ${b.crashAt} (charge as ${what}) never leaves a charge recorded without its receipt`, async () => {
        const box = sandbox(root, `${workflow}-${b.crashAt.replace(/[:@]/g, '-')}`);
        const start = [
          '--db',
          box.db,
          'run',
          CHARGE,
          '--workflow',
          workflow,
          '--input',
          JSON.stringify(ORDER),
        ];
        expectKilled(await keel(start, { env: { ...box.env, KEEL_CRASH_AT: b.crashAt } }));
        const id = onlyRunId(box.db);

        const stored = chargeAsStored(box.db, id);
        expect({ effect: stored.effect?.status ?? 'none', cursor: stored.cursor }).toEqual(
          b.atKill,
        );
        // The two ways the store could lie about a completed charge:
        expect(stored.effect?.status === 'done' && stored.effect.result === null).toBe(false);
        expect(stored.cursor !== 'charge' && stored.effect?.status !== 'done').toBe(false);
        expect(paymentCalls(box.dir)).toHaveLength(b.callsAtKill);
        if (stored.effect?.status === 'done') {
          expect(JSON.parse(stored.effect.result!)).toEqual({
            receipt: payments(box.dir)[0]!.receipt,
          });
        }

        const resumed = await keel(['--db', box.db, 'resume', '--all'], { env: box.env });
        expect(resumed.code, resumed.stderr).toBe(0);
        expect(resumed.stdout).toContain(`${id} (${workflow}): completed`);

        // One charge; a second call only when the first was applied but not recorded, with its key.
        const applied = payments(box.dir);
        expect(applied).toHaveLength(1);
        expect(applied[0]).toMatchObject({ key: KEY, amount: 4200 });
        const inFlight = b.callsAtKill === 1 && b.atKill.effect !== 'done';
        expect(paymentCalls(box.dir)).toEqual(inFlight ? [KEY, KEY] : [KEY]);
        // notify read the receipt the provider issued, from the store.
        const receipt = applied[0]!.receipt;
        expect(notified(box.dir)).toEqual([receipt]);
        const after = chargeAsStored(box.db, id);
        expect(after.cursor).toBeNull();
        expect(after.effect?.status).toBe('done');
        expect(JSON.parse(after.effect!.result!)).toEqual({ receipt });
      });
    }
  }
});
