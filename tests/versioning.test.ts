/**
 * Versioning and `resume --plan`: a run interrupted under one definition is resumed only with the
 * same graph, or with a raised version and an explicit flag; the plan changes nothing and tells
 * exactly what resuming will do.
 */
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { ResumePlan, RunView } from 'keel';
import { FIXTURES, keel, keelJson, lines, tempDir } from './support/index.ts';

const EVOLVING = join(FIXTURES, 'ver-evolving.ts');

/** Runs the fixture and kills it right after `notify` ran, before its result was recorded. */
async function interruptedRun() {
  const dir = tempDir('keel-ver-');
  const db = join(dir, 'keel.db');
  const env = { SINK_DIR: dir };
  const killed = await keel(['--db', db, 'run', EVOLVING, '--input', '{"order":"o1"}'], {
    env: { ...env, KEEL_CRASH_AT: 'effect:after-run@2' },
  });
  expect(killed.signal).toBe('SIGKILL');
  const [run] = await keelJson<{ id: string; status: string; version: number }[]>([
    '--db',
    db,
    'ls',
  ]);
  expect(run).toMatchObject({ status: 'running', version: 1 });
  return {
    dir,
    db,
    env,
    id: run!.id,
    calls: () => lines(join(dir, 'calls.log')),
    show: (id: string) => keelJson<RunView>(['--db', db, 'show', id]),
  };
}

const sha256 = (file: string) => createHash('sha256').update(readFileSync(file)).digest('hex');

describe('versioning', () => {
  it('a changed graph is refused on resume, naming the change, until the version is raised and --allow-version-change is given', async () => {
    const t = await interruptedRun();
    expect(t.calls()).toEqual(['reserve reserve:o1', 'notify notify:o1']);

    const same = await keel(['--db', t.db, 'resume', t.id], {
      env: { ...t.env, VER_ADD_STEP: '1' },
    });
    expect(same.code).toBe(1);
    expect(same.stderr).toContain(
      `Workflow "ver-evolving" changed since run ${t.id} started (version 1): step "x" added.`,
    );

    const raised = await keel(['--db', t.db, 'resume', t.id], {
      env: { ...t.env, VER_ADD_STEP: '1', VER_VERSION: '2' },
    });
    expect(raised.code).toBe(1);
    expect(raised.stderr).toContain(
      `Workflow "ver-evolving" changed since run ${t.id} started (version 1), now version 2: step "x" added.`,
    );
    expect(raised.stderr).toContain('--allow-version-change');

    // both refusals left the run as it was
    const untouched = await t.show(t.id);
    expect(untouched).toMatchObject({ status: 'running', version: 1, cursor: 'notify' });
    expect(t.calls()).toEqual(['reserve reserve:o1', 'notify notify:o1']);

    const allowed = await keel(['--db', t.db, 'resume', t.id, '--allow-version-change', '--json'], {
      env: { ...t.env, VER_ADD_STEP: '1', VER_VERSION: '2' },
    });
    expect(allowed.code).toBe(0);
    const view = JSON.parse(allowed.stdout) as RunView;
    expect(view).toMatchObject({ status: 'completed', version: 2 });
    expect(view.state).toEqual({ order: 'o1', prepared: true, extra: true, finished: true });
    expect(view.steps.map((s) => s.name)).toEqual(['prepare', 'reserve', 'notify', 'x', 'finish']);
    expect(t.calls()).toEqual(['reserve reserve:o1', 'notify notify:o1', 'notify notify:o1']);
    expect((await t.show(t.id)).version).toBe(2);
  });

  it('resume --plan changes nothing in the database and tells exactly what resuming will do', async () => {
    const t = await interruptedRun();
    // `keel show` opened and closed the database, which folded the crashed process's WAL into it
    await t.show(t.id);
    expect(existsSync(`${t.db}-wal`)).toBe(false);
    const before = sha256(t.db);

    const plan = await keelJson<ResumePlan>(['--db', t.db, 'resume', t.id, '--plan'], {
      env: t.env,
    });
    expect(plan).toEqual({
      runId: t.id,
      workflow: 'ver-evolving',
      status: 'running',
      resumable: true,
      reason: null,
      restartAt: 'notify',
      completedSteps: ['prepare', 'reserve'],
      reused: [{ name: 'reserve', key: 'reserve:o1' }],
      rerun: [{ name: 'notify', key: 'notify:o1' }],
      reconcile: [],
      unknown: [],
    });
    const human = await keel(['--db', t.db, 'resume', t.id, '--plan'], { env: t.env });
    expect(human.code).toBe(0);
    expect(human.stdout.split('\n')).toEqual(
      expect.arrayContaining([
        'resume would proceed',
        'steps done:                prepare → reserve',
        'restarts at:               notify',
        'effect results reused:     reserve (key reserve:o1)',
        'effects run again (same key): notify (key notify:o1)',
      ]),
    );
    const changed = await keelJson<ResumePlan>(['--db', t.db, 'resume', t.id, '--plan'], {
      env: { ...t.env, VER_ADD_STEP: '1' },
    });
    expect(changed).toMatchObject({
      resumable: false,
      reason: `Workflow "ver-evolving" changed since run ${t.id} started (version 1): step "x" added.`,
    });

    expect(existsSync(`${t.db}-wal`)).toBe(false);
    expect(sha256(t.db)).toBe(before);
    expect(t.calls()).toEqual(['reserve reserve:o1', 'notify notify:o1']);

    // and resuming does what the plan said: reserve reused, notify run again with its key
    const resumed = await keel(['--db', t.db, 'resume', t.id], { env: t.env });
    expect(resumed.code).toBe(0);
    expect(t.calls()).toEqual(['reserve reserve:o1', 'notify notify:o1', 'notify notify:o1']);
    const view = await t.show(t.id);
    expect(view.status).toBe('completed');
    expect(view.effects.map((e) => [e.name, e.key, e.status, e.attempts])).toEqual([
      ['reserve', 'reserve:o1', 'done', 1],
      ['notify', 'notify:o1', 'done', 2],
    ]);
  });
});
