/**
 * State round-trips through real runs on SQLite: every value kind keel promises to keep, across a
 * SIGKILL and `keel resume` (C09), BigInt in every output (C11), refusals of what cannot be kept,
 * large states and the snapshot that keeps resuming cheap (C27).
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openEngine, openSqliteStore, workflow, type Engine, type RunView } from 'keel';
import { CHUNK, chunk, digest } from './fixtures/state-large.ts';
import { refusing, type RefuseAt, type RefuseKind } from './fixtures/state-refuse.ts';
import { BIG, type Kinds } from './fixtures/state-types.ts';
import { FIXTURES, keel, keelJson, lines, tempDir, type KeelResult } from './support/index.ts';

const TYPES = join(FIXTURES, 'state-types.ts');
const REFUSE = join(FIXTURES, 'state-refuse.ts');
const LARGE = join(FIXTURES, 'state-large.ts');
const MANY = join(FIXTURES, 'state-many.ts');
/** Daylight saving time starts there on 2024-03-10, the day after `set`'s date. */
const NEW_YORK = { TZ: 'America/New_York' };

async function onlyRunId(db: string): Promise<string> {
  const store = openSqliteStore(db);
  try {
    const runs = await store.listRuns();
    expect(runs).toHaveLength(1);
    return runs[0]!.id;
  } finally {
    await store.close();
  }
}

/** The run as another process reads it back from the database, state decoded. */
async function readRun(db: string, id: string): Promise<RunView> {
  const engine = openEngine({ db });
  try {
    return await engine.get(id);
  } finally {
    await engine.close();
  }
}

function expectCode(result: KeelResult, code: number): void {
  expect(result, `stdout:\n${result.stdout}\nstderr:\n${result.stderr}`).toMatchObject({ code });
}

function expectKilled(result: KeelResult): void {
  expect(result.signal, `stdout:\n${result.stdout}\nstderr:\n${result.stderr}`).toBe('SIGKILL');
}

/** What `set` writes, as it must read back: the exact types and values. */
function afterSet(label: string): Kinds {
  return {
    label,
    big: 2n ** 70n,
    when: new Date(Date.UTC(2024, 2, 9, 17, 0, 0)),
    scores: new Map([
      ['alpha', 1],
      ['beta', 2],
    ]),
    keyed: new Map<number | bigint | boolean | null, string>([
      [1, 'one'],
      [2n, 'two'],
      [true, 'yes'],
      [null, 'nothing'],
    ]),
    tags: new Set<string | number>(['x', 3]),
    holes: { present: 1, missing: undefined, list: [1, undefined, 3] },
    grid: [[[1, 2], []], [[3]]],
    odd: [NaN, Infinity, -Infinity, -0],
    dollar: { $: 'dollar', nested: { $: 2, $$: ['a', 'b'] } },
  };
}

