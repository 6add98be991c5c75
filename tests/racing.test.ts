/**
 * Several processes after one run: two resumers at the same instant (C05), an owner whose event loop
 * is blocked past its lease (C02), and an owner stopped with SIGSTOP past its lease. Each is a real
 * `keel` child process over one SQLite file; the database is read directly with better-sqlite3 to see
 * what each process did or did not write.
 */
import Database from 'better-sqlite3';
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { afterEach, describe, expect, it } from 'vitest';
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
import type { MailSinkLine } from './fixtures/mailer.ts';
import type { SlowSinkLine } from './fixtures/slow-step.ts';

const MAILER = join(FIXTURES, 'mailer.ts');
const SLOW = join(FIXTURES, 'slow-step.ts');

type ShownRun = {
  status: string;
  steps: { name: string; status: string }[];
  effects: { name: string; key: string; status: string }[];
};

function readDb<T>(file: string, read: (db: Database.Database) => T): T {
  const db = new Database(file, { readonly: true, fileMustExist: true });
  try {
    return read(db);
  } finally {
    db.close();
  }
}

type LeaseRow = { epoch: number; lease_pid: number | null; lease_expires_at: number | null };

function leaseOf(file: string, id: string): LeaseRow {
  return readDb(
    file,
    (db) =>
      db
        .prepare('SELECT epoch, lease_pid, lease_expires_at FROM runs WHERE id = ?')
        .get(id) as LeaseRow,
  );
}

