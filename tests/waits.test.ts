/**
 * Durable waits and cancellation: `ctx.sleep` across worker crashes (SIGKILL), `ctx.waitFor` with
 * `keel signal` and timeouts, and `keel cancel` of queued, waiting and running runs. Workers run as
 * child processes where a crash is involved, and in this process (`engine.work`) otherwise.
 */
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { ChildProcess } from 'node:child_process';
import { afterEach, describe, expect, it } from 'vitest';
import {
  openEngine,
  openSqliteStore,
  type Engine,
  type RunView,
  type SqliteStore,
  type WaitRecord,
  type WorkReport,
} from 'keel';
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
import { approval, nap, type Approval, type WaitEvent } from './fixtures/q-waits.ts';
import cancelWorkflow from './fixtures/q-cancel.ts';

const WAITS = join(FIXTURES, 'q-waits.ts');
const CANCEL = join(FIXTURES, 'q-cancel.ts');
const NO_WORK: WorkReport = { completed: 0, failed: 0, waiting: 0, other: 0, errors: 0 };

const children: ChildProcess[] = [];
const opened: { close(): Promise<void> }[] = [];

afterEach(async () => {
  for (const child of children.splice(0)) await killHard(child);
  for (const handle of opened.splice(0).reverse()) await handle.close();
});

/** A fresh database with an engine (which also works the queue here) and a handle on its store. */
function setup(prefix: string): { dir: string; db: string; engine: Engine; store: SqliteStore } {
  const dir = tempDir(`keel-${prefix}-`);
  const db = join(dir, 'keel.db');
  const engine = openEngine({ db });
  const store = openSqliteStore(db);
  opened.push(engine, store);
  return { dir, db, engine, store };
}

function startWorker(db: string, ...args: string[]): ChildProcess {
  const child = spawnKeel([
    '--db',
    db,
    '--json',
    '--no-progress',
    'worker',
    '--poll',
    '50',
    ...args,
  ]);
  children.push(child);
  return child;
}

function reportOf(result: KeelResult): WorkReport {
  expect(result.code, result.stderr).toBe(0);
  return JSON.parse(result.stdout) as WorkReport;
}

function events(dir: string): WaitEvent[] {
  return lines(join(dir, 'events.log')).map((l) => JSON.parse(l) as WaitEvent);
}

/** The events as `what step` pairs, for comparing the order of what ran. */
function trail(dir: string): string[] {
  return events(dir).map((e) => `${e.what} ${e.step}${e.code ? ` ${e.code}` : ''}`);
}

async function waitRecord(store: SqliteStore, runId: string, name: string): Promise<WaitRecord> {
  const wait = await store.getWait(runId, name);
  expect(wait, `wait ${name} of ${runId}`).toBeDefined();
  return wait!;
}

/** Polls the store until the run has this status. */
async function statusReached(store: SqliteStore, runId: string, status: string): Promise<void> {
  const deadline = Date.now() + 30_000;
  while ((await store.getRun(runId))?.status !== status) {
    if (Date.now() > deadline) throw new Error(`run ${runId} never became ${status}`);
    await sleep(20);
  }
}

