/**
 * The durable queue: `enqueue` (priority, key, delay) and `keel enqueue`; dead letters and
 * `keel dlq`; parking of a failing run instead of sleeping in the worker. Runs go through real
 * SQLite files; workers run in this process (`engine.work`) unless the command line is under test.
 */
import { existsSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import {
  LlmUnavailableError,
  openEngine,
  openSqliteStore,
  workflow,
  type DeadLetterView,
  type Engine,
  type QueueEntry,
  type RunEvent,
  type SqliteStore,
} from 'keel';
import { FIXTURES, keel, keelJson, lines, tempDir } from './support/index.ts';
import appendWorkflow, { executed } from './fixtures/q-append.ts';
import { flaky, rejected } from './fixtures/q-flaky.ts';

const APPEND = join(FIXTURES, 'q-append.ts');
const FLAKY = join(FIXTURES, 'q-flaky.ts');
const IDLE_REPORT = { completed: 0, failed: 0, waiting: 0, other: 0, errors: 0 };

const opened: { close(): Promise<void> }[] = [];

afterEach(async () => {
  for (const handle of opened.splice(0).reverse()) await handle.close();
});

/** A fresh database in its own folder, with an engine over it and a second handle on its store. */
function setup(
  prefix: string,
  options: { random?: () => number; onEvent?: (event: RunEvent) => void } = {},
): { dir: string; db: string; engine: Engine; store: SqliteStore } {
  const dir = tempDir(`keel-${prefix}-`);
  const db = join(dir, 'keel.db');
  const engine = openEngine({ db, ...options });
  const store = openSqliteStore(db);
  opened.push(engine, store);
  return { dir, db, engine, store };
}

/** The queue entry of a run, which the test expects to exist. */
async function entryOf(store: SqliteStore, runId: string): Promise<QueueEntry> {
  const entry = await store.getQueueEntry(runId);
  expect(entry, `queue entry of ${runId}`).toBeDefined();
  return entry!;
}

/** What ran in this process for these runs, in order of execution. */
function labelsRun(runIds: string[]): string[] {
  return executed.filter((e) => runIds.includes(e.runId)).map((e) => e.label);
}

describe('enqueue', () => {
  it('adds a queued run that nobody holds, with a queue entry due now', async () => {
    const { dir, engine, store } = setup('enqueue');
    const before = Date.now();
    const { runId, created } = await engine.enqueue(appendWorkflow, { dir });
    const after = Date.now();
    expect(created).toBe(true);

    const view = await engine.get(runId);
    expect(view).toMatchObject({
      id: runId,
      workflow: 'q-append',
      status: 'queued',
      cursor: 'append',
      stepCount: 0,
      lease: null,
      live: false,
      input: { dir },
      state: { dir },
      steps: [],
    });
    const entry = await entryOf(store, runId);
    expect(entry).toEqual({
      runId,
      workflow: 'q-append',
      dueAt: entry.createdAt,
      priority: 0,
      parks: 0,
      waitingSince: null,
      reason: 'queued',
      lastError: null,
      history: '[]',
      createdAt: entry.createdAt,
    });
    expect(entry.createdAt).toBeGreaterThanOrEqual(before);
    expect(entry.createdAt).toBeLessThanOrEqual(after);
    expect((await store.dueRuns(Date.now(), 10)).map((e) => e.runId)).toEqual([runId]);
    // Nothing ran: enqueue only records.
    expect(lines(join(dir, 'appends.log'))).toEqual([]);
  });

  it('the same key twice adds one run: the second enqueue returns its id with created false', async () => {
    const { dir, engine, store } = setup('key');
    const first = await engine.enqueue(appendWorkflow, { dir, label: 'first' }, { key: 'k:1' });
    const second = await engine.enqueue(appendWorkflow, { dir, label: 'second' }, { key: 'k:1' });
    const other = await engine.enqueue(appendWorkflow, { dir, label: 'other' }, { key: 'k:2' });
    expect(first.created).toBe(true);
    expect(second).toEqual({ runId: first.runId, created: false });
    expect(other.created).toBe(true);
    expect(other.runId).not.toBe(first.runId);

    const runs = await engine.list();
    expect(runs.map((r) => r.id).sort()).toEqual([first.runId, other.runId].sort());
    // The run keeps the input of the enqueue that created it.
    expect((await engine.get(first.runId)).input).toEqual({ dir, label: 'first' });
    expect((await store.queueStats()).waiting).toBe(2);
  });

  it('rejects an empty key and a priority that is not an integer, adding nothing', async () => {
    const { dir, engine } = setup('bad-options');
    await expect(engine.enqueue(appendWorkflow, { dir }, { key: '' })).rejects.toThrow(
      'An enqueue key must be a non-empty string, got string "".',
    );
    await expect(engine.enqueue(appendWorkflow, { dir }, { priority: 1.5 })).rejects.toThrow(
      'A priority must be an integer, got number 1.5.',
    );
    await expect(engine.enqueue(appendWorkflow, { dir }, { delay: 'soon' })).rejects.toThrow(
      'Invalid delay: "soon".',
    );
    expect(await engine.list()).toEqual([]);
  });

  it('a concurrency-1 worker runs the highest priority first, then the oldest due', async () => {
    const { dir, engine } = setup('priority');
    const ids: string[] = [];
    const plan: [string, number][] = [
      ['low', -1],
      ['normal-1', 0],
      ['urgent', 10],
      ['high', 5],
      ['normal-2', 0],
    ];
    for (const [label, priority] of plan) {
      ids.push((await engine.enqueue(appendWorkflow, { dir, label }, { priority })).runId);
      // Distinct due times, so that the order among equal priorities is defined.
      await sleep(5);
    }
    const report = await engine.work({ concurrency: 1, untilIdle: true, pollMs: 50 });
    expect(report).toEqual({ ...IDLE_REPORT, completed: 5 });
    expect(labelsRun(ids)).toEqual(['urgent', 'high', 'normal-1', 'normal-2', 'low']);
    const runs = await engine.list();
    expect(runs.map((r) => r.status)).toEqual(Array(5).fill('completed'));
  });

  it('a delayed run is not due before its delay, and runs after a later, undelayed one', async () => {
    const { dir, engine, store } = setup('delay');
    const delayed = await engine.enqueue(
      appendWorkflow,
      { dir, label: 'delayed' },
      { priority: 10, delay: 800 },
    );
    const plain = await engine.enqueue(appendWorkflow, { dir, label: 'plain' });
    const due = await entryOf(store, delayed.runId);
    expect(due.dueAt! - due.createdAt).toBe(800);
    expect((await store.dueRuns(Date.now(), 10)).map((e) => e.runId)).toEqual([plain.runId]);

    const report = await engine.work({ concurrency: 1, untilIdle: true, pollMs: 50 });
    expect(report).toEqual({ ...IDLE_REPORT, completed: 2 });
    expect(labelsRun([delayed.runId, plain.runId])).toEqual(['plain', 'delayed']);
    const ranAt = executed.find((e) => e.runId === delayed.runId)!.at;
    expect(ranAt).toBeGreaterThanOrEqual(due.dueAt!);
  });
});

describe('keel enqueue', () => {
  it('prints the run id; --json gives { runId, created }; priority, key and delay are recorded', async () => {
    const dir = tempDir('keel-cli-enqueue-');
    const db = join(dir, 'keel.db');
    const input = ['--input', JSON.stringify({ dir })];
    const keyed = ['--db', db, 'enqueue', APPEND, ...input, '--key', 'daily:1'];
    const first = await keelJson<{ runId: string; created: boolean }>([
      ...keyed,
      '--priority',
      '3',
      '--delay',
      '30s',
    ]);
    expect(first).toEqual({ runId: expect.any(String) as unknown, created: true });
    const [againJson, againText, plain] = await Promise.all([
      keelJson<{ runId: string; created: boolean }>(keyed),
      keel(keyed),
      keel(['--db', db, 'enqueue', APPEND, ...input]),
    ]);
    expect(againJson).toEqual({ runId: first.runId, created: false });
    expect(againText.code, againText.stderr).toBe(0);
    expect(againText.stdout).toBe(
      `already queued as run ${first.runId} (key daily:1); nothing added\n`,
    );
    expect(plain.code, plain.stderr).toBe(0);
    const plainId = /^queued run (\S+)\n$/.exec(plain.stdout)?.[1];
    expect(plainId, plain.stdout).toBeDefined();

    const store = openSqliteStore(db);
    opened.push(store);
    const runs = await store.listRuns();
    expect(runs.map((r) => [r.id, r.status, r.module]).sort()).toEqual(
      [
        [first.runId, 'queued', APPEND],
        [plainId, 'queued', APPEND],
      ].sort(),
    );
    const keyedEntry = await entryOf(store, first.runId);
    expect(keyedEntry).toMatchObject({ priority: 3, reason: 'queued' });
    expect(keyedEntry.dueAt! - keyedEntry.createdAt).toBe(30_000);
    const plainEntry = await entryOf(store, plainId!);
    expect(plainEntry).toMatchObject({ priority: 0, reason: 'queued' });
    expect(plainEntry.dueAt).toBe(plainEntry.createdAt);
  });

  it('refuses a bad --priority or --delay with exit 2 and a message that says what to pass', async () => {
    const dir = tempDir('keel-cli-bad-');
    const db = join(dir, 'keel.db');
    const base = ['--db', db, 'enqueue', APPEND, '--input', JSON.stringify({ dir })];
    const [priority, fraction, delay] = await Promise.all([
      keel([...base, '--priority', 'abc']),
      keel([...base, '--priority', '1.5']),
      keel([...base, '--delay', 'soon']),
    ]);
    expect(priority.code).toBe(2);
    expect(priority.stderr).toContain(
      "error: option '--priority <n>' argument 'abc' is invalid. --priority must be an integer.",
    );
    expect(fraction.code).toBe(2);
    expect(fraction.stderr).toContain("argument '1.5' is invalid. --priority must be an integer.");
    expect(delay.code).toBe(2);
    expect(delay.stderr).toContain('keel: Invalid --delay: "soon".');
    expect(delay.stderr).toContain('Use milliseconds (a number >= 0) or a string such as "500ms"');
    for (const result of [priority, fraction, delay]) expect(result.stdout).toBe('');
  });

  it('a refused --delay leaves no database behind', async () => {
    const dir = tempDir('keel-cli-bad-delay-');
    const db = join(dir, 'keel.db');
    const refused = await keel(['--db', db, 'enqueue', APPEND, '--delay', 'soon']);
    expect(refused.code).toBe(2);
    // An input error changes nothing; here the database is created before --delay is checked.
    expect(existsSync(db)).toBe(false);
  });
});

describe('dead letters', () => {
  it('a TerminalError dead-letters the run at once: reason not_retryable, with its step and error', async () => {
    const { dir, engine, store } = setup('dlq-terminal');
    const { runId } = await engine.enqueue(rejected, { dir }, { module: FLAKY });
    const report = await engine.work({ untilIdle: true, pollMs: 50 });
    expect(report).toEqual({ ...IDLE_REPORT, failed: 1 });
    // Three attempts allowed, one made: no retry can cure it.
    expect(lines(join(dir, 'steps.log'))).toEqual([`post ${runId}`]);

    const letter = await engine.deadLetter(runId);
    const message = 'the API rejected the post: 400 Bad Request';
    expect(letter).toMatchObject({
      runId,
      workflow: 'q-rejected',
      step: 'post',
      reason: 'not_retryable',
      droppedAt: null,
      error: { name: 'TerminalError', code: 'TERMINAL', message, step: 'post' },
    });
    const history = letter.history as { at: number }[];
    expect(history).toEqual([{ at: history[0]!.at, step: 'post', attempt: 1, error: message }]);
    expect(history[0]!.at).toBeLessThanOrEqual(letter.createdAt);
    const run = await engine.get(runId);
    expect(run).toMatchObject({ status: 'failed', error: { code: 'TERMINAL', message } });
    expect(await store.getQueueEntry(runId)).toBeUndefined();
    expect((await engine.deadLetters()).map((d) => d.runId)).toEqual([runId]);
  });

  /** A run of `q-flaky` whose `flaky` step fails both its attempts, worked to its dead letter. */
  async function deadLettered(prefix: string) {
    const box = setup(prefix);
    writeFileSync(join(box.dir, 'broken'), '');
    const started = Date.now();
    const { runId } = await box.engine.enqueue(flaky, { dir: box.dir }, { module: FLAKY });
    const report = await box.engine.work({ untilIdle: true, pollMs: 50 });
    expect(report).toEqual({ ...IDLE_REPORT, failed: 1 });
    return { ...box, runId, started, ended: Date.now() };
  }

  it('a step that fails every attempt is dead-lettered with reason attempts', async () => {
    const { dir, engine, runId, started, ended } = await deadLettered('dlq-attempts');
    expect(lines(join(dir, 'steps.log'))).toEqual([
      `first ${runId}`,
      `flaky ${runId}`,
      `flaky ${runId}`,
    ]);
    const letter = await engine.deadLetter(runId);
    const error = { name: 'Error', message: 'the upstream is broken', step: 'flaky' };
    expect(letter).toMatchObject({
      runId,
      workflow: 'q-flaky',
      step: 'flaky',
      reason: 'attempts',
      droppedAt: null,
      error,
    });
    expect(letter.createdAt).toBeGreaterThanOrEqual(started);
    expect(letter.createdAt).toBeLessThanOrEqual(ended);
    // Its last entry says how many attempts were spent, and when the step gave up.
    const last = letter.history.at(-1) as { at: number };
    expect(last).toEqual({
      at: last.at,
      step: 'flaky',
      attempt: 2,
      error: 'the upstream is broken',
    });
    expect(last.at).toBeLessThanOrEqual(letter.createdAt);
    const run = await engine.get(runId);
    expect(run).toMatchObject({ status: 'failed', cursor: 'flaky', error });
    expect(run.steps.map((s) => [s.name, s.status, s.attempts])).toEqual([
      ['first', 'completed', 1],
      ['flaky', 'failed', 2],
    ]);
  });

  it("a dead letter's history lists each failed attempt with its time", async () => {
    const { engine, runId, started, ended } = await deadLettered('dlq-history');
    const letter = await engine.deadLetter(runId);
    // Documented (DeadLetter.history): "the step's attempts and the run's parks, with their times".
    const history = letter.history as { at: number; step: string; error: string }[];
    expect(history).toHaveLength(2);
    for (const entry of history) {
      expect(entry).toMatchObject({ step: 'flaky', error: 'the upstream is broken' });
      expect(entry.at).toBeGreaterThanOrEqual(started);
      expect(entry.at).toBeLessThanOrEqual(ended);
    }
    expect(history[0]!.at).toBeLessThanOrEqual(history[1]!.at);
  });

  it('keel dlq ls/show --json list the letter; dlq retry continues from the last checkpoint', async () => {
    const { dir, db, engine, store, runId } = await deadLettered('dlq-retry');

    const [listed, shown, shownText] = await Promise.all([
      keelJson<DeadLetterView[]>(['--db', db, 'dlq', 'ls']),
      keelJson<DeadLetterView>(['--db', db, 'dlq', 'show', runId]),
      keel(['--db', db, 'dlq', 'show', runId]),
    ]);
    expect(listed).toEqual([shown]);
    expect(Object.keys(shown).sort()).toEqual(
      ['createdAt', 'droppedAt', 'error', 'history', 'reason', 'runId', 'step', 'workflow'].sort(),
    );
    expect(shown).toMatchObject({
      runId,
      workflow: 'q-flaky',
      step: 'flaky',
      reason: 'attempts',
      droppedAt: null,
      error: { name: 'Error', message: 'the upstream is broken', step: 'flaky' },
    });
    expect(shown.createdAt).toEqual(expect.any(Number));
    expect(shownText.code, shownText.stderr).toBe(0);
    expect(shownText.stdout).toContain(`run       ${runId}\n`);
    expect(shownText.stdout).toContain("reason    attempts: the step's attempts are spent\n");
    expect(shownText.stdout).toContain(`retry it with \`keel dlq retry ${runId}\``);

    // Fixed: the step no longer fails. Retry queues the run again, due now.
    rmSync(join(dir, 'broken'));
    const beforeRetry = Date.now();
    const retried = await keel(['--db', db, 'dlq', 'retry', runId]);
    expect(retried.code, retried.stderr).toBe(0);
    expect(retried.stdout).toBe(`queued again: ${runId}; \`keel worker\` carries them on\n`);
    expect((await engine.get(runId)).status).toBe('waiting');
    const entry = await entryOf(store, runId);
    expect(entry).toMatchObject({ reason: 'queued', priority: 0, parks: 0 });
    expect(entry.dueAt).toBeGreaterThanOrEqual(beforeRetry);
    expect(entry.dueAt).toBeLessThanOrEqual(Date.now());
    expect(await engine.deadLetters({ includeDropped: true })).toEqual([]);

    expect(await engine.work({ untilIdle: true, pollMs: 50 })).toEqual({
      ...IDLE_REPORT,
      completed: 1,
    });
    // `first` was not run again; `flaky` ran twice before, once now; then `last`.
    expect(lines(join(dir, 'steps.log'))).toEqual([
      `first ${runId}`,
      `flaky ${runId}`,
      `flaky ${runId}`,
      `flaky ${runId}`,
      `last ${runId}`,
    ]);
    const run = await engine.get(runId);
    expect(run.status).toBe('completed');
    expect(run.state).toEqual({ dir, done: ['first', 'flaky', 'last'] });
    expect(run.steps.map((s) => [s.name, s.status])).toEqual([
      ['first', 'completed'],
      ['flaky', 'failed'],
      ['flaky', 'completed'],
      ['last', 'completed'],
    ]);
    expect(await store.getQueueEntry(runId)).toBeUndefined();
  });

  it('keel dlq drop hides a letter from ls (ls --all shows it); unknown or dropped ids exit 2', async () => {
    const { dir, db, engine } = setup('dlq-drop');
    const { runId } = await engine.enqueue(rejected, { dir }, { module: FLAKY });
    writeFileSync(join(dir, 'broken'), '');
    const kept = await engine.enqueue(flaky, { dir }, { module: FLAKY });
    expect(await engine.work({ untilIdle: true, pollMs: 50 })).toEqual({
      ...IDLE_REPORT,
      failed: 2,
    });
    const beforeDrop = Date.now();
    const dropped = await keel(['--db', db, 'dlq', 'drop', runId]);
    expect(dropped.code, dropped.stderr).toBe(0);
    expect(dropped.stdout).toBe(`dropped ${runId} from the dead-letter queue\n`);

    const [listed, all, retryDropped, retryUnknown, dropUnknown, dropAgain, retryNothing] =
      await Promise.all([
        keelJson<DeadLetterView[]>(['--db', db, 'dlq', 'ls']),
        keelJson<DeadLetterView[]>(['--db', db, 'dlq', 'ls', '--all']),
        keel(['--db', db, 'dlq', 'retry', runId]),
        keel(['--db', db, 'dlq', 'retry', 'no-such-run']),
        keel(['--db', db, 'dlq', 'drop', 'no-such-run']),
        keel(['--db', db, 'dlq', 'drop', runId]),
        keel(['--db', db, 'dlq', 'retry']),
      ]);
    expect(listed.map((d) => d.runId)).toEqual([kept.runId]);
    expect(all.map((d) => d.runId).sort()).toEqual([runId, kept.runId].sort());
    const droppedLetter = all.find((d) => d.runId === runId)!;
    expect(droppedLetter).toMatchObject({ reason: 'not_retryable', step: 'post' });
    expect(droppedLetter.droppedAt).toBeGreaterThanOrEqual(beforeDrop);
    expect(all.find((d) => d.runId === kept.runId)!.droppedAt).toBeNull();
    for (const [result, id] of [
      [retryDropped, runId],
      [retryUnknown, 'no-such-run'],
      [dropUnknown, 'no-such-run'],
      [dropAgain, runId],
    ] as const) {
      expect(result.code, result.stderr).toBe(2);
      expect(result.stderr).toContain(`keel: Run "${id}" is not in the dead-letter queue.`);
      expect(result.stderr).toContain('List dead letters with `keel dlq ls`.');
    }
    expect(retryNothing.code).toBe(2);
    expect(retryNothing.stderr).toContain('keel: Give a run id, or --all.');
    // The dropped run itself stays failed, untouched by the refused retry.
    expect((await engine.get(runId)).status).toBe('failed');

    // --all queues again every letter still listed, and not the dropped one.
    const retried = await keelJson<{ retried: string[] }>(['--db', db, 'dlq', 'retry', '--all']);
    expect(retried).toEqual({ retried: [kept.runId] });
    expect((await engine.get(kept.runId)).status).toBe('waiting');
    expect((await engine.get(runId)).status).toBe('failed');
  });
});

describe('parking', () => {
  it('a long retry backoff parks the run in a worker: waiting, reason parked, due after the backoff', async () => {
    const stop = new AbortController();
    const { dir, engine, store } = setup('park', {
      // Full jitter draws the backoff in [0, 5 s): pin the draw near the top.
      random: () => 0.99,
      onEvent: (e) => e.type === 'run-parked' && stop.abort(),
    });
    let calls = 0;
    const wf = workflow<{ dir: string }>('q-park', { version: 1 }).step(
      'call',
      () => {
        calls += 1;
        throw new Error('503 from upstream');
      },
      { retry: { attempts: 3, backoff: '5s' } },
    );
    const { runId } = await engine.enqueue(wf, { dir });
    const started = Date.now();
    const report = await engine.work({ signal: stop.signal, pollMs: 50 });
    // Parked rather than slept: the worker was free again long before the backoff ended.
    expect(Date.now() - started).toBeLessThan(3_000);
    expect(report).toEqual({ ...IDLE_REPORT, waiting: 1 });
    expect(calls).toBe(1);

    const run = await engine.get(runId);
    expect(run).toMatchObject({ status: 'waiting', cursor: 'call', lease: null, live: false });
    const entry = await entryOf(store, runId);
    const history = JSON.parse(entry.history) as { at: number; waitMs: number }[];
    expect(history).toEqual([
      { at: history[0]!.at, step: 'call', error: '503 from upstream', waitMs: 4_950 },
    ]);
    expect(entry).toMatchObject({ reason: 'parked', parks: 1, waitingSince: history[0]!.at });
    expect(entry.dueAt).toBe(history[0]!.at + 4_950);
    expect(JSON.parse(entry.lastError!)).toMatchObject({
      name: 'Error',
      message: '503 from upstream',
    });
    // The failed attempt is counted: the next one is the step's second.
    expect(run.steps).toEqual([expect.objectContaining({ name: 'call', attempts: 2 })]);
  });

  it('an LLM outage past the workflow maxWait is dead-lettered with reason wait_limit', async () => {
    const { dir, engine, store } = setup('wait-limit', { random: () => 0.99 });
    const wf = workflow<{ dir: string }>('q-outage-limit', { version: 1, maxWait: '1ms' }).step(
      'ask',
      () => {
        throw new LlmUnavailableError('down', [], undefined);
      },
    );
    const { runId } = await engine.enqueue(wf, { dir });
    const report = await engine.work({ untilIdle: true, pollMs: 50 });
    expect(report).toEqual({ ...IDLE_REPORT, failed: 1 });
    const letter = await engine.deadLetter(runId);
    expect(letter).toMatchObject({
      runId,
      step: 'ask',
      reason: 'wait_limit',
      error: {
        name: 'LlmUnavailableError',
        code: 'LLM_UNAVAILABLE',
        message: expect.stringMatching(/^down/) as unknown,
      },
    });
    expect((await engine.get(runId)).status).toBe('failed');
    expect(await store.getQueueEntry(runId)).toBeUndefined();
  });

  it("an LLM outage within maxWait parks the run for at least the error's retryAfterMs", async () => {
    const stop = new AbortController();
    const { dir, engine, store } = setup('outage', {
      random: () => 0.99,
      onEvent: (e) => e.type === 'run-parked' && stop.abort(),
    });
    let calls = 0;
    const wf = workflow<{ dir: string }>('q-outage', { version: 1 }).step('ask', () => {
      calls += 1;
      throw new LlmUnavailableError('down', [], 30_000);
    });
    const { runId } = await engine.enqueue(wf, { dir });
    const before = Date.now();
    const report = await engine.work({ signal: stop.signal, pollMs: 50 });
    expect(report).toEqual({ ...IDLE_REPORT, waiting: 1 });
    expect(calls).toBe(1);

    const entry = await entryOf(store, runId);
    expect(entry).toMatchObject({ reason: 'parked', parks: 1 });
    expect(entry.dueAt! - before).toBeGreaterThanOrEqual(30_000);
    const history = JSON.parse(entry.history) as { at: number }[];
    expect(history).toEqual([
      { at: entry.dueAt! - 30_000, step: 'ask', error: 'down', waitMs: 30_000 },
    ]);
    const run = await engine.get(runId);
    expect(run.status).toBe('waiting');
    // An outage spends none of the step's attempts.
    expect(run.steps).toEqual([expect.objectContaining({ name: 'ask', attempts: 1 })]);
    await expect(engine.deadLetter(runId)).rejects.toThrow('is not in the dead-letter queue');
  });
});
