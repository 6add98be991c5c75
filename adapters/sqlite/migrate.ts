/**
 * Applies drizzle-kit's migrations, one database-wide lock at a time.
 *
 * drizzle's own migrator runs everything inside one transaction, where `PRAGMA foreign_keys=OFF` is
 * ignored: a generated table rebuild (copy, DROP, rename) of `runs` would then check or cascade
 * against `steps`, `effects` and `checkpoints`. Here foreign keys are switched off outside the
 * transaction, the transaction takes the write lock first (BEGIN IMMEDIATE, so two processes opening
 * a new database do not both migrate it), and `foreign_key_check` must come back clean before commit.
 */
import type Database from 'better-sqlite3';
import { readMigrationFiles, type MigrationMeta } from 'drizzle-orm/migrator';
import { DatabaseError } from '../../engine/errors.ts';

const TABLE = '__drizzle_migrations';

export function readMigrations(folder: string): MigrationMeta[] {
  return readMigrationFiles({ migrationsFolder: folder });
}

/** Applies the migrations the database lacks; returns how many it applied. */
export function applyMigrations(
  sqlite: Database.Database,
  migrations: MigrationMeta[],
  file: string,
): number {
  sqlite.exec(
    `CREATE TABLE IF NOT EXISTS ${TABLE} (id INTEGER PRIMARY KEY AUTOINCREMENT, hash text NOT NULL, created_at numeric)`,
  );
  const applied = () =>
    (
      sqlite.prepare(`SELECT max(created_at) AS last FROM ${TABLE}`).get() as {
        last: number | null;
      }
    ).last ?? 0;
  const pending = () => migrations.filter((m) => m.folderMillis > applied());
  if (pending().length === 0) return 0;
  sqlite.pragma('foreign_keys = OFF');
  try {
    return sqlite
      .transaction(() => {
        const todo = pending();
        for (const migration of todo) {
          for (const statement of migration.sql) if (statement.trim()) sqlite.exec(statement);
          sqlite
            .prepare(`INSERT INTO ${TABLE} (hash, created_at) VALUES (?, ?)`)
            .run(migration.hash, migration.folderMillis);
        }
        const broken = sqlite.pragma('foreign_key_check') as unknown[];
        if (broken.length > 0) {
          throw new DatabaseError(
            `Migrating ${file} would leave ${broken.length} row(s) pointing at missing parents; nothing was changed.`,
            {
              hint: 'Report this with the database attached; keep using the previous keel version meanwhile.',
            },
          );
        }
        sqlite.pragma(`user_version = ${migrations.length}`);
        return todo.length;
      })
      .immediate();
  } finally {
    sqlite.pragma('foreign_keys = ON');
  }
}