describe('ctx.sleep in a worker', () => {
  it('the run waits in the queue during the nap; a SIGKILL then does not re-arm it', async () => {
    const { dir, db, engine, store } = setup('sleep');
    const { runId } = await engine.enqueue(nap, { dir, nap: '2s' }, { module: WAITS });
    const first = startWorker(db);
    await statusReached(store, runId, 'waiting');

    // During the nap: waiting, holding no lease, with a sleep entry due when the sleep ends.
    const wait = await waitRecord(store, runId, 'nap');
    const [, napEntered] = events(dir);
    expect(wait).toMatchObject({ kind: 'sleep', step: 'nap', status: 'waiting', firedAt: null });
    expect(wait.createdAt).toBeGreaterThanOrEqual(napEntered!.at);
    expect(wait.dueAt).toBe(wait.createdAt + 2_000);
    expect(await store.getRun(runId)).toMatchObject({ status: 'waiting', lease: null });
    expect(await store.getQueueEntry(runId)).toMatchObject({ reason: 'sleep', dueAt: wait.dueAt });
    expect(Date.now(), 'the kill must land during the nap').toBeLessThan(wait.dueAt!);
    await killHard(first);

    const second = startWorker(db, '--until-idle');
    expect(reportOf(await collect(second, 60_000))).toEqual({ ...NO_WORK, completed: 1 });
    expect(trail(dir)).toEqual([
      'enter before',
      'enter nap',
      'enter nap',
      'woke nap',
      'enter after',
    ]);
    const [, , again, woke] = events(dir);
    // The new worker waited for the original due time, then passed the sleep at once.
    expect(again!.pid).toBe(second.pid);
    expect(again!.at).toBeGreaterThanOrEqual(wait.dueAt!);
    expect(woke!.at - again!.at).toBeLessThan(1_000);
    const fired = await waitRecord(store, runId, 'nap');
    expect(fired).toMatchObject({ status: 'fired', dueAt: wait.dueAt, createdAt: wait.createdAt });
    expect(fired.firedAt).toBeGreaterThanOrEqual(wait.dueAt!);
    expect(await store.getRun(runId)).toMatchObject({ status: 'completed' });
  });

  it('a sleep that already fired is not re-armed when its step runs again after a crash', async () => {
    const { dir, db, engine, store } = setup('sleep-fired');
    const { runId } = await engine.enqueue(
      nap,
      { dir, nap: '1500ms', hold: true },
      { module: WAITS },
    );
    const first = startWorker(db);
    await waitFor(() => trail(dir).includes('woke nap'), 30_000, 'the sleep to fire');
    // Killed after the sleep fired, before the step's milestone.
    await killHard(first);
    const wait = await waitRecord(store, runId, 'nap');
    expect(wait.status).toBe('fired');
    expect(await store.getRun(runId)).toMatchObject({ status: 'running', cursor: 'nap' });

    writeFileSync(join(dir, 'release'), '');
    const second = startWorker(db, '--until-idle');
    expect(reportOf(await collect(second, 60_000))).toEqual({ ...NO_WORK, completed: 1 });
    expect(trail(dir)).toEqual([
      'enter before',
      'enter nap',
      'enter nap',
      'woke nap',
      'enter nap',
      'woke nap',
      'enter after',
    ]);
    const [, , , , again, woke] = events(dir);
    expect(again!.pid).toBe(second.pid);
    expect(woke!.at - again!.at).toBeLessThan(1_000);
    expect(await waitRecord(store, runId, 'nap')).toEqual(wait);
    expect(await store.getRun(runId)).toMatchObject({ status: 'completed' });
  });
});

