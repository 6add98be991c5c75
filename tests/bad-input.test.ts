/**
 * Bad input through the real `keel` command: each gets a message that says what is wrong and what
 * to do, exit status 2 (a failed run is 1), and nothing is written: no database is created for a
 * command that was refused, and a database keel cannot use keeps every byte.
 */
import Database from 'better-sqlite3';
import { createHash, randomBytes } from 'node:crypto';
import {
  closeSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  openSync,
  readFileSync,
  readdirSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { openEngine, openSqliteStore, workflow } from 'keel';
import { alpha } from './fixtures/bad-two.ts';
import { FIXTURES, ROOT, keel, keelJson, tempDir, type KeelResult } from './support/index.ts';

const TWO = join(FIXTURES, 'bad-two.ts');
const KNOWN_MIGRATIONS = (
  JSON.parse(readFileSync(join(ROOT, 'migrations/meta/_journal.json'), 'utf8')) as {
    entries: unknown[];
  }
).entries.length;

const sha256 = (file: string) => createHash('sha256').update(readFileSync(file)).digest('hex');

function expectUsageError(result: KeelResult, fragments: string[]): void {
  const context = `stdout:\n${result.stdout}\nstderr:\n${result.stderr}`;
  expect(result.code, context).toBe(2);
  expect(result.stdout, context).toBe('');
  for (const fragment of fragments) expect(result.stderr, context).toContain(fragment);
}

async function runIds(db: string): Promise<string[]> {
  const store = openSqliteStore(db);
  try {
    return (await store.listRuns()).map((r) => r.id);
  } finally {
    await store.close();
  }
}

describe('bad input on the command line', () => {
  const dir = tempDir('keel-bad-');
  const db = join(dir, 'keel.db');
  /** A database path in a folder that does not exist: refused commands must create neither. */
  const untouched = join(dir, 'never', 'keel.db');
  let runId: string;

  beforeAll(async () => {
    const input = join(dir, 'input.json');
    writeFileSync(input, '{"n": 41}');
    const run = await keel(['run', TWO, '--workflow', 'alpha', '--input', `@${input}`, '--db', db]);
    expect(run.code, run.stderr).toBe(0);
    [runId] = (await runIds(db)) as [string];
  });

  function expectNothingCreated(): void {
    expect(existsSync(join(dir, 'never'))).toBe(false);
  }

  it.each(['show', 'resume', 'rollback'])(
    'keel %s of an unknown run id exits 2, names the id and suggests keel ls',
    async (command) => {
      const result = await keel([command, 'nope', '--db', db]);
      expectUsageError(result, [
        'No run with id "nope" in this database.',
        'List runs with `keel ls`',
      ]);
      expect(await runIds(db)).toStrictEqual([runId]);
    },
  );

  it('an unknown run id with --json prints the error as JSON, with its code', async () => {
    const result = await keel(['show', 'nope', '--db', db, '--json']);
    expect(result.code).toBe(2);
    const { error } = JSON.parse(result.stdout) as { error: Record<string, unknown> };
    expect(error).toMatchObject({
      name: 'InputError',
      code: 'NOT_FOUND',
      message: expect.stringContaining('No run with id "nope" in this database.') as unknown,
    });
  });

  it.each([
    [
      'does not exist',
      ['run', join(FIXTURES, 'bad-missing.ts')],
      [`Workflow file ${join(FIXTURES, 'bad-missing.ts')} does not exist.`],
    ],
    [
      'throws while loading',
      ['run', join(FIXTURES, 'bad-throws.ts')],
      [
        `Workflow file ${join(FIXTURES, 'bad-throws.ts')} failed to load: bad-throws: the config file it needs is missing`,
      ],
    ],
    [
      'exports no workflow',
      ['run', join(FIXTURES, 'bad-none.ts')],
      [`${join(FIXTURES, 'bad-none.ts')} exports no workflow.`, 'export default workflow<State>('],
    ],
    [
      'exports two workflows and no --workflow picks one',
      ['run', TWO],
      [`${TWO} exports several workflows: alpha, beta.`, 'Choose one with --workflow NAME.'],
    ],
    [
      'has no workflow of the --workflow name',
      ['run', TWO, '--workflow', 'gamma'],
      [`${TWO} has no workflow named "gamma".`, 'It exports: alpha, beta.'],
    ],
  ])(
    'a workflow file that %s: exit 2, a clear message, no database',
    async (_what, args, fragments) => {
      expectUsageError(await keel([...args, '--db', untouched]), fragments);
      expectNothingCreated();
    },
  );

  it.each([
    ['is not JSON', '{nope', ['--input is not valid JSON:', '--input \'{"topic": "leases"}\'']],
    ['is a JSON array', '[1, 2]', ['--input must be a JSON object.', 'Got [1, 2]']],
    ['is a JSON string', '"leases"', ['--input must be a JSON object.']],
    [
      'names a file that does not exist',
      '@no-such-input.json',
      [
        `Input file ${join(ROOT, 'no-such-input.json')} does not exist.`,
        '--input @path/to/input.json',
      ],
    ],
  ])(
    'an --input that %s: exit 2, a clear message, no database',
    async (_what, input, fragments) => {
      const result = await keel([
        'run',
        TWO,
        '--workflow',
        'alpha',
        '--input',
        input,
        '--db',
        untouched,
      ]);
      expectUsageError(result, fragments);
      expectNothingCreated();
    },
  );

  it('a run that fails exits 1, not 2', async () => {
    const failing = join(dir, 'failing.db');
    const result = await keel(['run', TWO, '--workflow', 'beta', '--db', failing, '--no-progress']);
    expect(result.code, result.stderr).toBe(1);
    expect(result.stdout).toContain('(beta): failed');
    expect(result.stdout).toContain('error: beta always fails');
  });

  it('keel ls on a database path that does not exist: exit 2, and no file or folder is created', async () => {
    expectUsageError(await keel(['ls', '--db', untouched]), [
      `No keel database at ${untouched}.`,
      'Start a run first with `keel run FILE`',
    ]);
    expectNothingCreated();
  });

  it('keel resume with neither a run id nor --all: exit 2', async () => {
    expectUsageError(await keel(['resume', '--db', db]), [
      'Give a run id, or --all.',
      'List runs with `keel ls`.',
    ]);
  });

  it('keel ls with an invalid --status: exit 2, the allowed statuses listed', async () => {
    const result = await keel(['ls', '--status', 'done', '--db', db]);
    expect(result.code).toBe(2);
    expect(result.stdout).toBe('');
    expect(result.stderr).toContain("option '--status <status>' argument 'done' is invalid.");
    expect(result.stderr).toContain(
      'Allowed choices are running, waiting, completed, failed, compensating, rolled_back, compensation_failed, queued, cancelled.',
    );
  });

  it('generated run ids never begin with "-", which the command line would read as an option', async () => {
    const ids = join(dir, 'ids.db');
    const engine = openEngine({ db: ids });
    const started: string[] = [];
    try {
      for (let i = 0; i < 400; i++) started.push((await engine.start(alpha, {})).id);
    } finally {
      await engine.close();
    }
    expect(new Set(started).size).toBe(400);
    expect(started.filter((id) => id.startsWith('-'))).toStrictEqual([]);
  });
});

describe('databases keel cannot use are refused and left exactly as they were', () => {
  const dir = tempDir('keel-bad-db-');
  /** A real keel database with 60 runs, each with a 3 KB state: well over a few pages. */
  const keelDb = join(dir, 'source.db');
  let runId: string;

  beforeAll(async () => {
    const engine = openEngine({ db: keelDb });
    try {
      for (let i = 0; i < 60; i++) {
        runId = (await engine.start(alpha, { padding: `${i}:`.padEnd(3_000, 'x') })).id;
      }
    } finally {
      await engine.close();
    }
    // Everything is in the main file: closing the last connection checkpointed the WAL.
    expect(existsSync(`${keelDb}-wal`)).toBe(false);
  });

  /** A copy of the source database in a folder of its own, so that leftovers can be seen. */
  function copyOfKeelDb(name: string): string {
    const folder = join(dir, name);
    mkdirSync(folder);
    const file = join(folder, 'keel.db');
    copyFileSync(keelDb, file);
    return file;
  }

  async function expectRefusedUntouched(file: string, fragments: string[]): Promise<void> {
    const before = sha256(file);
    const listing = readdirSync(join(file, '..')).sort();
    for (const args of [['ls'], ['run', TWO, '--workflow', 'alpha']]) {
      expectUsageError(await keel([...args, '--db', file, '--no-progress']), fragments);
      expect(sha256(file)).toBe(before);
    }
    expect(readdirSync(join(file, '..')).sort()).toStrictEqual(listing);
  }

  it('a file that is not SQLite (random bytes) is refused, every byte kept', async () => {
    const file = join(dir, 'random', 'keel.db');
    mkdirSync(join(dir, 'random'));
    writeFileSync(file, randomBytes(16 * 1024));
    await expectRefusedUntouched(file, [
      `${file} is not a SQLite database (or its header is damaged); keel left it untouched.`,
    ]);
  });

  it("another application's SQLite database is refused, every byte kept", async () => {
    const file = join(dir, 'other-app', 'keel.db');
    mkdirSync(join(dir, 'other-app'));
    const other = new Database(file);
    other.exec('CREATE TABLE invoices (id INTEGER PRIMARY KEY, customer TEXT, total REAL)');
    other.exec('CREATE TABLE customers (name TEXT PRIMARY KEY)');
    other.prepare('INSERT INTO invoices (customer, total) VALUES (?, ?)').run('acme', 12.5);
    other.close();
    await expectRefusedUntouched(file, [
      `${file} is a SQLite database of another application (tables: invoices, customers), not a keel database; keel left it untouched.`,
      'Give keel a database of its own',
    ]);
  });

  it("another application's SQLite database with no tables but its own schema version is refused, every byte kept", async () => {
    const file = join(dir, 'other-empty', 'keel.db');
    mkdirSync(join(dir, 'other-empty'));
    const other = new Database(file);
    other.pragma('user_version = 7');
    other.close();
    await expectRefusedUntouched(file, [
      `${file} is a SQLite database of another application, not a keel database; keel left it untouched.`,
    ]);
  });

  it('a keel database from a newer schema is refused, naming both versions, every byte kept', async () => {
    const file = copyOfKeelDb('newer');
    const newer = new Database(file);
    newer.pragma(`user_version = ${KNOWN_MIGRATIONS + 5}`);
    newer.close();
    await expectRefusedUntouched(file, [
      `${file} was written by a newer keel (schema ${KNOWN_MIGRATIONS + 5}; this keel knows up to ${KNOWN_MIGRATIONS}); keel left it untouched.`,
      'Upgrade keel',
    ]);
  });

  /** Zeroes three pages in the middle of the file, one of them a leaf of the runs table. */
  function corrupt(file: string): void {
    const raw = new Database(file, { readonly: true });
    const pageSize = raw.pragma('page_size', { simple: true }) as number;
    const pages = raw.pragma('page_count', { simple: true }) as number;
    const leaves = (
      raw
        .prepare(
          "SELECT pageno FROM dbstat WHERE name = 'runs' AND pagetype = 'leaf' ORDER BY pageno",
        )
        .all() as { pageno: number }[]
    ).map((r) => r.pageno);
    raw.close();
    expect(pages).toBeGreaterThan(60);
    expect(leaves.length).toBeGreaterThan(1);
    const middle = leaves.reduce((best, page) =>
      Math.abs(page - pages / 2) < Math.abs(best - pages / 2) ? page : best,
    );
    const fd = openSync(file, 'r+');
    try {
      for (const page of [middle - 1, middle, middle + 1]) {
        writeSync(fd, Buffer.alloc(pageSize), 0, pageSize, (page - 1) * pageSize);
      }
    } finally {
      closeSync(fd);
    }
  }

  it('a corrupt keel database gets a clear "damaged" error from keel ls, every byte kept', async () => {
    const file = copyOfKeelDb('corrupt-read');
    corrupt(file);
    const before = sha256(file);
    expectUsageError(await keel(['ls', '--db', file]), [
      `${file} is damaged (quick_check: *** in database main ***`,
      'keel left it untouched.',
      'PRAGMA integrity_check',
    ]);
    expect(sha256(file)).toBe(before);
  });

  // Without a page check on open, `keel run` on a damaged database inserted its run wherever the
  // b-trees still allowed and reported success.
  it('a corrupt keel database is refused by keel run too, every byte kept', async () => {
    const file = copyOfKeelDb('corrupt-write');
    corrupt(file);
    const before = sha256(file);
    expectUsageError(
      await keel(['run', TWO, '--workflow', 'alpha', '--db', file, '--no-progress']),
      [`${file} is damaged`],
    );
    expect(sha256(file)).toBe(before);
  });

  it('a locked database fails a write after the busy timeout with a clear "locked" error; readers go on', async () => {
    const file = copyOfKeelDb('locked');
    const holder = new Database(file);
    holder.exec('BEGIN EXCLUSIVE');
    try {
      const before = sha256(file);
      const env = { KEEL_BUSY_TIMEOUT_MS: '250' };
      expectUsageError(
        await keel(['run', TWO, '--workflow', 'alpha', '--db', file, '--no-progress'], { env }),
        [
          `${file} is locked by another process, and stayed locked past the busy timeout.`,
          'raise busyTimeoutMs',
        ],
      );
      expectUsageError(await keel(['rollback', runId, '--db', file, '--no-progress'], { env }), [
        `${file} is locked by another process, and stayed locked past the busy timeout.`,
      ]);
      // In WAL mode a writer's lock does not stop readers.
      const ls = await keel(['ls', '--db', file], { env });
      expect(ls.code, ls.stderr).toBe(0);
      expect(ls.stdout).toContain(runId);
      expect(sha256(file)).toBe(before);
    } finally {
      holder.exec('ROLLBACK');
      holder.close();
    }
    expect((await runIds(file)).length).toBe(60);
    expect(
      (await keel(['run', TWO, '--workflow', 'alpha', '--db', file, '--no-progress'])).code,
    ).toBe(0);
    expect((await runIds(file)).length).toBe(61);
  });

  it('openEngine({ busyTimeoutMs }) on a locked database rejects with a DatabaseError that says locked', async () => {
    const file = copyOfKeelDb('locked-api');
    const holder = new Database(file);
    holder.exec('BEGIN EXCLUSIVE');
    try {
      const attempt = async () => {
        const engine = openEngine({ db: file, busyTimeoutMs: 100 });
        try {
          await engine.start(alpha, {});
        } finally {
          await engine.close();
        }
      };
      await expect(attempt()).rejects.toMatchObject({
        name: 'DatabaseError',
        code: 'DATABASE',
        message: expect.stringContaining(
          `${file} is locked by another process, and stayed locked past the busy timeout.`,
        ) as unknown,
      });
    } finally {
      holder.exec('ROLLBACK');
      holder.close();
    }
    expect((await runIds(file)).length).toBe(60);
  });

  it('the database the bad cases are copied from is a healthy keel database (so the damage is what they see)', async () => {
    const file = copyOfKeelDb('listing');
    const list = await keelJson<{ id: string }[]>(['ls', '--db', file]);
    expect(list).toHaveLength(60);
    expect(list.map((r) => r.id)).toContain(runId);
  });
});

describe('inputs keel cannot start a run with', () => {
  it('an input over the state limit is a usage error (exit 2) and creates no run', async () => {
    const dir = tempDir('keel-big-input-');
    const db = join(dir, 'keel.db');
    const file = join(dir, 'big.json');
    writeFileSync(file, JSON.stringify({ blob: 'x'.repeat(2048) }));
    const result = await keel(
      ['run', TWO, '--workflow', 'alpha', '--db', db, '--input', `@${file}`],
      {
        env: { KEEL_MAX_STATE_BYTES: '1024' },
      },
    );
    expect(result.code).toBe(2);
    expect(result.stderr).toContain('The input of workflow "alpha" is too large to start a run:');
    expect(result.stderr).toContain('over the limit of 0.0 MB');
    expect((await keelJson<unknown[]>(['ls', '--db', db])).length).toBe(0);
  });

  it('KEEL_MAX_STATE_BYTES that is not a positive number is refused, not ignored', async () => {
    const dir = tempDir('keel-big-input-');
    const result = await keel(['run', TWO, '--workflow', 'alpha', '--db', join(dir, 'k.db')], {
      env: { KEEL_MAX_STATE_BYTES: 'lots' },
    });
    expect(result.code).toBe(2);
    expect(result.stderr).toContain('KEEL_MAX_STATE_BYTES=lots is not a positive number of bytes.');
  });
});

describe('a database locked past the busy timeout in the middle of a run', () => {
  /** Another connection takes the write lock now and lets go after `ms`. */
  function lockFor(file: string, ms: number): void {
    const holder = new Database(file);
    holder.exec('BEGIN IMMEDIATE');
    setTimeout(() => {
      holder.exec('COMMIT');
      holder.close();
    }, ms);
  }

  it('a step whose milestone meets the lock waits it out and runs again; the run completes, nothing spent', async () => {
    const db = join(tempDir('keel-busy-'), 'keel.db');
    let executions = 0;
    const wf = workflow<{ n: number }>('busy-step', { version: 1 })
      .step('first', (state) => {
        executions += 1;
        if (executions === 1) lockFor(db, 700);
        state.n += 1;
      })
      .step('second', (state) => {
        state.n += 10;
      });
    const engine = openEngine({ db, busyTimeoutMs: 100 });
    try {
      const run = await engine.start(wf, { n: 0 });
      expect(run.error).toBeNull();
      expect(run.status).toBe('completed');
      expect(run.state).toEqual({ n: 11 });
      expect(executions).toBeGreaterThanOrEqual(2);
      const view = await engine.get(run.id);
      expect(view.steps.map((s) => [s.name, s.status, s.attempts])).toEqual([
        ['first', 'completed', 1],
        ['second', 'completed', 1],
      ]);
    } finally {
      await engine.close();
    }
  });

  it('an effect step whose record meets the lock runs again with the same key and completes', async () => {
    const db = join(tempDir('keel-busy-'), 'keel.db');
    const calls: string[] = [];
    const wf = workflow<{ sent?: string }>('busy-effect', { version: 1 }).effect('send', {
      key: () => 'send:1',
      run: (_state, { key }) => {
        calls.push(key);
        if (calls.length === 1) lockFor(db, 700);
        return `receipt ${calls.length}`;
      },
      save: (state, receipt) => {
        state.sent = receipt;
      },
    });
    const engine = openEngine({ db, busyTimeoutMs: 100 });
    try {
      const run = await engine.start(wf, {});
      expect(run.error).toBeNull();
      expect(run.status).toBe('completed');
      expect(new Set(calls)).toEqual(new Set(['send:1']));
      expect(run.state).toEqual({ sent: `receipt ${calls.length}` });
      const view = await engine.get(run.id);
      expect(view.effects.map((e) => [e.key, e.status])).toEqual([['send:1', 'done']]);
    } finally {
      await engine.close();
    }
  });
});