describe('C09: values survive a SIGKILL and resume with their types', () => {
  const dir = tempDir('keel-state-types-');
  const label = 'c09';
  const input = JSON.stringify({ label });
  let uncrashed: Kinds;

  beforeAll(async () => {
    const db = join(dir, 'uncrashed.db');
    const run = await keel(['run', TYPES, '--input', input, '--db', db, '--no-progress'], {
      env: NEW_YORK,
    });
    expectCode(run, 0);
    uncrashed = (await readRun(db, await onlyRunId(db))).state as Kinds;
  });

  it('C09: an uncrashed run keeps every type and does date math in local time (23 h across the DST change)', () => {
    const { derived, report, ...values } = uncrashed;
    expect(values).toStrictEqual({
      ...afterSet(label),
      big: BIG + 1n,
      scores: new Map([
        ['alpha', 1],
        ['beta', 2],
        ['gamma', 3],
      ]),
      keyed: new Map<number | bigint | boolean | null, string>([
        [1, 'one'],
        [2n, 'two'],
        [null, 'nothing'],
        [4, 'four'],
      ]),
      tags: new Set<string | number>(['x', 3, 42]),
      holes: { present: 1, missing: undefined, list: [1, undefined, 3, undefined] },
      grid: [
        [[1, 2], []],
        [[3], [4, 5]],
      ],
      odd: [NaN, Infinity, -Infinity, -0, -0],
    });
    expect(derived).toStrictEqual({
      hoursToSameTimeTomorrow: 23,
      offsets: [300, 240],
      localHours: [12, 12],
      tomorrow: new Date(Date.UTC(2024, 2, 10, 16, 0, 0)),
      scoreSum: 3,
      keyedLookups: ['one', 'two', 'yes', 'nothing'],
      hasTags: [true, true, false],
      bigNext: 3n * 2n ** 70n + 1n,
      holes: [true, 3, true],
      gridPick: 2,
      odd: [true, true, true, true],
      dollar: 'dollar:2:ab',
    });
    expect(report).toStrictEqual({
      scores: [
        ['alpha', 1],
        ['beta', 2],
        ['gamma', 3],
      ],
      keys: ['number:1', 'bigint:2', 'object:null', 'number:4'],
      tags: ['x', 3, 42],
      big: '400000000000000000',
      weekLater: '2024-03-17T16:00:00.000Z',
      offsetsAfterWeek: 240,
      negativeZeros: 2,
      listKinds: ['number', 'undefined', 'number', 'undefined'],
    });
  });

  it.each([
    ['after the step that set them', 1, 'use'],
    ['after the step that changed them in place (patches)', 2, 'ledger'],
  ])(
    'C09: killed %s, resumed in New York: same types, same values, same next-step output',
    async (_when, nth, cursor) => {
      const db = join(dir, `crash-${nth}.db`);
      const sink = tempDir('keel-state-sink-');
      const env = { ...NEW_YORK, SINK_DIR: sink };
      const killed = await keel(['run', TYPES, '--input', input, '--db', db, '--no-progress'], {
        env: { ...env, KEEL_CRASH_AT: `step:after-commit@${nth}` },
      });
      expectKilled(killed);
      const id = await onlyRunId(db);

      const interrupted = await readRun(db, id);
      expect(interrupted.status).toBe('running');
      expect(interrupted.cursor).toBe(cursor);
      const stored = interrupted.state as Kinds;
      if (nth === 1) {
        expect(stored).toStrictEqual(afterSet(label));
      } else {
        const { report: _report, ...beforeReport } = uncrashed;
        expect(stored).toStrictEqual(beforeReport);
      }
      expect(stored.when).toBeInstanceOf(Date);
      expect(stored.when!.getTime()).toBe(Date.UTC(2024, 2, 9, 17, 0, 0));
      expect(typeof stored.big).toBe('bigint');
      expect(Object.is(stored.odd![3], -0)).toBe(true);
      expect(Object.keys(stored.holes!)).toStrictEqual(['present', 'missing', 'list']);
      expect(stored.keyed!.get(2n)).toBe('two');

      const resumed = await keel(['resume', id, '--db', db, '--no-progress'], { env });
      expectCode(resumed, 0);
      const final = await readRun(db, id);
      expect(final.status).toBe('completed');
      expect(final.state).toStrictEqual(uncrashed);
      expect(lines(join(sink, 'ledger.log'))).toStrictEqual(['1180591620717411303425']);
    },
  );
});