describe('ctx.waitFor', () => {
  const payload: Approval = {
    approved: true,
    by: { name: 'Ada', roles: ['editor', 'admin'] },
    note: 'ship it',
  };

  it('a signal sent before the run reaches the wait is kept, then delivered with its payload', async () => {
    const { dir, db, engine, store } = setup('signal-early');
    const { runId } = await engine.enqueue(approval, { dir }, { module: WAITS });
    const sent = await keel([
      '--db',
      db,
      'signal',
      runId,
      'approval',
      '--payload',
      JSON.stringify(payload),
    ]);
    expect(sent.code, sent.stderr).toBe(0);
    expect(sent.stdout).toBe(
      `signal approval kept for run ${runId}; its wait of that name takes it when it gets there\n`,
    );

    expect(await engine.work({ untilIdle: true, pollMs: 50 })).toEqual({
      ...NO_WORK,
      completed: 1,
    });
    // Taken at once: the step never left for the wait.
    expect(trail(dir)).toEqual([
      'enter prepare',
      'enter approve',
      'received approve',
      'past approve',
      'enter finish',
    ]);
    const run = await engine.get(runId);
    expect(run.status).toBe('completed');
    expect(run.state).toEqual({ dir, payload });
    expect(await waitRecord(store, runId, 'approval')).toMatchObject({
      kind: 'signal',
      status: 'fired',
    });
    expect(await store.nextSignal(runId, 'approval')).toBeUndefined();
  });

  it('a signal sent while the run waits wakes it; `keel signal` says it woke it', async () => {
    const { dir, db, engine, store } = setup('signal-wake');
    const { runId } = await engine.enqueue(approval, { dir }, { module: WAITS });
    // Waiting for a signal with no timeout: nothing is due, so an idle worker stops.
    expect(await engine.work({ untilIdle: true, pollMs: 50 })).toEqual({
      ...NO_WORK,
      waiting: 1,
    });
    expect(await store.getRun(runId)).toMatchObject({ status: 'waiting', lease: null });
    expect(await store.getQueueEntry(runId)).toMatchObject({ reason: 'signal', dueAt: null });
    expect(await waitRecord(store, runId, 'approval')).toMatchObject({
      kind: 'signal',
      step: 'approve',
      status: 'waiting',
      dueAt: null,
    });

    const before = Date.now();
    const sent = await keelJson<{ runId: string; name: string; woke: boolean }>([
      '--db',
      db,
      'signal',
      runId,
      'approval',
      '--payload',
      JSON.stringify(payload),
    ]);
    expect(sent).toEqual({ runId, name: 'approval', woke: true });
    const due = (await store.getQueueEntry(runId))!.dueAt!;
    expect(due).toBeGreaterThanOrEqual(before);
    expect(due).toBeLessThanOrEqual(Date.now());

    expect(await engine.work({ untilIdle: true, pollMs: 50 })).toEqual({
      ...NO_WORK,
      completed: 1,
    });
    expect(trail(dir)).toEqual([
      'enter prepare',
      'enter approve',
      'enter approve',
      'received approve',
      'past approve',
      'enter finish',
    ]);
    expect((await engine.get(runId)).state).toEqual({ dir, payload });
    expect(await store.getQueueEntry(runId)).toBeUndefined();
  });

  it('the human form of `keel signal` says the run was waiting and is due now', async () => {
    const { dir, db, engine } = setup('signal-text');
    const { runId } = await engine.enqueue(approval, { dir }, { module: WAITS });
    await engine.work({ untilIdle: true, pollMs: 50 });
    const sent = await keel(['--db', db, 'signal', runId, 'approval', '--payload', '{"a":1}']);
    expect(sent.code, sent.stderr).toBe(0);
    expect(sent.stdout).toBe(
      `signal approval sent; run ${runId} was waiting for it and is due now\n`,
    );
  });

  it('a try/catch around ctx.waitFor cannot swallow the suspension: nothing past the wait runs', async () => {
    const { dir, engine } = setup('signal-catch');
    const { runId } = await engine.enqueue(approval, { dir }, { module: WAITS });
    expect(await engine.work({ untilIdle: true, pollMs: 50 })).toEqual({
      ...NO_WORK,
      waiting: 1,
    });
    // Give the abandoned step every chance to go on.
    await sleep(300);
    expect(trail(dir)).toEqual(['enter prepare', 'enter approve']);
    expect((await engine.get(runId)).status).toBe('waiting');

    expect(await engine.signal(runId, 'approval', payload)).toEqual({ woke: true });
    expect(await engine.work({ untilIdle: true, pollMs: 50 })).toEqual({
      ...NO_WORK,
      completed: 1,
    });
    expect(trail(dir)).not.toContain('caught approve');
    expect(trail(dir).slice(2)).toEqual([
      'enter approve',
      'received approve',
      'past approve',
      'enter finish',
    ]);
  });

  it('a timeout raises WAIT_TIMEOUT, which the step catches to go on without the signal', async () => {
    const { dir, db, engine, store } = setup('signal-timeout');
    const { runId } = await engine.enqueue(
      approval,
      { dir, timeout: '1s', catchTimeout: true },
      { module: WAITS },
    );
    const started = Date.now();
    // Two carry-ons: the first left the step for the wait, the second timed out and completed.
    expect(await engine.work({ untilIdle: true, pollMs: 50 })).toEqual({
      ...NO_WORK,
      waiting: 1,
      completed: 1,
    });
    expect(Date.now() - started).toBeGreaterThanOrEqual(1_000);
    expect(trail(dir)).toEqual([
      'enter prepare',
      'enter approve',
      'enter approve',
      'caught approve WAIT_TIMEOUT',
      'past approve',
      'enter finish',
    ]);
    const wait = await waitRecord(store, runId, 'approval');
    expect(wait).toMatchObject({ status: 'timed_out', payload: null });
    expect(wait.dueAt).toBe(wait.createdAt + 1_000);
    expect((await engine.get(runId)).state).toEqual({
      dir,
      timeout: '1s',
      catchTimeout: true,
      timedOut: true,
    });

    // The run is over: a signal now has no wait to take it.
    const [late, unknown] = await Promise.all([
      keel(['--db', db, 'signal', runId, 'approval']),
      keel(['--db', db, 'signal', 'no-such-run', 'approval']),
    ]);
    expect(late.code).toBe(1);
    expect(late.stderr).toContain(
      `keel: Run ${runId} is completed: no wait of it will take the signal "approval".`,
    );
    expect(late.stderr).toContain('Signal a run that is running, queued or waiting (`keel ls`).');
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toContain('keel: No run with id "no-such-run" in this database.');
  });

  it('an uncaught timeout dead-letters the run: reason not_retryable, code WAIT_TIMEOUT', async () => {
    const { dir, engine } = setup('signal-timeout-fail');
    const { runId } = await engine.enqueue(approval, { dir, timeout: '1s' }, { module: WAITS });
    expect(await engine.work({ untilIdle: true, pollMs: 50 })).toEqual({
      ...NO_WORK,
      waiting: 1,
      failed: 1,
    });
    expect(trail(dir)).toEqual([
      'enter prepare',
      'enter approve',
      'enter approve',
      'caught approve WAIT_TIMEOUT',
    ]);
    expect(await engine.deadLetter(runId)).toMatchObject({
      step: 'approve',
      reason: 'not_retryable',
      error: { name: 'WaitTimeoutError', code: 'WAIT_TIMEOUT', wait: 'approval' },
    });
  });
});

