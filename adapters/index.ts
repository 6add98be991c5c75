/**
 * The `keel` package: the engine's API plus `openEngine`, which opens it over the embedded SQLite
 * store.
 * @example
 * import { openEngine, workflow } from 'keel';
 * const engine = openEngine({ db: '.keel/keel.db' });
 * const result = await engine.start(myWorkflow, { topic: 'leases' });
 */
import { Engine, type EngineOptions } from '../engine/engine.ts';
import { crashPointsFromEnv } from './crash-points.ts';
import { localHost } from './host.ts';
import { loadFromRecordedModule } from './loader.ts';
import { openSqliteStore } from './sqlite/store.ts';
import type { SqliteOptions } from './sqlite/open.ts';

export * from '../engine/index.ts';
export { openSqliteStore, SqliteStore } from './sqlite/store.ts';
export type { SqliteOptions } from './sqlite/open.ts';
export { loadWorkflow, loadWorkflows } from './loader.ts';

export type OpenEngineOptions = Omit<EngineOptions, 'store' | 'host'> &
  SqliteOptions & {
    /** Path of the SQLite database (default `KEEL_DB`, else `.keel/keel.db`); created if missing. */
    db?: string;
  };

export const DEFAULT_DB = '.keel/keel.db';

/** Opens an engine over a SQLite database file, creating and migrating it as needed. */
export function openEngine(options: OpenEngineOptions = {}): Engine {
  const { db, synchronous, busyTimeoutMs, migrationsFolder, ...engineOptions } = options;
  const sqlite: SqliteOptions = {};
  if (synchronous) sqlite.synchronous = synchronous;
  if (busyTimeoutMs !== undefined) sqlite.busyTimeoutMs = busyTimeoutMs;
  if (migrationsFolder) sqlite.migrationsFolder = migrationsFolder;
  const store = openSqliteStore(db ?? process.env.KEEL_DB ?? DEFAULT_DB, sqlite);
  return new Engine({
    loadWorkflow: loadFromRecordedModule,
    crashPoint: crashPointsFromEnv(),
    ...engineOptions,
    store,
    host: localHost,
  });
}