describe('C11: a BigInt in the state goes through every command', () => {
  const dir = tempDir('keel-state-bigint-');
  const db = join(dir, 'keel.db');
  let id: string;
  let fromCode: string;

  beforeAll(async () => {
    const run = await keel(
      ['run', TYPES, '--input', '{"label":"c11"}', '--db', db, '--no-progress'],
      {
        env: NEW_YORK,
      },
    );
    expectCode(run, 0);
    expect(run.stdout).toContain('{"total":"1180591620717411303425"}');
    id = await onlyRunId(db);
    // A second run whose input itself holds a BigInt, started from code.
    const engine = openEngine({ db });
    try {
      const wf = workflow<{ big: bigint; doubled?: bigint }>('bigint-input', { version: 1 }).step(
        'double',
        (s) => {
          s.doubled = s.big * 2n;
        },
      );
      const result = await engine.start(wf, { big: 2n ** 70n });
      expect(result.status).toBe('completed');
      fromCode = result.id;
    } finally {
      await engine.close();
    }
  });

  it('C11: keel ls and keel ls --json list the runs', async () => {
    const ls = await keel(['ls', '--db', db]);
    expectCode(ls, 0);
    expect(ls.stderr).toBe('');
    expect(ls.stdout).toContain(id);
    expect(ls.stdout).toContain(fromCode);
    const list = await keelJson<{ id: string; workflow: string; status: string }[]>([
      'ls',
      '--db',
      db,
    ]);
    expect(list.map((r) => [r.id, r.workflow, r.status]).sort()).toStrictEqual(
      [
        [id, 'state-types', 'completed'],
        [fromCode, 'bigint-input', 'completed'],
      ].sort(),
    );
  });

  it('C11: keel show prints the BigInts of the state and of the effect result', async () => {
    const show = await keel(['show', id, '--db', db]);
    expectCode(show, 0);
    expect(show.stderr).toBe('');
    expect(show.stdout).toContain('"big":"1180591620717411303425"');
    expect(show.stdout).toMatch(
      /ledger +ledger:c11 +done +1 +ledger +\{"total":"1180591620717411303425"\}/,
    );
    const other = await keel(['show', fromCode, '--db', db]);
    expectCode(other, 0);
    expect(other.stdout).toContain(
      'state     {"big":"1180591620717411303424","doubled":"2361183241434822606848"}',
    );
  });

  it('C11: keel show --json writes BigInt as a string, and every other kind as display JSON', async () => {
    const view = await keelJson<Record<string, unknown>>(['show', id, '--db', db]);
    expect(view.status).toBe('completed');
    expect(view.input).toStrictEqual({ label: 'c11' });
    expect(view.effects).toMatchObject([
      {
        name: 'ledger',
        key: 'ledger:c11',
        status: 'done',
        result: { total: '1180591620717411303425' },
      },
    ]);
    const { derived, report, ...values } = view.state as Record<string, unknown>;
    expect(values).toStrictEqual({
      label: 'c11',
      big: '1180591620717411303425',
      when: '2024-03-09T17:00:00.000Z',
      scores: { alpha: 1, beta: 2, gamma: 3 },
      keyed: [
        [1, 'one'],
        ['2', 'two'],
        [null, 'nothing'],
        [4, 'four'],
      ],
      tags: ['x', 3, 42],
      holes: { present: 1, list: [1, null, 3, null] },
      grid: [
        [[1, 2], []],
        [[3], [4, 5]],
      ],
      odd: ['NaN', 'Infinity', '-Infinity', 0, 0],
      dollar: { $: 'dollar', nested: { $: 2, $$: ['a', 'b'] } },
    });
    expect(derived).toMatchObject({
      bigNext: '3541774862152233910273',
      tomorrow: '2024-03-10T16:00:00.000Z',
      hoursToSameTimeTomorrow: 23,
    });
    expect(report).toMatchObject({ big: '400000000000000000' });

    const other = await keelJson<{ input: unknown; state: unknown }>([
      'show',
      fromCode,
      '--db',
      db,
    ]);
    expect(other.input).toStrictEqual({ big: '1180591620717411303424' });
    expect(other.state).toStrictEqual({
      big: '1180591620717411303424',
      doubled: '2361183241434822606848',
    });
  });
});

describe('refusals: what the state cannot hold is refused at the checkpoint', () => {
  const dir = tempDir('keel-state-refuse-');
  let engine: Engine;

  beforeAll(() => {
    engine = openEngine({ db: join(dir, 'keel.db') });
  });
  afterAll(async () => {
    await engine.close();
  });

  const holds: Record<RefuseKind, [string, string]> = {
    function: ['state.a.b[2]', 'a function'],
    symbol: ['state.a.b[2]', 'a symbol'],
    class: ['state.a.b[2]', 'an instance of Handle'],
    cycle: ['state.a.b[2].self', 'a reference to one of its own ancestors (a cycle)'],
  };
  const cases = (['function', 'symbol', 'class', 'cycle'] as RefuseKind[]).flatMap((kind) =>
    (['step', 'checkpoint', 'caught'] as RefuseAt[]).map((at) => ({ kind, at })),
  );

  it.each(cases)(
    'a $kind in the state (refused at $at) fails the run with its path and step, the last checkpoint intact',
    async ({ kind, at }) => {
      const log: string[] = [];
      const result = await engine.start(refusing(kind, at, log), {});
      const [path, what] = holds[kind];
      expect(result.status).toBe('failed');
      expect(result.error?.message.split('\n')[0]).toBe(
        `Cannot checkpoint ${path}: it holds ${what}.`,
      );
      expect(result.error).toMatchObject({
        name: 'StateError',
        code: 'STATE_UNSERIALIZABLE',
        path,
        step: 'bad',
      });
      expect(log).toStrictEqual(
        at === 'caught' ? ['prepare', 'bad', 'caught'] : ['prepare', 'bad'],
      );

      const view = await engine.get(result.id);
      expect(view.status).toBe('failed');
      // Before the step, or as of its one good ctx.checkpoint().
      expect(view.state).toStrictEqual({ a: { b: [1, 2, 3] }, count: at === 'step' ? 1 : 2 });
      expect(view.steps.map((s) => [s.name, s.status])).toStrictEqual([
        ['prepare', 'completed'],
        ['bad', 'failed'],
      ]);
      expect(view.steps[1]?.error?.message.split('\n')[0]).toBe(
        `Cannot checkpoint ${path}: it holds ${what}.`,
      );
    },
  );

  it('keel run reports the refusal with its path; keel show names the step', async () => {
    const db = join(dir, 'cli.db');
    const sink = tempDir('keel-state-refuse-sink-');
    const run = await keel(['run', REFUSE, '--db', db, '--no-progress'], {
      env: { REFUSE_KIND: 'class', REFUSE_AT: 'checkpoint', SINK_DIR: sink },
    });
    expectCode(run, 1);
    expect(run.stdout).toContain(
      'error: Cannot checkpoint state.a.b[2]: it holds an instance of Handle.',
    );
    expect(lines(join(sink, 'steps.log'))).toStrictEqual(['prepare', 'bad']);
    const id = await onlyRunId(db);
    const show = await keel(['show', id, '--db', db]);
    expectCode(show, 0);
    expect(show.stdout).toContain(
      'error     Cannot checkpoint state.a.b[2]: it holds an instance of Handle. (step bad)',
    );
    const view = await keelJson<{ status: string; state: unknown; error: Record<string, unknown> }>(
      ['show', id, '--db', db],
    );
    expect(view.status).toBe('failed');
    expect(view.state).toStrictEqual({ a: { b: [1, 2, 3] }, count: 2 });
    expect(view.error).toMatchObject({ step: 'bad', path: 'state.a.b[2]' });
  });
});