/** Every row of the run's tables, for before/after comparisons; `omit` drops volatile columns. */
function everything(file: string, omit: string[] = []) {
  const strip = (rows: unknown[]) =>
    rows.map((row) =>
      Object.fromEntries(
        Object.entries(row as Record<string, unknown>).filter(([k]) => !omit.includes(k)),
      ),
    );
  return readDb(file, (db) => ({
    runs: strip(db.prepare('SELECT * FROM runs').all()),
    steps: strip(db.prepare('SELECT * FROM steps ORDER BY run_id, idx, epoch').all()),
    checkpoints: strip(db.prepare('SELECT * FROM checkpoints ORDER BY seq').all()),
    effects: strip(db.prepare('SELECT * FROM effects ORDER BY key').all()),
  }));
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

function expectKilled(result: KeelResult): void {
  expect({ code: result.code, signal: result.signal }).toEqual({ code: null, signal: 'SIGKILL' });
}

/** The JSON error `keel --json` prints when a command fails. */
function jsonError(result: KeelResult): { code: string; message: string } {
  return (JSON.parse(result.stdout) as { error: { code: string; message: string } }).error;
}

const children: ChildProcess[] = [];
function track(child: ChildProcess): ChildProcess {
  children.push(child);
  return child;
}

afterEach(async () => {
  // A test that failed half-way may leave a stopped or blocked child behind.
  for (const child of children.splice(0)) {
    if (child.pid && child.exitCode === null && child.signalCode === null) {
      try {
        process.kill(child.pid, 'SIGCONT');
      } catch {
        // it exited meanwhile
      }
      await killHard(child);
    }
  }
});

describe('C05: two resumes of one run', () => {
  const ROUNDS = Number(process.env.KEEL_C05_ROUNDS ?? 20);

  it(`C05: of two \`keel resume RUN\` started at the same instant, one executes and the other is told the run is owned; the mail goes out once (${ROUNDS} rounds)`, async () => {
    const root = tempDir('keel-c05-');
    // One run killed just before its mail effect; every round races on a copy of that database.
    const seed = join(root, 'seed');
    mkdirSync(seed);
    const seedDb = join(seed, 'keel.db');
    expectKilled(
      await keel(['--db', seedDb, 'run', MAILER, '--input', JSON.stringify({ to: 'ada' })], {
        env: { SINK_DIR: seed, KEEL_CRASH_AT: 'effect:before-intent' },
      }),
    );
    const seeded = readDb(seedDb, (db) => ({
      runs: db.prepare('SELECT id, status, cursor FROM runs').all() as { id: string }[],
      effects: db.prepare('SELECT key FROM effects').all(),
    }));
    expect(seeded.runs).toMatchObject([{ status: 'running', cursor: 'mail' }]);
    expect(seeded.effects).toEqual([]);
    expect(lines(join(seed, 'sink.log'))).toEqual([]);
    const runId = seeded.runs[0]!.id;
    // Fold the write-ahead log into the file, so that a plain copy holds everything.
    const folding = new Database(seedDb);
    folding.pragma('wal_checkpoint(TRUNCATE)');
    folding.close();

    for (let round = 1; round <= ROUNDS; round++) {
      const dir = join(root, `round-${round}`);
      mkdirSync(dir);
      const db = join(dir, 'keel.db');
      copyFileSync(seedDb, db);
      const go = join(dir, 'go');
      const env = { SINK_DIR: dir, GO_FILE: go };
      const a = track(spawnKeel(['--db', db, 'resume', runId], { env }));
      const b = track(spawnKeel(['--db', db, 'resume', runId], { env }));
      const results = [collect(a), collect(b)];
      // The winner waits at its mail until `go` exists: the first to answer must be the loser.
      const first = await Promise.race([
        ...results.map((r, i) => r.then(() => i)),
        new Promise<null>((r) => setTimeout(() => r(null), 20_000)),
      ]);
      writeFileSync(go, '');
      const [ra, rb] = await Promise.all(results);
      const outcomes = [ra!, rb!];
      const label = `round ${round}: ${JSON.stringify(outcomes.map((o) => [o.code, o.stderr]))}`;
      expect(outcomes.map((o) => o.code).sort(), label).toEqual([0, 1]);
      const winner = outcomes.findIndex((o) => o.code === 0);
      const loser = 1 - winner;
      expect(first, label).toBe(loser);
      expect(outcomes[loser]!.stderr, label).toMatch(
        new RegExp(`Run ${runId} (is owned by process \\d+|was claimed by another process)`),
      );
      expect(outcomes[winner]!.stdout, label).toContain(`run ${runId} (mailer): completed`);
      const sent = lines(join(dir, 'sink.log')).map((l) => JSON.parse(l) as MailSinkLine);
      expect(sent, label).toEqual([{ kind: 'mail', key: 'mail:ada', pid: [a, b][winner]!.pid }]);
    }
  });
});

describe('an owner that outlives its lease', () => {
  function slowSink(dir: string): SlowSinkLine[] {
    return lines(join(dir, 'sink.log')).map((l) => JSON.parse(l) as SlowSinkLine);
  }

  async function entered(dir: string, pid: number): Promise<string> {
    let runId = '';
    await waitFor(
      () =>
        slowSink(dir).some((l) => {
          if (l.kind === 'entered' && l.pid === pid) runId = l.runId;
          return runId !== '';
        }),
      20_000,
      `process ${pid} to enter the slow step`,
    );
    return runId;
  }

  async function leaseExpired(db: string, id: string): Promise<void> {
    const { lease_expires_at: until } = leaseOf(db, id);
    expect(until).not.toBeNull();
    await waitFor(() => Date.now() > until! + 20, 30_000, 'the lease to expire');
  }

  function expectCompletedOnce(shown: ShownRun): void {
    expect(shown.status).toBe('completed');
    expect(shown.steps.map((s) => [s.name, s.status])).toEqual([
      ['prepare', 'completed'],
      ['slow', 'completed'],
      ['finish', 'completed'],
    ]);
    expect(shown.effects.map((e) => [e.name, e.key, e.status])).toEqual([
      ['deliver', 'deliver:j-1', 'done'],
    ]);
  }

  it('C02: a step that blocks its heartbeat past the lease loses the run, and its late commit is refused (epoch)', async () => {
    const dir = tempDir('keel-c02-');
    const db = join(dir, 'keel.db');
    const unblock = join(dir, 'unblock-first');
    const release = join(dir, 'release-second');
    const first = track(
      spawnKeel(['--db', db, '--json', 'run', SLOW, '--input', JSON.stringify({ job: 'j-1' })], {
        env: { SINK_DIR: dir, KEEL_LEASE_MS: '5000', BLOCK_UNTIL: unblock },
      }),
    );
    const firstDone = collect(first, 60_000);
    const id = await entered(dir, first.pid!);

    // While the lease runs, a resume is refused even though the owner's event loop is stuck.
    const early = await keel(['--db', db, 'resume', id]);
    expect(early.code).toBe(1);
    expect(early.stderr).toContain(`Run ${id} is owned by process ${first.pid}`);
    expect(leaseOf(db, id)).toMatchObject({ epoch: 1, lease_pid: first.pid });

    await leaseExpired(db, id);
    expect(first.exitCode).toBeNull();
    expect(isAlive(first.pid!)).toBe(true);
    const second = track(
      spawnKeel(['--db', db, 'resume', id], { env: { SINK_DIR: dir, WAIT_FOR: release } }),
    );
    const secondDone = collect(second, 60_000);
    await entered(dir, second.pid!);
    expect(leaseOf(db, id)).toMatchObject({ epoch: 2, lease_pid: second.pid });

    // The first process wakes up while the second holds the run, before its effect.
    const before = everything(db, ['lease_expires_at']);
    writeFileSync(unblock, '');
    const late = await firstDone;
    expect(late.code).toBe(1);
    expect(jsonError(late)).toMatchObject({ code: 'LEASE_LOST' });
    expect(jsonError(late).message).toContain(
      `Run ${id} is no longer held at epoch 1: another process took it over.`,
    );
    expect(everything(db, ['lease_expires_at'])).toEqual(before);
    expect(slowSink(dir).filter((l) => l.kind === 'effect')).toEqual([]);

    writeFileSync(release, '');
    const done = await secondDone;
    expect(done.code, done.stderr).toBe(0);
    expect(slowSink(dir).filter((l) => l.kind === 'effect')).toEqual([
      { kind: 'effect', key: 'deliver:j-1', pid: second.pid },
    ]);
    expectCompletedOnce(await keelJson<ShownRun>(['--db', db, 'show', id]));
  });

  it('a stalled owner (SIGSTOP past its lease) cannot write once another process finished the run', async () => {
    const dir = tempDir('keel-stalled-');
    const db = join(dir, 'keel.db');
    const go = join(dir, 'go');
    const stalled = track(
      spawnKeel(['--db', db, '--json', 'run', SLOW, '--input', JSON.stringify({ job: 'j-1' })], {
        env: { SINK_DIR: dir, KEEL_LEASE_MS: '1000', WAIT_FOR: go },
      }),
    );
    const stalledDone = collect(stalled, 60_000);
    const id = await entered(dir, stalled.pid!);
    process.kill(stalled.pid!, 'SIGSTOP');
    await leaseExpired(db, id);
    expect(isAlive(stalled.pid!)).toBe(true);

    const resumer = track(spawnKeel(['--db', db, 'resume', id], { env: { SINK_DIR: dir } }));
    const takeover = await collect(resumer, 60_000);
    expect(takeover.code, takeover.stderr).toBe(0);
    const finished = everything(db);
    expect(finished.runs).toMatchObject([{ status: 'completed', epoch: 2, lease_owner: null }]);

    writeFileSync(go, '');
    process.kill(stalled.pid!, 'SIGCONT');
    const late = await stalledDone;
    expect(late.code).toBe(1);
    expect(jsonError(late)).toMatchObject({ code: 'LEASE_LOST' });
    expect(jsonError(late).message).toMatch(
      new RegExp(
        `Run ${id} (is no longer held at epoch 1: another process took it over|was taken over by another process)`,
      ),
    );
    // Not one row changed after the stalled process woke up.
    expect(everything(db)).toEqual(finished);
    expect(slowSink(dir).filter((l) => l.kind === 'effect')).toEqual([
      { kind: 'effect', key: 'deliver:j-1', pid: resumer.pid },
    ]);
    expectCompletedOnce(await keelJson<ShownRun>(['--db', db, 'show', id]));
  });
});
