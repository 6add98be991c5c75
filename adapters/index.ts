/**
 * The `keel` package: the engine's API plus `openEngine`, which opens it over the embedded SQLite
 * store.
 * @example
 * import { openEngine, workflow } from 'keel';
 * const engine = openEngine({ db: '.keel/keel.db' });
 * const result = await engine.start(myWorkflow, { topic: 'leases' });
 */
import { resolve } from 'node:path';
import { Engine, type EngineOptions } from '../engine/engine.ts';
import { InputError } from '../engine/errors.ts';
import { createRouter, type Router } from '../engine/llm/router.ts';
import type { TierStateStore } from '../engine/llm/tier-state.ts';
import { parseSecretKey, type Keyring, type SecretKey } from '../engine/secret.ts';
import { systemClock, type Clock } from '../engine/time.ts';
import {
  buildTiers,
  degradedAllowed,
  loadLlmConfig,
  parseLlmConfig,
  routerOptionsFrom,
  type LlmConfig,
} from './llm/config.ts';
import type { Logger } from '../engine/logger.ts';
import { crashPointsFromEnv } from './crash-points.ts';
import { localHost } from './host.ts';
import { loadFromRecordedModule } from './loader.ts';
import { openSqliteStore } from './sqlite/store.ts';
import type { SqliteOptions } from './sqlite/open.ts';

export * from '../engine/index.ts';
export { openSqliteStore, SqliteStore } from './sqlite/store.ts';
export type { SqliteOptions } from './sqlite/open.ts';
export { loadWorkflow, loadWorkflows } from './loader.ts';
export { anthropicProvider } from './llm/anthropic.ts';
export { openaiProvider, PRESETS, presetOptions } from './llm/openai.ts';
export { buildTiers, loadLlmConfig, type LlmConfig, type TierConfig } from './llm/config.ts';
export { degradedProvider } from '../engine/llm/degraded.ts';
export {
  secret,
  Secret,
  isSecret,
  newSecretKey,
  parseSecretKey,
  type Keyring,
  type SecretKey,
} from '../engine/secret.ts';

export type OpenEngineOptions = Omit<EngineOptions, 'store' | 'host' | 'llm' | 'secrets'> &
  SqliteOptions & {
    /** Path of the SQLite database (default `KEEL_DB`, else `.keel/keel.db`); created if missing. */
    db?: string;
    /**
     * The LLM tiers behind `ctx.llm`: a configuration (as the `llm` key of `keel.config.json`), a
     * router, or a function that builds one over the database's shared breaker state. Default: the
     * `llm` key of `keel.config.json` (or the file `KEEL_CONFIG` names), else the default chain
     * from the environment (ANTHROPIC_API_KEY, OPENAI_API_KEY, a local server, the offline tier).
     */
    llm?: LlmConfig | Router | ((states: TierStateStore) => Router | Promise<Router>);
    /**
     * The key `secret(...)` values are encrypted with: 32 bytes as base64 or 64 hex digits, as
     * `keel keygen` prints (default `KEEL_SECRET_KEY`). Keys are read, never stored.
     */
    secretKey?: string;
    /** Earlier keys, to read secrets they wrote (default `KEEL_SECRET_KEYS_OLD`, comma-separated). */
    oldSecretKeys?: string[];
  };

export const DEFAULT_DB = '.keel/keel.db';

