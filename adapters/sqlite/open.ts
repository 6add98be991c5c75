/**
 * Opening a keel database: refuse what is not one, migrate what is, set the pragmas.
 *
 * Nothing is written to a file until it is known to be a keel database (or a new, empty one): a file
 * that is not SQLite, a SQLite database of another application, a corrupt one or one written by a
 * newer keel is left exactly as it was, with an error that says so.
 */
import Database from 'better-sqlite3';
import {
  chmodSync,
  closeSync,
  existsSync,
  fchmodSync,
  mkdirSync,
  openSync,
  readSync,
  statSync,
} from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DatabaseError } from '../../engine/errors.ts';
import { applyMigrations, readMigrations } from './migrate.ts';

/** `PRAGMA application_id` of every keel database: "keel" in ASCII. */
export const KEEL_APPLICATION_ID = 0x6b65656c;
const SQLITE_HEADER = 'SQLite format 3\0';
export const MIGRATIONS_FOLDER = fileURLToPath(new URL('../../migrations', import.meta.url));

export type SqliteOptions = {
  /** `NORMAL` (default) survives a process crash; `FULL` also survives a power cut. */
  synchronous?: 'NORMAL' | 'FULL';
  /** How long to wait for another process's write lock before failing (default 5 s). */
  busyTimeoutMs?: number;
  migrationsFolder?: string;
  /**
   * Run `PRAGMA quick_check` when opening a database of up to 256 MiB (default true), so that a
   * damaged file is refused before anything is written to it. Larger files are not checked: the
   * check reads every page.
   */
  integrityCheck?: boolean;
};

const QUICK_CHECK_LIMIT = 256 * 1024 * 1024;

export function openDatabase(path: string, options: SqliteOptions = {}): Database.Database {
  const file = path === ':memory:' ? path : resolve(path);
  if (file !== ':memory:') prepareFile(file);
  let sqlite: Database.Database;
  try {
    sqlite = new Database(file, { timeout: options.busyTimeoutMs ?? 5_000 });
  } catch (error) {
    throw translate(error, file);
  }
  try {
    const migrations = readMigrations(options.migrationsFolder ?? MIGRATIONS_FOLDER);
    checkIdentity(sqlite, file, migrations.length);
    checkPages(sqlite, file, options.integrityCheck ?? true);
    enableWal(sqlite, options.busyTimeoutMs ?? 5_000);
    sqlite.pragma(`synchronous = ${options.synchronous ?? 'NORMAL'}`);
    sqlite.pragma('foreign_keys = ON');
    applyMigrations(sqlite, migrations, file);
    return sqlite;
  } catch (error) {
    sqlite.close();
    throw translate(error, file);
  }
}

/**
 * Switching a new database to WAL needs a moment with no other connection reading it, and SQLite
 * answers SQLITE_BUSY at once rather than through the busy handler when several processes open a new
 * file together: wait for that moment, up to the busy timeout, like any other lock.
 */
function enableWal(sqlite: Database.Database, timeoutMs: number): void {
  const deadline = Date.now() + timeoutMs;
  const pause = new Int32Array(new SharedArrayBuffer(4));
  for (let delay = 2; ; delay = Math.min(delay * 2, 50)) {
    try {
      sqlite.pragma('journal_mode = WAL');
      return;
    } catch (error) {
      const code = (error as { code?: string }).code ?? '';
      if (!code.startsWith('SQLITE_BUSY') || Date.now() >= deadline) throw error;
      Atomics.wait(pause, 0, 0, delay);
    }
  }
}

function prepareFile(file: string): void {
  const folder = dirname(file);
  if (!existsSync(folder)) makePrivateFolder(folder);
  if (makePrivateFile(file)) return;
  const stats = statSync(file);
  if (stats.isDirectory()) {
    throw new DatabaseError(`${file} is a folder, not a database file.`, {
      hint: 'Point --db (or KEEL_DB) at a file, e.g. .keel/keel.db.',
    });
  }
  if (stats.size === 0) return;
  const header = Buffer.alloc(20);
  const fd = openSync(file, 'r');
  try {
    readSync(fd, header, 0, 20, 0);
  } finally {
    closeSync(fd);
  }
  // Bytes 18 and 19 are the format's write and read versions, 1 or 2: SQLite opens a file whose
  // versions were zeroed, and switching it to WAL would then write them.
  const versionsKnown = [1, 2].includes(header[18]!) && [1, 2].includes(header[19]!);
  if (header.toString('latin1', 0, 16) !== SQLITE_HEADER || !versionsKnown) {
    throw new DatabaseError(
      `${file} is not a SQLite database (or its header is damaged); keel left it untouched.`,
      {
        hint: 'Use another path with --db, or restore the file from a backup.',
      },
    );
  }
}

/*
 * Prompts, completions, state and effect results are stored in plain text, so what keel creates is
 * its owner's alone: folders 0700, the database 0600 (SQLite gives its -wal and -shm files the
 * database's mode). The mode is set after creation, as the umask may have taken bits off; a file or
 * folder the user made keeps the mode it has.
 */

