/**
 * C15: a migration that rebuilds the runs table, as drizzle-kit generates it for SQLite, must keep
 * every row of every table; and two processes creating the same new database must both get it.
 */
import Database from 'better-sqlite3';
import { spawn } from 'node:child_process';
import {
  copyFileSync,
  cpSync,
  existsSync,
  mkdirSync,
  readFileSync,
  readdirSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { drizzle } from 'drizzle-orm/better-sqlite3';
import { migrate } from 'drizzle-orm/better-sqlite3/migrator';
import { beforeAll, describe, expect, it } from 'vitest';
import { openEngine, workflow } from 'keel';
import { KEEL_APPLICATION_ID, openDatabase } from '../adapters/sqlite/open.ts';
import { ROOT, collect, tempDir, waitFor } from './support/index.ts';

type Journal = {
  version: string;
  dialect: string;
  entries: { idx: number; version: string; when: number; tag: string; breakpoints: boolean }[];
};

const MIGRATIONS = join(ROOT, 'migrations');
const journal = () =>
  JSON.parse(readFileSync(join(MIGRATIONS, 'meta/_journal.json'), 'utf8')) as Journal;

type Counted = { n: number; notes: string[] };

const pipeline = workflow<Counted>('migrate-data', { version: 1 })
  .step('gather', async (s, ctx) => {
    for (let i = 0; i < 3; i++) {
      s.notes.push(`note ${s.n}.${i}`);
      await ctx.checkpoint();
    }
  })
  .step('charge', async (s, ctx) => {
    const paid = await ctx.effect('charge', {
      key: `charge:${s.n}`,
      run: () => ({ receipt: `r-${s.n}` }),
    });
    s.notes.push(paid.receipt);
  })
  .effect('publish', { key: (s) => `publish:${s.n}`, run: (s) => ({ path: `/out/${s.n}` }) })
  .step('finish', (s) => {
    if (s.n === 3) throw new Error('the third run fails at its last step');
    s.n += 100;
  });

function tablesOf(sqlite: Database.Database): string[] {
  return (
    sqlite
      .prepare(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
      )
      .all() as { name: string }[]
  ).map((t) => t.name);
}

function countRows(file: string): Record<string, number> {
  const sqlite = new Database(file, { readonly: true });
  try {
    return Object.fromEntries(
      tablesOf(sqlite).map((table) => [
        table,
        (sqlite.prepare(`SELECT count(*) AS n FROM "${table}"`).get() as { n: number }).n,
      ]),
    );
  } finally {
    sqlite.close();
  }
}

function readAll(file: string, table: string, order: string): unknown[] {
  const sqlite = new Database(file, { readonly: true });
  try {
    return sqlite.prepare(`SELECT * FROM "${table}" ORDER BY ${order}`).all();
  } finally {
    sqlite.close();
  }
}

function runsTableSql(file: string): string {
  const sqlite = new Database(file, { readonly: true });
  try {
    return (
      sqlite
        .prepare("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'runs'")
        .get() as {
        sql: string;
      }
    ).sql;
  } finally {
    sqlite.close();
  }
}

/**
 * A migrations folder: keel's own migrations plus one that rebuilds `runs` to give `status` a
 * default, which SQLite cannot do in place. The statements are the ones drizzle-kit writes for such
 * a change: foreign keys off, a `__new_runs` copy, DROP, RENAME, foreign keys on, the indexes again.
 */
function migrationsWithRebuild(db: string, folder: string): { tag: string; count: number } {
  cpSync(MIGRATIONS, folder, { recursive: true });
  const sqlite = new Database(db, { readonly: true });
  let create: string;
  let columns: string[];
  let indexes: string[];
  try {
    create = runsTableSql(db);
    columns = (sqlite.pragma('table_info(runs)') as { name: string }[]).map((c) => c.name);
    indexes = (
      sqlite
        .prepare(
          "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'runs' AND sql IS NOT NULL",
        )
        .all() as { sql: string }[]
    ).map((i) => i.sql);
  } finally {
    sqlite.close();
  }
  const rebuilt = create
    .replace(/^CREATE TABLE [`"]?runs[`"]?/, 'CREATE TABLE `__new_runs`')
    .replace('`status` text NOT NULL', "`status` text DEFAULT 'running' NOT NULL");
  expect(rebuilt).toContain('CREATE TABLE `__new_runs`');
  expect(rebuilt).toContain("`status` text DEFAULT 'running' NOT NULL");
  const list = columns.map((c) => `"${c}"`).join(', ');
  const statements = [
    'PRAGMA foreign_keys=OFF;',
    `${rebuilt};\n`,
    `INSERT INTO \`__new_runs\`(${list}) SELECT ${list} FROM \`runs\`;`,
    'DROP TABLE `runs`;',
    'ALTER TABLE `__new_runs` RENAME TO `runs`;',
    'PRAGMA foreign_keys=ON;',
    ...indexes.map((sql) => `${sql};`),
  ];
  const meta = journal();
  const last = meta.entries.at(-1)!;
  const idx = meta.entries.length;
  const tag = `${String(idx).padStart(4, '0')}_rebuild_runs`;
  writeFileSync(join(folder, `${tag}.sql`), statements.join('--> statement-breakpoint\n'));
  meta.entries.push({
    idx,
    version: last.version,
    when: last.when + 1_000,
    tag,
    breakpoints: true,
  });
  writeFileSync(join(folder, 'meta/_journal.json'), JSON.stringify(meta, null, 2));
  return { tag, count: meta.entries.length };
}

describe('C15: a migration that rebuilds the runs table keeps data', () => {
  const dir = tempDir('keel-migrate-');
  const source = join(dir, 'source.db');
  const folder = join(dir, 'migrations');
  let before: Record<string, number>;
  let migrationCount: number;

  beforeAll(async () => {
    const engine = openEngine({ db: source });
    try {
      const statuses: string[] = [];
      for (let n = 1; n <= 4; n++)
        statuses.push((await engine.start(pipeline, { n, notes: [] })).status);
      expect(statuses).toStrictEqual(['completed', 'completed', 'failed', 'completed']);
    } finally {
      await engine.close();
    }
    expect(existsSync(`${source}-wal`)).toBe(false);
    before = countRows(source);
    expect(before).toMatchObject({
      runs: 4,
      steps: 16,
      effects: 8,
      __drizzle_migrations: readdirSync(MIGRATIONS).filter((f) => f.endsWith('.sql')).length,
    });
    expect(before.checkpoints).toBeGreaterThanOrEqual(4 * 5);
    migrationCount = migrationsWithRebuild(source, folder).count;
    expect(migrationCount).toBe(journal().entries.length + 1);
  });

  function copy(name: string): string {
    const file = join(dir, `${name}.db`);
    copyFileSync(source, file);
    return file;
  }

  it('C15: keel applies the rebuild with every row of every table kept and foreign keys clean', async () => {
    const file = copy('keel-migrator');
    const rowsBefore = {
      runs: readAll(file, 'runs', 'id'),
      steps: readAll(file, 'steps', 'run_id, idx, epoch'),
      effects: readAll(file, 'effects', 'run_id, key'),
      checkpoints: readAll(file, 'checkpoints', 'run_id, seq'),
    };

    const sqlite = openDatabase(file, { migrationsFolder: folder });
    try {
      expect(sqlite.pragma('foreign_key_check')).toStrictEqual([]);
      expect(sqlite.pragma('user_version', { simple: true })).toBe(migrationCount);
      expect(sqlite.pragma('foreign_keys', { simple: true })).toBe(1);
    } finally {
      sqlite.close();
    }

    expect(runsTableSql(file)).toContain("`status` text DEFAULT 'running' NOT NULL");
    expect(countRows(file)).toStrictEqual({
      ...before,
      __drizzle_migrations: before.__drizzle_migrations! + 1,
    });
    expect(readAll(file, 'runs', 'id')).toStrictEqual(rowsBefore.runs);
    expect(readAll(file, 'steps', 'run_id, idx, epoch')).toStrictEqual(rowsBefore.steps);
    expect(readAll(file, 'effects', 'run_id, key')).toStrictEqual(rowsBefore.effects);
    expect(readAll(file, 'checkpoints', 'run_id, seq')).toStrictEqual(rowsBefore.checkpoints);

    // The migrated database works: old runs read back whole, a new run writes its rows.
    const engine = openEngine({ db: file, migrationsFolder: folder });
    try {
      const runs = await engine.list();
      expect(runs.map((r) => r.status).sort()).toStrictEqual([
        'completed',
        'completed',
        'completed',
        'failed',
      ]);
      const failed = await engine.get(runs.find((r) => r.status === 'failed')!.id);
      expect(failed.state).toStrictEqual({
        n: 3,
        notes: ['note 3.0', 'note 3.1', 'note 3.2', 'r-3'],
      });
      expect(failed.effects.map((e) => [e.key, e.status])).toStrictEqual([
        ['charge:3', 'done'],
        ['publish:3', 'done'],
      ]);
      const fresh = await engine.start(pipeline, { n: 5, notes: [] });
      expect(fresh.status).toBe('completed');
    } finally {
      await engine.close();
    }
    const check = new Database(file, { readonly: true });
    try {
      expect(check.pragma('foreign_key_check')).toStrictEqual([]);
    } finally {
      check.close();
    }
  });

  it("C15: the same rebuild in one transaction with foreign keys on (drizzle's own migrator) fails at DROP TABLE runs", () => {
    const file = copy('drizzle-migrator');
    const sqlite = new Database(file);
    let failure: unknown;
    try {
      sqlite.pragma('foreign_keys = ON');
      expect(sqlite.pragma('foreign_keys', { simple: true })).toBe(1);
      try {
        migrate(drizzle(sqlite), { migrationsFolder: folder });
      } catch (error) {
        failure = error;
      }
      expect(sqlite.inTransaction).toBe(false);
    } finally {
      sqlite.close();
    }
    // PRAGMA foreign_keys=OFF is a no-op inside a transaction, so DROP TABLE runs deletes every run
    // first, which the steps, effects, checkpoints and run_specs rows that point at them refuse.
    expect(failure).toBeInstanceOf(Error);
    expect((failure as Error).message).toContain('DROP TABLE `runs`;');
    expect(((failure as Error).cause as { code?: string; message?: string }) ?? {}).toMatchObject({
      code: 'SQLITE_CONSTRAINT_FOREIGNKEY',
      message: 'FOREIGN KEY constraint failed',
    });
    // Rolled back: nothing lost, nothing migrated, and the database stays stuck on the old schema.
    expect(countRows(file)).toStrictEqual(before);
    expect(runsTableSql(file)).not.toContain("DEFAULT 'running'");
  });
});

describe('two processes creating one new database', () => {
  const dir = tempDir('keel-migrate-race-');
  const opener = `
import { existsSync } from 'node:fs';
const { openDatabase } = await import(process.env.OPEN_MODULE);
process.stdout.write('ready\\n');
while (!existsSync(process.env.GO)) await new Promise((r) => setTimeout(r, 1));
try {
  openDatabase(process.env.DB).close();
  process.stdout.write('opened\\n');
} catch (error) {
  process.stdout.write('failed: ' + error.message + '\\n');
  process.exitCode = 3;
}
`;

  it('four processes opening a brand-new database at the same instant all succeed, migrated once', async () => {
    const expected = journal().entries.length;
    for (let round = 0; round < 4; round++) {
      const folder = join(dir, `round-${round}`);
      mkdirSync(folder);
      const go = join(folder, 'go');
      const db = join(folder, 'keel.db');
      const children = Array.from({ length: 4 }, () =>
        spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', opener], {
          cwd: ROOT,
          env: {
            ...process.env,
            OPEN_MODULE: pathToFileURL(join(ROOT, 'adapters/sqlite/open.ts')).href,
            GO: go,
            DB: db,
          },
          stdio: ['ignore', 'pipe', 'pipe'],
        }),
      );
      const output = children.map(() => '');
      children.forEach((child, i) =>
        child.stdout.on('data', (d: Buffer) => (output[i] += d.toString())),
      );
      const results = children.map((child) => collect(child, 30_000));
      await waitFor(() => output.every((o) => o.includes('ready')), 30_000, 'children ready');
      writeFileSync(go, '');
      const done = await Promise.all(results);
      for (const [i, result] of done.entries()) {
        expect({
          round,
          child: i,
          code: result.code,
          stdout: result.stdout,
          stderr: result.stderr,
        }).toStrictEqual({
          round,
          child: i,
          code: 0,
          stdout: 'ready\nopened\n',
          stderr: '',
        });
      }
      const sqlite = new Database(db, { readonly: true });
      try {
        expect(sqlite.pragma('application_id', { simple: true })).toBe(KEEL_APPLICATION_ID);
        expect(sqlite.pragma('user_version', { simple: true })).toBe(expected);
        expect(
          (sqlite.prepare('SELECT count(*) AS n FROM __drizzle_migrations').get() as { n: number })
            .n,
        ).toBe(expected);
        expect(tablesOf(sqlite)).toEqual(
          expect.arrayContaining(['checkpoints', 'effects', 'runs', 'steps']),
        );
      } finally {
        sqlite.close();
      }
    }
  });
});