/** Opens an engine over a SQLite database file, creating and migrating it as needed. */
export function openEngine(options: OpenEngineOptions = {}): Engine {
  const {
    db,
    synchronous,
    busyTimeoutMs,
    migrationsFolder,
    integrityCheck,
    llm,
    secretKey,
    oldSecretKeys,
    ...engineOptions
  } = options;
  // A malformed key is refused before the database is touched, never ignored.
  const secrets = keyringFrom(secretKey, oldSecretKeys);
  const sqlite: SqliteOptions = {};
  if (synchronous) sqlite.synchronous = synchronous;
  const busy = busyTimeoutMs ?? envMs('KEEL_BUSY_TIMEOUT_MS');
  if (busy !== undefined) sqlite.busyTimeoutMs = busy;
  if (migrationsFolder) sqlite.migrationsFolder = migrationsFolder;
  if (integrityCheck !== undefined) sqlite.integrityCheck = integrityCheck;
  // A bad LLM configuration is the caller's to fix before any run starts, not a step failure.
  const llmConfig = isRouter(llm) || typeof llm === 'function' ? undefined : checkedLlmConfig(llm);
  const store = openSqliteStore(db ?? process.env.KEEL_DB ?? DEFAULT_DB, sqlite);
  const leaseMs = envMs('KEEL_LEASE_MS');
  const maxStateBytes = envNumber('KEEL_MAX_STATE_BYTES');
  return new Engine({
    loadWorkflow: loadFromRecordedModule,
    crashPoint: crashPointsFromEnv(),
    ...(process.argv[1] ? { entryScript: resolve(process.argv[1]) } : {}),
    ...(leaseMs !== undefined ? { leaseMs } : {}),
    ...(maxStateBytes !== undefined ? { maxStateBytes } : {}),
    ...engineOptions,
    llm: () =>
      routerFor(
        isRouter(llm) || typeof llm === 'function' ? llm : llmConfig,
        store,
        engineOptions.clock ?? systemClock,
        engineOptions.logger,
      ),
    store,
    host: localHost,
    secrets,
  });
}

/** The secret keys: given, else from KEEL_SECRET_KEY and KEEL_SECRET_KEYS_OLD. */
function keyringFrom(secretKey: string | undefined, oldSecretKeys: string[] | undefined): Keyring {
  const env = process.env;
  const current =
    secretKey !== undefined
      ? parseSecretKey(secretKey, 'openEngine({ secretKey })')
      : env.KEEL_SECRET_KEY
        ? parseSecretKey(env.KEEL_SECRET_KEY, 'KEEL_SECRET_KEY')
        : null;
  const old: SecretKey[] =
    oldSecretKeys !== undefined
      ? oldSecretKeys.map((k, i) => parseSecretKey(k, `openEngine({ oldSecretKeys })[${i}]`))
      : (env.KEEL_SECRET_KEYS_OLD ?? '')
          .split(',')
          .filter((k) => k.trim() !== '')
          .map((k, i) => parseSecretKey(k, `key ${i + 1} of KEEL_SECRET_KEYS_OLD`));
  return { current, old };
}

const isRouter = (value: unknown): value is Router =>
  typeof value === 'object' && value !== null && 'complete' in value && 'stream' in value;

/** Builds the router `ctx.llm` uses, on first use, sharing breakers through `states`. */
async function routerFor(
  llm: OpenEngineOptions['llm'],
  states: TierStateStore,
  clock: Clock,
  logger: Logger | undefined,
): Promise<Router> {
  if (isRouter(llm)) return llm;
  if (typeof llm === 'function') return llm(states);
  const { tiers, notes } = await buildTiers(llm, { env: process.env });
  for (const note of notes) logger?.info(`llm: ${note}`);
  return createRouter({ ...routerOptionsFrom(llm), tiers, clock, states });
}

/** The LLM configuration, validated now: given, else from keel.config.json or KEEL_CONFIG. */
function checkedLlmConfig(llm: LlmConfig | undefined): LlmConfig | undefined {
  const config =
    llm === undefined
      ? loadLlmConfig({ cwd: process.cwd() })
      : parseLlmConfig(llm, 'openEngine({ llm })');
  degradedAllowed(config, process.env);
  return config;
}

/** A duration in milliseconds from the environment, refusing nonsense instead of ignoring it. */
function envMs(name: string): number | undefined {
  return envNumber(name, 'milliseconds');
}

/** A positive number from the environment, refusing nonsense instead of ignoring it. */
function envNumber(name: string, unit = 'bytes'): number | undefined {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return undefined;
  const value = Number(raw);
  if (!Number.isFinite(value) || value <= 0) {
    throw new InputError(`${name}=${raw} is not a positive number of ${unit}.`, {
      hint: `Unset it, or set it to e.g. ${name}=${unit === 'bytes' ? 67108864 : 30000}.`,
    });
  }
  return value;
}
