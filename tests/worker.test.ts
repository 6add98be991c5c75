/**
 * `keel worker` in real child processes over one SQLite file: two workers sharing a queue, a worker
 * killed with SIGKILL and restarted while it drains (field case C25), and the graceful shutdown on
 * SIGTERM. Runs are enqueued from this process; what their steps did is read back from the files
 * the fixtures append to, and what the store holds from the database.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  openEngine,
  openSqliteStore,
  type SqliteStore,
  type WorkReport,
  type Workflow,
} from 'keel';
import type { ChildProcess } from 'node:child_process';
import {
  FIXTURES,
  collect,
  killHard,
  lines,
  spawnKeel,
  tempDir,
  waitFor,
  type KeelResult,
} from './support/index.ts';
import appendWorkflow from './fixtures/q-append.ts';
import drainWorkflow, { applied, type JournalLine } from './fixtures/q-drain.ts';
import slowWorkflow from './fixtures/q-slow.ts';

const APPEND = join(FIXTURES, 'q-append.ts');
const DRAIN = join(FIXTURES, 'q-drain.ts');
const SLOW = join(FIXTURES, 'q-slow.ts');

const children: ChildProcess[] = [];
const stores: SqliteStore[] = [];

afterEach(async () => {
  for (const child of children.splice(0)) await killHard(child);
  for (const store of stores.splice(0)) await store.close();
});

function workerArgs(db: string, ...args: string[]): string[] {
  return ['--db', db, '--json', '--no-progress', 'worker', ...args];
}

/** A worker in a child process, killed after the test if it is still alive. */
function startWorker(db: string, ...args: string[]): ChildProcess {
  const child = spawnKeel(workerArgs(db, ...args));
  children.push(child);
  return child;
}

/** The report a worker printed with --json as it stopped. */
function reportOf(result: KeelResult): WorkReport {
  expect(result.code, result.stderr).toBe(0);
  return JSON.parse(result.stdout) as WorkReport;
}

function openStore(db: string): SqliteStore {
  const store = openSqliteStore(db);
  stores.push(store);
  return store;
}

/** Enqueues `count` runs from this process; `input(i)` gives each its input. Returns their ids. */
async function enqueueMany<S extends object, N extends string>(
  db: string,
  wf: Workflow<S, N>,
  module: string,
  count: number,
  input: (i: number) => S,
): Promise<string[]> {
  const engine = openEngine({ db });
  try {
    const ids: string[] = [];
    for (let i = 0; i < count; i++)
      ids.push((await engine.enqueue(wf, input(i), { module })).runId);
    return ids;
  } finally {
    await engine.close();
  }
}

function jsonLines<T>(file: string): T[] {
  return lines(file).map((line) => JSON.parse(line) as T);
}

/** Seeded pseudo-random numbers in [0, 1) (xorshift32), so that a failing draw can be replayed. */
function randomFrom(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 4294967296;
  };
}

describe('two workers started together on 100 queued runs', () => {
  type Shared = { ids: string[]; dir: string; db: string; pids: string[]; results: KeelResult[] };
  let shared: Shared;

  beforeAll(async () => {
    const dir = tempDir('keel-two-workers-');
    const db = join(dir, 'keel.db');
    const ids = await enqueueMany(db, appendWorkflow, APPEND, 100, () => ({ dir, gate: true }));
    const workers = [0, 1].map(() => spawnKeel(workerArgs(db, '--until-idle', '--poll', '100')));
    children.push(...workers);
    const done = workers.map((w) => collect(w, 60_000));
    // Each step holds until `go`: both workers hold runs at the same time before any completes.
    const holders = () => new Set(lines(join(dir, 'entered.log')).map((l) => l.split(' ')[1]));
    await waitFor(() => holders().size === 2, 40_000, 'both workers to claim runs');
    writeFileSync(join(dir, 'go'), '');
    const results = await Promise.all(done);
    shared = { ids, dir, db, pids: workers.map((w) => String(w.pid)), results };
  });

  it('every run completed, each run id appended exactly once, by one of the two', async () => {
    const { ids, dir, db, pids, results } = shared;
    expect(results.map((r) => r.code)).toEqual([0, 0]);
    const appended = lines(join(dir, 'appends.log')).map((l) => l.split(' '));
    expect(appended).toHaveLength(100);
    expect(appended.map(([id]) => id).sort()).toEqual([...ids].sort());
    for (const [i, result] of results.entries()) {
      const mine = appended.filter(([, pid]) => pid === pids[i]).length;
      expect(mine).toBeGreaterThan(0);
      expect(reportOf(result).completed).toBe(mine);
    }
    // Every step was entered once: no run was claimed by both.
    expect(lines(join(dir, 'entered.log'))).toHaveLength(100);
    const store = openStore(db);
    const runs = await store.listRuns();
    expect(runs.map((r) => r.status)).toEqual(Array(100).fill('completed'));
    expect(await store.queueStats()).toEqual({ waiting: 0, nextDueAt: null });
  });

  it('neither worker reports a run the other completed as an error', () => {
    for (const result of shared.results) {
      expect(result.stderr).toBe('');
      expect(reportOf(result)).toMatchObject({ failed: 0, waiting: 0, other: 0, errors: 0 });
    }
  });
});