describe('keel cancel', () => {
  it('cancels a queued run: removed from the queue, a later worker does not run it', async () => {
    const { dir, db, engine, store } = setup('cancel-queued');
    const { runId } = await engine.enqueue(
      cancelWorkflow,
      { dir, name: 'queued', ticks: 3 },
      { module: CANCEL },
    );
    const cancelled = await keelJson<RunView>(['--db', db, 'cancel', runId]);
    expect(cancelled).toMatchObject({ id: runId, status: 'cancelled', cursor: null, lease: null });
    expect(await store.getQueueEntry(runId)).toBeUndefined();

    expect(await engine.work({ untilIdle: true, pollMs: 50 })).toEqual(NO_WORK);
    expect(lines(join(dir, 'ticks.log'))).toEqual([]);
    expect(existsSync(join(dir, 'queued.txt'))).toBe(false);
    expect((await engine.get(runId)).status).toBe('cancelled');
  });

  it('cancels a run waiting for a signal; a later signal is refused', async () => {
    const { dir, db, engine, store } = setup('cancel-waiting');
    const { runId } = await engine.enqueue(approval, { dir }, { module: WAITS });
    await engine.work({ untilIdle: true, pollMs: 50 });
    expect((await engine.get(runId)).status).toBe('waiting');

    const cancelled = await keel(['--db', db, 'cancel', runId]);
    expect(cancelled.code, cancelled.stderr).toBe(0);
    expect(cancelled.stdout).toBe(`run ${runId} (q-approval): cancelled\n`);
    expect(await store.getQueueEntry(runId)).toBeUndefined();
    expect(await store.getRun(runId)).toMatchObject({ status: 'cancelled', lease: null });

    await expect(engine.signal(runId, 'approval', {})).rejects.toThrow(
      `Run ${runId} is cancelled: no wait of it will take the signal "approval".`,
    );
    expect(await engine.work({ untilIdle: true, pollMs: 50 })).toEqual(NO_WORK);
    expect(trail(dir)).toEqual(['enter prepare', 'enter approve']);
  });

  it('cancels runs a worker in another process is running, within seconds; --rollback compensates first', async () => {
    const { dir, db, engine, store } = setup('cancel-running');
    const plain = await engine.enqueue(
      cancelWorkflow,
      { dir, name: 'plain', ticks: 100 },
      { module: CANCEL },
    );
    const rolled = await engine.enqueue(
      cancelWorkflow,
      { dir, name: 'rolled', ticks: 100 },
      { module: CANCEL },
    );
    const worker = startWorker(db, '--concurrency', '2');
    const ticks = (runId: string) =>
      lines(join(dir, 'ticks.log')).filter((l) => l.startsWith(`tick ${runId} `)).length;
    await waitFor(
      () => ticks(plain.runId) >= 3 && ticks(rolled.runId) >= 3,
      30_000,
      'both runs to loop',
    );
    expect(existsSync(join(dir, 'plain.txt'))).toBe(true);
    expect(existsSync(join(dir, 'rolled.txt'))).toBe(true);

    const asked = Date.now();
    const [a, b] = await Promise.all([
      keelJson<RunView>(['--db', db, 'cancel', plain.runId]),
      keelJson<RunView & { rollback: { compensated: string[] } }>([
        '--db',
        db,
        'cancel',
        rolled.runId,
        '--rollback',
      ]),
    ]);
    const tookMs = Date.now() - asked;
    expect(a).toMatchObject({ id: plain.runId, status: 'cancelled' });
    expect(b).toMatchObject({ id: rolled.runId, status: 'cancelled' });
    // The command starts in about two seconds; the holder sees the request within one more and
    // stops the run at its next milestone: the loop's next checkpoint, 100 ms later. (Soft, so
    // that the checks below still run when the loop is not stopped there.)
    expect.soft(tookMs, 'seconds from `keel cancel` to a cancelled run').toBeLessThan(8_000);
    const stoppedAt = [ticks(plain.runId), ticks(rolled.runId)];
    for (const n of stoppedAt)
      expect.soft(n, 'iterations of 100 run before the stop').toBeLessThan(100);

    // Both stopped; the worker goes on running and is stopped cleanly.
    await sleep(400);
    expect([ticks(plain.runId), ticks(rolled.runId)]).toEqual(stoppedAt);
    expect(lines(join(dir, 'ticks.log')).filter((l) => l.startsWith('done '))).toEqual([]);
    worker.kill('SIGTERM');
    expect(reportOf(await collect(worker, 30_000))).toMatchObject({ failed: 0, errors: 0 });

    // Without --rollback the effect stays applied; with it, it was compensated.
    expect(existsSync(join(dir, 'plain.txt'))).toBe(true);
    expect(existsSync(join(dir, 'rolled.txt'))).toBe(false);
    const [plainView, rolledView] = [await engine.get(plain.runId), await engine.get(rolled.runId)];
    expect(plainView.effects.map((e) => [e.name, e.status])).toEqual([['create', 'done']]);
    expect(rolledView.effects.map((e) => [e.name, e.status])).toEqual([['create', 'compensated']]);
    for (const view of [plainView, rolledView]) {
      expect(view).toMatchObject({ status: 'cancelled', lease: null });
      expect(await store.getQueueEntry(view.id)).toBeUndefined();
    }
  });
});