type LargeView = {
  status: string;
  state: { marker?: string; chunks?: string[]; digest?: string; count?: number };
};

describe('C27: large states', () => {
  const dir = tempDir('keel-state-large-');

  it.each([
    ['10 KB', 10 * 1024, 'after its step', 'step:after-commit@2'],
    ['1 MB', 1024 * 1024, 'after its step', 'step:after-commit@2'],
    ['8 MB', 8 * 1024 * 1024, 'after its step', 'step:after-commit@2'],
    ['1 MB', 1024 * 1024, "after the step's ctx.checkpoint()", 'checkpoint:after-commit@1'],
  ])(
    'C27: a %s state survives its checkpoint, a SIGKILL %s, keel resume and show --json',
    async (_size, bytes, _where, crashAt) => {
      const db = join(dir, `${bytes}-${crashAt.split(':')[0]}.db`);
      const env = { LARGE_BYTES: String(bytes) };
      const count = bytes / CHUNK;
      const all = Array.from({ length: count }, (_, i) => chunk(i));
      const killed = await keel(['run', LARGE, '--db', db, '--no-progress'], {
        env: { ...env, KEEL_CRASH_AT: crashAt },
      });
      expectKilled(killed);
      const id = await onlyRunId(db);

      const interrupted = await readRun(db, id);
      expect(interrupted.status).toBe('running');
      expect(interrupted.state).toStrictEqual(
        crashAt.startsWith('checkpoint')
          ? // The halfway checkpoint: chunks 0..count/2, the marker not yet moved.
            { marker: 'before', chunks: all.slice(0, count / 2 + 1) }
          : { marker: 'filled', chunks: all },
      );

      const resumed = await keel(['resume', id, '--db', db, '--no-progress'], { env });
      expectCode(resumed, 0);
      const view = await keelJson<LargeView>(['show', id, '--db', db]);
      expect(view.status).toBe('completed');
      expect(view.state.count).toBe(count);
      expect(view.state.digest).toBe(digest(all.join('')));
      expect(view.state.chunks).toStrictEqual(all);
    },
  );

  it('C27: a 50 MB state fails at its write, naming the limit and the step; the next step never starts', async () => {
    const db = join(dir, 'huge.db');
    const sink = tempDir('keel-state-huge-sink-');
    const run = await keel(['run', LARGE, '--db', db, '--no-progress'], {
      env: { LARGE_BYTES: String(50 * 1024 * 1024), LARGE_MIDWAY: '0', SINK_DIR: sink },
    });
    expectCode(run, 1);
    expect(run.stdout).toContain('after step "fill" is 50.');
    expect(run.stdout).toContain(
      'over the limit of 32.0 MB; nothing was written and the previous checkpoint is intact.',
    );
    expect(run.stdout).toContain(
      'raise the limit (openEngine({ maxStateBytes }) or KEEL_MAX_STATE_BYTES)',
    );
    expect(existsSync(join(sink, 'check.log'))).toBe(false);

    const id = await onlyRunId(db);
    const view = await keelJson<
      LargeView & { steps: { name: string; status: string }[]; error: Record<string, unknown> }
    >(['show', id, '--db', db]);
    expect(view.status).toBe('failed');
    expect(view.state).toStrictEqual({ marker: 'before' });
    expect(view.steps.map((s) => [s.name, s.status])).toStrictEqual([
      ['start', 'completed'],
      ['fill', 'failed'],
    ]);
    expect(view.error).toMatchObject({ code: 'STATE_TOO_LARGE', step: 'fill' });
    const store = openSqliteStore(db);
    try {
      const checkpoints = await store.loadCheckpoints(id, 0);
      expect(checkpoints.map((c) => [c.seq, c.kind, c.step])).toStrictEqual([
        [1, 'snapshot', null],
        [2, 'patch', 'start'],
      ]);
    } finally {
      await store.close();
    }
  });
});