function makePrivateFolder(folder: string): void {
  const first = mkdirSync(folder, { recursive: true, mode: 0o700 });
  if (first === undefined) return; // another process made it in the meantime
  for (let dir = folder; ; dir = dirname(dir)) {
    chmodSync(dir, 0o700);
    if (dir === first) return;
  }
}

/** Creates the database file; false when it exists already. */
function makePrivateFile(file: string): boolean {
  let fd: number;
  try {
    fd = openSync(file, 'wx', 0o600);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw error;
  }
  try {
    fchmodSync(fd, 0o600);
  } finally {
    closeSync(fd);
  }
  return true;
}

function checkIdentity(sqlite: Database.Database, file: string, known: number): void {
  // Both read in one transaction: a database that another process is creating at this moment is
  // seen before it began or with its application_id already set, never as tables without an id.
  const [appId, tables, schemaVersion] = sqlite.transaction(
    () =>
      [
        sqlite.pragma('application_id', { simple: true }) as number,
        (
          sqlite
            .prepare(
              "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
            )
            .all() as { name: string }[]
        ).map((t) => t.name),
        sqlite.pragma('user_version', { simple: true }) as number,
      ] as const,
  )();
  const keelTables = tables.includes('run_specs') && tables.includes('checkpoints');
  if (appId !== KEEL_APPLICATION_ID && keelTables) {
    throw new DatabaseError(
      `${file} is damaged (it has keel's tables, but its header lost keel's application id); keel left it untouched.`,
      {
        hint: 'Check it with `sqlite3 FILE "PRAGMA integrity_check"` and restore a backup if it fails.',
      },
    );
  }
  if (appId !== KEEL_APPLICATION_ID) {
    // Only a brand-new database (no id, no tables, no schema version) becomes keel's.
    if (appId !== 0 || tables.length > 0 || schemaVersion !== 0) {
      throw new DatabaseError(
        `${file} is a SQLite database of another application${tables.length ? ` (tables: ${tables.slice(0, 5).join(', ')})` : ''}, not a keel database; keel left it untouched.`,
        { hint: 'Give keel a database of its own with --db (or KEEL_DB).' },
      );
    }
    sqlite.pragma(`application_id = ${KEEL_APPLICATION_ID}`);
  }
  const version = sqlite.pragma('user_version', { simple: true }) as number;
  if (version > known) {
    throw new DatabaseError(
      `${file} was written by a newer keel (schema ${version}; this keel knows up to ${known}); keel left it untouched.`,
      { hint: 'Upgrade keel (npm install keel@latest) to open it.' },
    );
  }
}

function checkPages(sqlite: Database.Database, file: string, enabled: boolean): void {
  if (!enabled || file === ':memory:' || statSync(file).size > QUICK_CHECK_LIMIT) return;
  const result = sqlite.pragma('quick_check(1)', { simple: true }) as string;
  if (result !== 'ok') {
    const finding = result.replace(/\s+/g, ' ').slice(0, 200);
    throw new DatabaseError(
      `${file} is damaged (quick_check: ${finding}); keel left it untouched.`,
      {
        hint: 'Check it with `sqlite3 FILE "PRAGMA integrity_check"` and restore a backup if it fails.',
      },
    );
  }
}

/** Maps SQLite's errors to messages that say what to do. */
export function translate(error: unknown, file: string): unknown {
  const code = (error as { code?: string }).code ?? '';
  if (code === 'SQLITE_BUSY' || code.startsWith('SQLITE_BUSY') || code === 'SQLITE_LOCKED') {
    return new DatabaseError(
      `${file} is locked by another process, and stayed locked past the busy timeout.`,
      {
        busy: true,
        cause: error,
        hint: 'Another keel (or a sqlite3 shell holding a transaction) is writing; retry, or raise busyTimeoutMs.',
      },
    );
  }
  // A file cut short reads as a short read: it is damaged as much as a corrupt one.
  if (
    code === 'SQLITE_NOTADB' ||
    code.startsWith('SQLITE_CORRUPT') ||
    code === 'SQLITE_IOERR_SHORT_READ'
  ) {
    return new DatabaseError(`${file} is damaged (${code}); keel left it untouched.`, {
      cause: error,
      hint: 'Check it with `sqlite3 FILE "PRAGMA integrity_check"` and restore a backup if it fails.',
    });
  }
  if (code === 'SQLITE_CANTOPEN') {
    return new DatabaseError(`Cannot open ${file}: ${(error as Error).message}.`, {
      cause: error,
      hint: 'Check that the folder exists and is writable.',
    });
  }
  if (code === 'SQLITE_READONLY' || code.startsWith('SQLITE_READONLY')) {
    return new DatabaseError(`${file} is read-only for this process.`, {
      cause: error,
      hint: 'Check the file permissions.',
    });
  }
  if (code === 'SQLITE_FULL') {
    return new DatabaseError(`The disk holding ${file} is full; the last commit was not written.`, {
      cause: error,
      hint: 'Free some space, then resume the run: its last good checkpoint is intact.',
    });
  }
  return error;
}
