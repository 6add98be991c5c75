/**
 * Rollback through the real `keel` command: order of compensations, a compensation that keeps
 * failing, retries, a crash in the middle of a rollback, automatic rollback, effects started with
 * `ctx.effect`, and undoing a completed run.
 */
import { existsSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { RollbackReport, RunView } from 'keel';
import { FIXTURES, keel, keelJson, lines, tempDir, type KeelResult } from './support/index.ts';

const FIVE = join(FIXTURES, 'rb-five.ts');
const INLINE = join(FIXTURES, 'rb-inline.ts');

type Shown = RunView & { rollback?: RollbackReport };

/** A fresh database and sink folder for one test. */
function setup() {
  const dir = tempDir('keel-rb-');
  const db = join(dir, 'keel.db');
  const env = { SINK_DIR: dir };
  return {
    dir,
    db,
    env,
    calls: () => lines(join(dir, 'calls.log')),
    applied: () =>
      existsSync(join(dir, 'applied')) ? readdirSync(join(dir, 'applied')).sort() : [],
    show: (id: string) => keelJson<Shown>(['--db', db, 'show', id]),
  };
}

function parse(result: KeelResult): Shown {
  try {
    return JSON.parse(result.stdout) as Shown;
  } catch {
    throw new Error(`no JSON (exit ${result.code}):\n${result.stdout}\n${result.stderr}`);
  }
}

/** Starts the five-effect run with its fifth effect refused; returns the failed run's id. */
async function failedFiveRun(t: ReturnType<typeof setup>, env: Record<string, string> = {}) {
  const result = await keel(['--db', t.db, 'run', FIVE, '--input', '{"tag":"o7"}', '--json'], {
    env: { ...t.env, RB_FAIL_FIFTH: '1', ...env },
  });
  const view = parse(result);
  return { result, view, id: view.id };
}

const APPLIED = ['apply C1 c1:o7', 'apply C2 c2:o7', 'apply C3 c3:o7', 'apply C4 c4:o7'];
const statuses = (view: Shown) =>
  Object.fromEntries(view.effects.map((e) => [e.name, e.status] as const));
const compensations = (view: Shown) =>
  Object.fromEntries(view.effects.map((e) => [e.name, e.compensationAttempts] as const));

describe('rollback', () => {
  it('C08: compensations run newest first (C4, C3, C2, C1), never for the effect that failed, and only once', async () => {
    const t = setup();
    const { result, view, id } = await failedFiveRun(t);
    expect(result.code).toBe(1);
    expect(view.status).toBe('failed');
    expect(t.calls()).toEqual([...APPLIED, 'refuse C5 c5:o7']);
    expect(t.applied()).toEqual(['c1:o7', 'c2:o7', 'c3:o7', 'c4:o7']);

    const first = await keel(['--db', t.db, 'rollback', id], { env: t.env });
    expect(first.code).toBe(0);
    expect(first.stdout).toContain(`run ${id} (rb-five): rolled_back`);
    expect(first.stdout).toContain('compensated: C4, C3, C2, C1');
    expect(t.calls()).toEqual([
      ...APPLIED,
      'refuse C5 c5:o7',
      'compensate-try C4 compensate:c4:o7',
      'compensate C4 compensate:c4:o7 C4-receipt',
      'compensate-try C3 compensate:c3:o7',
      'compensate C3 compensate:c3:o7 C3-receipt',
      'compensate-try C2 compensate:c2:o7',
      'compensate C2 compensate:c2:o7 C2-receipt',
      'compensate-try C1 compensate:c1:o7',
      'compensate C1 compensate:c1:o7 C1-receipt',
    ]);
    expect(t.applied()).toEqual([]);
    const shown = await t.show(id);
    expect(shown.status).toBe('rolled_back');
    expect(statuses(shown)).toEqual({
      C1: 'compensated',
      C2: 'compensated',
      C3: 'compensated',
      C4: 'compensated',
      C5: 'failed',
    });

    const before = t.calls();
    const second = await keel(['--db', t.db, 'rollback', id], { env: t.env });
    expect(second.code).toBe(0);
    expect(second.stdout).toContain(`run ${id} (rb-five): rolled_back`);
    expect(t.calls()).toEqual(before);
    expect((await t.show(id)).status).toBe('rolled_back');
  });

  it('C08: a compensation that keeps failing leaves the run compensation_failed with what is still applied, and a second rollback resumes at it', async () => {
    const t = setup();
    const broken = join(t.dir, 'c3-broken');
    writeFileSync(broken, '');
    const env = { ...t.env, RB_C3_BROKEN_FILE: broken };
    const { id } = await failedFiveRun(t);

    const stopped = await keel(['--db', t.db, 'rollback', id], { env });
    expect(stopped.code).toBe(1);
    expect(stopped.stdout).toContain(`run ${id} (rb-five): compensation_failed`);
    expect(stopped.stdout).toContain('compensated: C4\n');
    expect(stopped.stdout).toContain('still applied: C3, C2, C1');
    expect(stopped.stdout).toContain(
      `Rollback of run ${id} stopped at effect "C3" (key "c3:o7"): C3 compensation: sink unavailable. Still applied: C3, C2, C1.`,
    );
    // three attempts (the default), then it stops: C2 and C1 are not touched
    expect(t.calls().slice(APPLIED.length + 1)).toEqual([
      'compensate-try C4 compensate:c4:o7',
      'compensate C4 compensate:c4:o7 C4-receipt',
      'compensate-try C3 compensate:c3:o7',
      'compensate-try C3 compensate:c3:o7',
      'compensate-try C3 compensate:c3:o7',
    ]);
    expect(t.applied()).toEqual(['c1:o7', 'c2:o7', 'c3:o7']);

    const failed = await t.show(id);
    expect(failed.status).toBe('compensation_failed');
    expect(statuses(failed)).toEqual({
      C1: 'done',
      C2: 'done',
      C3: 'compensation_failed',
      C4: 'compensated',
      C5: 'failed',
    });
    expect(compensations(failed)).toEqual({ C1: 0, C2: 0, C3: 3, C4: 1, C5: 0 });
    expect(failed.effects.find((e) => e.name === 'C3')?.error?.message).toBe(
      'C3 compensation: sink unavailable',
    );
    expect(failed.error).toMatchObject({
      name: 'CompensationError',
      code: 'COMPENSATION_FAILED',
      step: 'C3',
      remaining: ['C3', 'C2', 'C1'],
    });

    // `resume` does not paper over it
    const resume = await keel(['--db', t.db, 'resume', id], { env });
    expect(resume.code).toBe(1);
    expect(resume.stderr).toContain(
      `Run ${id} is compensation_failed; there is nothing to resume.`,
    );

    rmSync(broken);
    const resumed = await keel(['--db', t.db, 'rollback', id], { env });
    expect(resumed.code).toBe(0);
    expect(resumed.stdout).toContain(`run ${id} (rb-five): rolled_back`);
    expect(resumed.stdout).toContain('compensated: C3, C2, C1');
    expect(t.calls().slice(APPLIED.length + 6)).toEqual([
      'compensate-try C3 compensate:c3:o7',
      'compensate C3 compensate:c3:o7 C3-receipt',
      'compensate-try C2 compensate:c2:o7',
      'compensate C2 compensate:c2:o7 C2-receipt',
      'compensate-try C1 compensate:c1:o7',
      'compensate C1 compensate:c1:o7 C1-receipt',
    ]);
    // each compensation applied exactly once over both rollbacks
    const done = t.calls().filter((l) => l.startsWith('compensate '));
    expect(done.map((l) => l.split(' ')[1])).toEqual(['C4', 'C3', 'C2', 'C1']);
    expect(t.applied()).toEqual([]);
    const final = await t.show(id);
    expect(final.status).toBe('rolled_back');
    expect(compensations(final)).toEqual({ C1: 1, C2: 1, C3: 4, C4: 1, C5: 0 });
    // the stopped rollback's error is gone; the failure that started it stays
    expect(final.error).toMatchObject({
      code: 'STEP_FAILED',
      message: 'Effect "C5" (key "c5:o7") failed after 1 attempt(s).',
    });
  });

  it('a compensation that fails twice then succeeds is retried and the run ends rolled_back, not compensation_failed', async () => {
    const t = setup();
    const { id } = await failedFiveRun(t);
    const result = await keel(['--db', t.db, 'rollback', id, '--json'], {
      env: { ...t.env, RB_C3_FAILS: '2' },
    });
    expect(result.code).toBe(0);
    const view = parse(result);
    expect(view.status).toBe('rolled_back');
    expect(view.error?.code).toBe('STEP_FAILED'); // the failure that started it stays recorded
    expect(view.rollback).toEqual({
      compensated: ['C4', 'C3', 'C2', 'C1'],
      skipped: [],
      remaining: [],
    });
    expect(compensations(view)).toEqual({ C1: 1, C2: 1, C3: 3, C4: 1, C5: 0 });
    expect(t.calls().filter((l) => l.includes(' C3 compensate:'))).toEqual([
      'compensate-try C3 compensate:c3:o7',
      'compensate-try C3 compensate:c3:o7',
      'compensate-try C3 compensate:c3:o7',
      'compensate C3 compensate:c3:o7 C3-receipt',
    ]);
  });

  it.each([
    {
      at: 'compensation:after-run@2',
      what: "C3's compensation ran but was not recorded",
      // the one in flight at the kill is called again, with the same compensation key
      tries: ['C4', 'C3', 'C3', 'C2', 'C1'],
      attempts: { C1: 1, C2: 1, C3: 2, C4: 1, C5: 0 },
    },
    {
      at: 'compensation-intent:after-commit@2',
      what: "C3's compensation was recorded as starting but not called",
      tries: ['C4', 'C3', 'C2', 'C1'],
      attempts: { C1: 1, C2: 1, C3: 2, C4: 1, C5: 0 },
    },
    {
      at: 'rollback:after-commit',
      what: 'the rollback was recorded as started, nothing compensated',
      tries: ['C4', 'C3', 'C2', 'C1'],
      attempts: { C1: 1, C2: 1, C3: 1, C4: 1, C5: 0 },
    },
  ])(
    'a rollback killed where $what ($at) is finished by a second rollback without compensating twice',
    async ({ at, tries, attempts }) => {
      const t = setup();
      const { id } = await failedFiveRun(t);
      const killed = await keel(['--db', t.db, 'rollback', id], {
        env: { ...t.env, KEEL_CRASH_AT: at },
      });
      expect(killed.signal).toBe('SIGKILL');
      expect((await t.show(id)).status).toBe('compensating');

      const second = await keel(['--db', t.db, 'rollback', id], { env: t.env });
      expect(second.code).toBe(0);
      expect(second.stdout).toContain(`run ${id} (rb-five): rolled_back`);
      const log = t.calls().slice(APPLIED.length + 1);
      expect(
        log.filter((l) => l.startsWith('compensate-try ')).map((l) => l.split(' ')[1]),
      ).toEqual(tries);
      // every call of a compensation carries the same compensation key
      expect(new Set(log.filter((l) => l.includes(' C3 ')).map((l) => l.split(' ')[2]))).toEqual(
        new Set(['compensate:c3:o7']),
      );
      // the sink holds none of the effects any more
      expect(t.applied()).toEqual([]);
      const view = await t.show(id);
      expect(view.status).toBe('rolled_back');
      expect(statuses(view)).toEqual({
        C1: 'compensated',
        C2: 'compensated',
        C3: 'compensated',
        C4: 'compensated',
        C5: 'failed',
      });
      expect(compensations(view)).toEqual(attempts);
    },
  );

  it('a failed run whose own rollback stops keeps the failure that started it in the run error', async () => {
    const t = setup();
    const broken = join(t.dir, 'c3-broken');
    writeFileSync(broken, '');
    const { result, view } = await failedFiveRun(t, { RB_AUTO: '1', RB_C3_BROKEN_FILE: broken });
    expect(result.code).toBe(1);
    expect(view.status).toBe('compensation_failed');
    expect(view.error).toMatchObject({
      name: 'CompensationError',
      code: 'COMPENSATION_FAILED',
      remaining: ['C3', 'C2', 'C1'],
    });
    expect(JSON.parse(String(view.error?.failure))).toMatchObject({
      code: 'STEP_FAILED',
      message: 'Effect "C5" (key "c5:o7") failed after 1 attempt(s).',
    });
    expect(view.error?.message).toContain(
      'It was rolling back after: Effect "C5" (key "c5:o7") failed after 1 attempt(s).',
    );
  });

  it('rollbackOnFailure: a run that fails rolls its effects back on its own, and `keel run` still reports the failure', async () => {
    const t = setup();
    const { result, view } = await failedFiveRun(t, { RB_AUTO: '1' });
    expect(view.status).toBe('rolled_back');
    expect(result.code).toBe(1);
    expect(view.error).toMatchObject({
      code: 'STEP_FAILED',
      message: 'Effect "C5" (key "c5:o7") failed after 1 attempt(s).',
    });
    expect(t.calls()).toEqual([
      ...APPLIED,
      'refuse C5 c5:o7',
      'compensate-try C4 compensate:c4:o7',
      'compensate C4 compensate:c4:o7 C4-receipt',
      'compensate-try C3 compensate:c3:o7',
      'compensate C3 compensate:c3:o7 C3-receipt',
      'compensate-try C2 compensate:c2:o7',
      'compensate C2 compensate:c2:o7 C2-receipt',
      'compensate-try C1 compensate:c1:o7',
      'compensate C1 compensate:c1:o7 C1-receipt',
    ]);
    expect(t.applied()).toEqual([]);
    expect(view.rollback).toEqual({
      compensated: ['C4', 'C3', 'C2', 'C1'],
      skipped: [],
      remaining: [],
    });
    expect(statuses(view)).toEqual({
      C1: 'compensated',
      C2: 'compensated',
      C3: 'compensated',
      C4: 'compensated',
      C5: 'failed',
    });
  });

  it('rollback of a completed run undoes every effect, newest first', async () => {
    const t = setup();
    const started = await keel(['--db', t.db, 'run', FIVE, '--input', '{"tag":"o7"}', '--json'], {
      env: t.env,
    });
    expect(started.code).toBe(0);
    const { id, status } = parse(started);
    expect(status).toBe('completed');
    expect(t.applied()).toEqual(['c1:o7', 'c2:o7', 'c3:o7', 'c4:o7', 'c5:o7']);

    const result = await keel(['--db', t.db, 'rollback', id, '--json'], { env: t.env });
    expect(result.code).toBe(0);
    const view = parse(result);
    expect(view.status).toBe('rolled_back');
    expect(view.rollback).toEqual({
      compensated: ['C5', 'C4', 'C3', 'C2', 'C1'],
      skipped: [],
      remaining: [],
    });
    expect(t.calls().filter((l) => l.startsWith('compensate '))).toEqual([
      'compensate C5 compensate:c5:o7 C5-receipt',
      'compensate C4 compensate:c4:o7 C4-receipt',
      'compensate C3 compensate:c3:o7 C3-receipt',
      'compensate C2 compensate:c2:o7 C2-receipt',
      'compensate C1 compensate:c1:o7 C1-receipt',
    ]);
    expect(t.applied()).toEqual([]);
  });
});

describe('rollback of effects started with ctx.effect', () => {
  it('in a new process, an effect whose compensation was declared only inline in ctx.effect stops the rollback instead of being left applied silently', async () => {
    const t = setup();
    const run = await keel(
      ['--db', t.db, 'run', INLINE, '--input', '{"tag":"t1","got":[]}', '--json'],
      { env: t.env },
    );
    expect(run.code).toBe(1);
    const { id, status } = parse(run);
    expect(status).toBe('failed');

    const result = await keel(['--db', t.db, 'rollback', id], { env: t.env });
    expect(result.code).toBe(1);
    expect(result.stdout).toContain(`run ${id} (rb-inline): compensation_failed`);
    expect(result.stdout).toContain('still applied: unregistered, registered');
    expect(t.calls()).toEqual([
      'apply registered registered:t1',
      'apply unregistered unregistered:t1',
    ]);
    const view = await t.show(id);
    expect(view.status).toBe('compensation_failed');
    expect(view.error?.message).toContain(
      'it declared its compensation inline in ctx.effect(), which this process cannot reach; register it with .compensation("unregistered", fn) on the workflow. Still applied: unregistered, registered.',
    );
    expect(statuses(view)).toEqual({ registered: 'done', unregistered: 'done' });
  });

  it('in the process that ran them, the inline compensate given to ctx.effect is used', async () => {
    const t = setup();
    const run = await keel(
      ['--db', t.db, 'run', INLINE, '--input', '{"tag":"t2","got":[]}', '--json'],
      { env: { ...t.env, RB_AUTO: '1' } },
    );
    const view = parse(run);
    expect(view.status).toBe('rolled_back');
    expect(t.calls()).toEqual([
      'apply registered registered:t2',
      'apply unregistered unregistered:t2',
      'inline-compensate unregistered compensate:unregistered:t2 unregistered-receipt',
      'inline-compensate registered compensate:registered:t2 registered-receipt',
    ]);
    expect(statuses(view)).toEqual({ registered: 'compensated', unregistered: 'compensated' });
  });

  it('in the process that ran it, a ctx.effect with no inline compensate is undone by the compensation registered on the workflow, as in any other process', async () => {
    const t = setup();
    const run = await keel(
      ['--db', t.db, 'run', INLINE, '--input', '{"tag":"t3","got":[]}', '--json'],
      { env: { ...t.env, RB_AUTO: '1', RB_REGISTERED_ONLY: '1' } },
    );
    const view = parse(run);
    expect(view.status).toBe('rolled_back');
    expect(t.calls()).toEqual([
      'apply registered registered:t3',
      'apply unregistered unregistered:t3',
      'inline-compensate unregistered compensate:unregistered:t3 unregistered-receipt',
      'workflow-compensate registered compensate:registered:t3 registered-receipt',
    ]);
    expect(statuses(view)).toEqual({ registered: 'compensated', unregistered: 'compensated' });
  });
});