describe('runs abandoned by a killed worker', () => {
  let shared: { dir: string; db: string; ids: string[]; last: KeelResult };

  /** A worker holding two runs inside their step is killed; one worker at a time carries on. */
  beforeAll(async () => {
    const dir = tempDir('keel-abandoned-');
    const db = join(dir, 'keel.db');
    const ids = await enqueueMany(db, appendWorkflow, APPEND, 2, () => ({ dir, gate: true }));
    const killed = startWorker(db, '--concurrency', '2', '--poll', '50');
    await waitFor(
      () => lines(join(dir, 'entered.log')).length === 2,
      30_000,
      'the worker to hold both runs',
    );
    await killHard(killed);
    writeFileSync(join(dir, 'go'), '');
    const store = openSqliteStore(db);
    try {
      const runs = await store.listRuns();
      expect(runs.map((r) => [r.status, r.lease?.pid])).toEqual([
        ['running', killed.pid],
        ['running', killed.pid],
      ]);
    } finally {
      await store.close();
    }
    const last = await collect(startWorker(db, '--until-idle', '--concurrency', '1'), 60_000);
    shared = { dir, db, ids, last };
  });

  it('--until-idle does not stop while one is left running', async () => {
    const { db, ids, last } = shared;
    expect(reportOf(last)).toMatchObject({ failed: 0, errors: 0 });
    const runs = await openStore(db).listRuns();
    expect(runs.map((r) => [r.id, r.status]).sort()).toEqual(
      ids.map((id) => [id, 'completed']).sort(),
    );
  });

  it('a run carried on after its worker was killed leaves no queue entry once completed', async () => {
    const store = openStore(shared.db);
    const completed = (await store.listRuns()).filter((r) => r.status === 'completed');
    expect(completed.length).toBeGreaterThan(0);
    for (const run of completed) expect(await store.getQueueEntry(run.id), run.id).toBeUndefined();
  });
});