describe('C27: snapshots keep resuming cheap', () => {
  const dir = tempDir('keel-state-many-');

  it('C27: after 1,000 small steps, resume loads at most snapshotEvery + 1 checkpoints at any point', async () => {
    const snapshotEvery = 200;
    const db = join(dir, 'keel.db');
    const killed = await keel(['run', MANY, '--input', '{"n":0}', '--db', db, '--no-progress'], {
      env: { KEEL_CRASH_AT: 'step:after-commit@777' },
    });
    expectKilled(killed);
    const id = await onlyRunId(db);

    const store = openSqliteStore(db);
    try {
      const atCrash = (await store.getRun(id))!;
      expect(atCrash.stepCount).toBe(777);
      const loaded = await store.loadCheckpoints(id, atCrash.snapshotSeq);
      expect(loaded.length).toBeGreaterThanOrEqual(1);
      expect(loaded.length).toBeLessThanOrEqual(snapshotEvery + 1);
      expect(loaded[0]?.kind).toBe('snapshot');
      expect(loaded.at(-1)?.seq).toBe(atCrash.seq);
    } finally {
      await store.close();
    }
    expect((await readRun(db, id)).state).toStrictEqual({ n: 777, last: 'tick 777' });

    const resumed = await keel(['resume', id, '--db', db, '--no-progress']);
    expectCode(resumed, 0);
    const reopened = openSqliteStore(db);
    try {
      const run = (await reopened.getRun(id))!;
      expect(run.status).toBe('completed');
      expect(run.stepCount).toBe(1_000);
      expect((await reopened.loadCheckpoints(id, run.snapshotSeq)).length).toBeLessThanOrEqual(
        snapshotEvery + 1,
      );
      // Wherever the run had stopped, the newest snapshot was at most snapshotEvery - 1 patches back.
      const history = await reopened.loadCheckpoints(id, 1);
      expect(history.map((c) => c.seq)).toStrictEqual(
        Array.from({ length: 1_001 }, (_, i) => i + 1),
      );
      let sinceSnapshot = 0;
      let longest = 0;
      for (const checkpoint of history) {
        sinceSnapshot = checkpoint.kind === 'snapshot' ? 0 : sinceSnapshot + 1;
        longest = Math.max(longest, sinceSnapshot);
      }
      expect(longest).toBeLessThanOrEqual(snapshotEvery - 1);
      expect(history.filter((c) => c.kind === 'snapshot').length).toBeGreaterThanOrEqual(5);
    } finally {
      await reopened.close();
    }
    expect((await readRun(db, id)).state).toStrictEqual({ n: 1_000, last: 'tick 1000' });
  });
});

describe('objects with a key named "$"', () => {
  it('an object whose "$" key looks like a codec tag reads back as that object, not as a tag', async () => {
    const dir = tempDir('keel-state-dollar-');
    const db = join(dir, 'keel.db');
    const engine = openEngine({ db });
    let id: string;
    try {
      const wf = workflow<{ lookalikes?: unknown[] }>('dollar-lookalikes', { version: 1 }).step(
        'write',
        (s) => {
          s.lookalikes = [
            { $: 'D', v: 5 },
            { $: 'B', v: '12' },
            { $: 'M', v: [[1, 2]] },
            { $: 'O', v: { $: 'U' } },
            { $: 'U' },
          ];
        },
      );
      id = (await engine.start(wf, {})).id;
    } finally {
      await engine.close();
    }
    expect((await readRun(db, id)).state).toStrictEqual({
      lookalikes: [
        { $: 'D', v: 5 },
        { $: 'B', v: '12' },
        { $: 'M', v: [[1, 2]] },
        { $: 'O', v: { $: 'U' } },
        { $: 'U' },
      ],
    });
  });
});