describe('C25: a worker killed and restarted five times while it drains', () => {
  it('completes 110 distinct runs; no step begins again after its milestone; one delivery per run', async () => {
    const seed = Number(process.env.KEEL_TEST_SEED ?? 20_250_125);
    const random = randomFrom(seed);
    const dir = tempDir('keel-c25-');
    const db = join(dir, 'keel.db');
    const ids = await enqueueMany(db, drainWorkflow, DRAIN, 110, (n) => ({ dir, n }));
    const appliedCount = () => applied(dir).length;

    const killedPids = new Set<number>();
    for (let round = 1; round <= 5; round++) {
      const worker = startWorker(db, '--poll', '50');
      const exited = collect(worker, 60_000);
      // Let it deliver a few more runs, then kill it a random moment later.
      const target = appliedCount() + 3 + Math.floor(random() * 10);
      await waitFor(() => appliedCount() >= target, 30_000, `round ${round}: ${target} deliveries`);
      await sleep(Math.floor(random() * 60));
      await killHard(worker);
      const result = await exited;
      expect(result.signal, `seed ${seed}, round ${round}: ${result.stderr}`).toBe('SIGKILL');
      killedPids.add(worker.pid!);
      expect(appliedCount(), `seed ${seed}: the queue drained before kill ${round}`).toBeLessThan(
        110,
      );
    }
    const final = await collect(startWorker(db, '--until-idle', '--poll', '50'), 60_000);
    expect(reportOf(final)).toMatchObject({ failed: 0, errors: 0 });
    const label = `seed ${seed}`;

    // 110 distinct runs, all completed, the queue empty. (Soft: the checks below still say
    // whether the runs that did complete ran any step twice.)
    const store = openStore(db);
    const runs = await store.listRuns();
    expect(runs.map((r) => r.id).sort(), label).toEqual([...ids].sort());
    const unfinished = runs.filter((r) => r.status !== 'completed');
    expect
      .soft(
        unfinished.map((r) => [r.id, r.status]),
        label,
      )
      .toEqual([]);
    expect.soft(await store.queueStats(), label).toEqual({ waiting: 0, nextDueAt: null });
    const completed = ids.filter((id) => !unfinished.some((r) => r.id === id));

    // One delivery applied per run. A kill between the sink's call and the record of its result
    // makes the step call it again, with the same key: the sink keeps one application (one marker
    // per key), and only killed processes may have called it before the last call.
    const deliveries = applied(dir);
    const keys = deliveries.map((d) => d.key);
    const runKeys = ids.map((id) => `deliver:${id}`);
    expect(
      keys.filter((key) => !runKeys.includes(key)),
      label,
    ).toEqual([]);
    expect(keys, label).toEqual(
      expect.arrayContaining(completed.map((id) => `deliver:${id}`)) as unknown,
    );
    const calls = jsonLines<{ key: string; pid: number }>(join(dir, 'calls.log'));
    for (const id of completed) {
      const callers = calls.filter((c) => c.key === `deliver:${id}`).map((c) => c.pid);
      expect(callers.length, `${label}: ${id}`).toBeGreaterThan(0);
      // Every call but the last was made by a process killed before it recorded the result.
      for (const pid of callers.slice(0, -1)) expect(killedPids.has(pid), label).toBe(true);
    }

    // Each step completed once, and no step of any run began again after its milestone: every
    // execution but the one that committed began before it, in a process that was then killed.
    const journal = jsonLines<JournalLine>(join(dir, 'journal.log'));
    let reentries = 0;
    for (const id of completed) {
      const steps = await store.listSteps(id);
      expect(
        steps.map((s) => [s.name, s.status]),
        `${label}: ${id}`,
      ).toEqual([
        ['work', 'completed'],
        ['finish', 'completed'],
      ]);
      for (const step of steps) {
        const entries = journal.filter((j) => j.runId === id && j.step === step.name);
        const committed = entries.filter((e) => e.at >= step.startedAt);
        expect(committed, `${label}: ${id} ${step.name}`).toHaveLength(1);
        expect(committed[0]!.at).toBeLessThanOrEqual(step.endedAt);
        const interrupted = entries.filter((e) => e.at < step.startedAt);
        for (const e of interrupted) expect(killedPids.has(e.pid), `${label}: ${id}`).toBe(true);
        reentries += interrupted.length;
      }
    }
    // A kill interrupts at most the four runs a worker carries at once.
    expect(reentries).toBeLessThanOrEqual(5 * 4);
  });
});

describe('graceful shutdown', () => {
  /** A worker running one `q-slow` run, sent SIGTERM while its 3-second step sleeps. */
  async function stopDuringNap(name: string, args: string[]) {
    const dir = tempDir(`keel-${name}-`);
    const db = join(dir, 'keel.db');
    const [runId] = await enqueueMany(db, slowWorkflow, SLOW, 1, () => ({ dir, napMs: 3_000 }));
    const worker = startWorker(db, '--poll', '50', ...args);
    const exited = collect(worker, 60_000);
    await waitFor(() => lines(join(dir, 'steps.log')).length > 0, 30_000, 'the nap to start');
    const stoppedAt = Date.now();
    worker.kill('SIGTERM');
    const result = await exited;
    return { dir, db, runId: runId!, worker, result, stoppedAt, exitedAt: Date.now() };
  }

  it('SIGTERM lets a step in progress finish within the grace: exit 0, the run completed', async () => {
    const { dir, db, runId, worker, result, stoppedAt, exitedAt } = await stopDuringNap(
      'graceful',
      [],
    );
    expect(reportOf(result)).toEqual({ completed: 1, failed: 0, waiting: 0, other: 0, errors: 0 });
    // It stopped as soon as its run was done, not at the end of the 10-second grace.
    expect(exitedAt - stoppedAt).toBeLessThan(8_000);
    expect(result.stderr).toContain('keel: SIGTERM: finishing the runs in hand, then stopping');
    const store = openStore(db);
    expect(await store.getRun(runId)).toMatchObject({ status: 'completed', lease: null });
    expect(lines(join(dir, 'steps.log'))).toEqual([
      `nap ${runId} ${worker.pid}`,
      `napped ${runId} ${worker.pid}`,
      `after ${runId} ${worker.pid}`,
    ]);
  });

  it('past the grace, the run is stopped at its next milestone and queued again; a new worker completes it', async () => {
    const { dir, db, runId, worker, result } = await stopDuringNap('grace-spent', [
      '--grace',
      '300',
    ]);
    expect(reportOf(result)).toEqual({ completed: 0, failed: 0, waiting: 1, other: 0, errors: 0 });
    const store = openStore(db);
    // The nap could not be interrupted; its milestone was the run's last in this worker.
    expect(await store.getRun(runId)).toMatchObject({
      status: 'waiting',
      cursor: 'after',
      lease: null,
    });
    expect(await store.getQueueEntry(runId)).toMatchObject({ reason: 'queued' });
    expect((await store.getQueueEntry(runId))!.dueAt).toBeLessThanOrEqual(Date.now());
    expect(await store.listRuns({ status: 'running' })).toEqual([]);

    const next = startWorker(db, '--until-idle', '--poll', '50');
    const finished = await collect(next, 60_000);
    expect(reportOf(finished)).toEqual({
      completed: 1,
      failed: 0,
      waiting: 0,
      other: 0,
      errors: 0,
    });
    expect(await store.getRun(runId)).toMatchObject({ status: 'completed' });
    expect(lines(join(dir, 'steps.log'))).toEqual([
      `nap ${runId} ${worker.pid}`,
      `napped ${runId} ${worker.pid}`,
      `after ${runId} ${next.pid}`,
    ]);
  });
});

describe('a run the worker cannot carry on', () => {
  const WAITING = join(FIXTURES, 'hostile-waiting.ts');
  const changed = { HOSTILE_GRAPH: 'added', KEEL_LOG: 'info' };
  const refusals = (stderr: string) =>
    stderr.split('\n').filter((l) => l.includes('a run could not be carried on'));

  /** A run waiting for `go`, signalled, and so due: but its workflow file now has another graph. */
  async function dueWithChangedGraph() {
    const dir = tempDir('keel-holdback-');
    const db = join(dir, 'keel.db');
    const started = await collect(spawnKeel(['run', WAITING, '--db', db, '--no-progress']));
    const id = /^run (\S+) \(hostile-waiting\): waiting$/m.exec(started.stdout)?.[1];
    expect(id, started.stdout).toBeDefined();
    const sent = await collect(spawnKeel(['signal', id!, 'go', '--payload', '1', '--db', db]));
    expect(sent.code, sent.stderr).toBe(0);
    return { db, id: id! };
  }

  it('--until-idle tries it once, leaves it waiting as it was, and stops; the old graph then finishes it', async () => {
    const { db, id } = await dueWithChangedGraph();
    const worker = spawnKeel(['worker', '--until-idle', '--poll', '50', '--db', db], {
      env: changed,
    });
    children.push(worker);
    const result = await collect(worker, 30_000);
    expect(result.code, result.stderr).toBe(0);
    expect(refusals(result.stderr)).toHaveLength(1);
    expect(refusals(result.stderr)[0]).toContain(`runId=${id}`);
    expect(refusals(result.stderr)[0]).toContain('step \\"extra\\" added');
    const store = openStore(db);
    expect(await store.getRun(id)).toMatchObject({ status: 'waiting', lease: null });

    const fixed = await collect(spawnKeel(['worker', '--until-idle', '--poll', '50', '--db', db]));
    expect(fixed.code, fixed.stderr).toBe(0);
    expect(await store.getRun(id)).toMatchObject({ status: 'completed' });
  });

  it('a worker that keeps running tries it again after 1 s, then 2 s: not in a loop', async () => {
    const { db } = await dueWithChangedGraph();
    const worker = spawnKeel(['worker', '--poll', '50', '--db', db], { env: changed });
    children.push(worker);
    let stderr = '';
    worker.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    await waitFor(() => refusals(stderr).length > 0, 30_000);
    // Tries at about 0, 1 and 3 s: two by the middle of that second gap.
    await sleep(2_000);
    worker.kill('SIGTERM');
    const result = await collect(worker, 30_000);
    expect(result.code).toBe(0);
    expect(refusals(stderr).map((l) => /tried again in (\d+) s/.exec(l)?.[1])).toEqual(['1', '2']);
  });
});
