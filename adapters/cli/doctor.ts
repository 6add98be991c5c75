/**
 * `keel doctor`: builds the LLM tiers exactly as a run would, then sends each one the smallest
 * request there is, straight to its provider (no router: no retries, no fallback hiding a broken
 * tier), and reports which answered. Exit status 0 when every tier but the offline one answered,
 * 1 when one did not (or there is no tier at all), 2 for a bad configuration.
 */
import { InvalidArgumentError, type Command } from 'commander';
import { classifyFailure } from '../../engine/llm/classify.ts';
import type { FailureClass, LlmRequest, ProviderFailure } from '../../engine/llm/types.ts';
import { buildTiers, loadLlmConfig, type ConfiguredTier, type Env } from '../llm/config.ts';
import { table } from './format.ts';
import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { initialTierState, type TierState } from '../../engine/llm/tier-state.ts';
import { openSqliteStore } from '../sqlite/store.ts';
import { DEFAULT_DB } from '../index.ts';

export const DEFAULT_TIMEOUT_MS = 10_000;

/** The request each tier gets: one token of answer to one word. */
export const PING: LlmRequest = { maxTokens: 1, messages: [{ role: 'user', content: 'ping' }] };

export type TierCheck = {
  tier: string;
  provider: string;
  model: string;
  reachable: boolean;
  /** How long the answer took; null when there was none. */
  latencyMs: number | null;
  errorClass: FailureClass | null;
  /** The HTTP status of the failure, when there was one. */
  status: number | null;
  /** A short reason for the failure (never a key or a prompt); null when it answered. */
  reason: string | null;
  degraded: boolean;
};

/**
 * What `keel doctor --json` prints: each tier's check, the notes on how the tiers were chosen, and
 * one line per tier that failed saying what to look at.
 */
export type DoctorReport = { tiers: TierCheck[]; notes: string[]; problems: string[] };

export type DoctorOptions = {
  cwd: string;
  env: Env;
  /** A configuration file instead of `KEEL_CONFIG` or `keel.config.json`. */
  config?: string;
  /** How long each tier has to answer. */
  timeoutMs?: number;
};

function failureOf(err: unknown): ProviderFailure {
  if (typeof err === 'object' && err !== null && 'failure' in err) {
    const failure = err.failure as ProviderFailure | undefined;
    if (typeof failure?.message === 'string') return failure;
  }
  return { kind: 'network', message: err instanceof Error ? err.message : String(err) };
}

/** Sends {@link PING} to one tier's provider under its own timeout. */
export async function checkTier(tier: ConfiguredTier, timeoutMs: number): Promise<TierCheck> {
  const base = {
    tier: tier.name,
    provider: tier.provider.name,
    model: tier.provider.model,
    degraded: tier.degraded === true,
  };
  const timer = new AbortController();
  const handle = setTimeout(() => timer.abort(), timeoutMs);
  const started = performance.now();
  try {
    await tier.provider.complete(PING, timer.signal);
    const latencyMs = Math.round(performance.now() - started);
    return { ...base, reachable: true, latencyMs, errorClass: null, status: null, reason: null };
  } catch (err) {
    if (timer.signal.aborted) {
      const reason = `no answer within ${timeoutMs} ms`;
      return {
        ...base,
        reachable: false,
        latencyMs: null,
        errorClass: 'timeout',
        status: null,
        reason,
      };
    }
    const failure = failureOf(err);
    const classified = classifyFailure(failure);
    return {
      ...base,
      reachable: false,
      latencyMs: null,
      errorClass: classified.class,
      status: failure.status ?? null,
      reason: classified.reason,
    };
  } finally {
    clearTimeout(handle);
  }
}

/** Loads the configuration, builds the tiers and checks them all at once. */
export async function runDoctor(options: DoctorOptions): Promise<DoctorReport> {
  const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const config = loadLlmConfig({
    cwd: options.cwd,
    env: options.env,
    ...(options.config === undefined ? {} : { file: options.config }),
  });
  // No provider timeout: each check's own timer is the one limit, so a slow tier always reads as
  // "no answer within N ms" rather than whichever of two timers fired first.
  const { tiers, notes } = await buildTiers(config, { env: options.env });
  const checks = await Promise.all(tiers.map((tier) => checkTier(tier, timeoutMs)));
  return { tiers: checks, notes, problems: problemsOf(tiers, checks) };
}

/** What to check for a tier that failed: loud for a misconfigured one (auth, not_found). */
function problemOf(tier: ConfiguredTier, check: TierCheck): string | undefined {
  if (check.reachable) return undefined;
  const what = `${check.tier} (${check.provider} ${check.model})`;
  const why = check.reason ?? 'no answer';
  const key = tier.keyEnv ?? 'the key this tier is given (apiKeyEnv)';
  const at = tier.baseURL === undefined ? '' : ` and the base URL ${tier.baseURL}`;
  switch (check.errorClass) {
    case 'auth':
      return `MISCONFIGURED: ${what}: the key was refused (${why}), check ${key}`;
    case 'not_found':
      return `MISCONFIGURED: ${what}: not found (${why}), check the model name${at}`;
    case 'network':
    case 'timeout':
      return `UNREACHABLE: ${what}: ${why}${tier.baseURL ? `; is ${tier.baseURL} up?` : ''}`;
    default:
      return `FAILED: ${what}: ${why}`;
  }
}

function problemsOf(tiers: readonly ConfiguredTier[], checks: readonly TierCheck[]): string[] {
  const problems = tiers.flatMap((tier, i) => problemOf(tier, checks[i]!) ?? []);
  if (tiers.length === 0) {
    problems.push(
      'NO TIER: set ANTHROPIC_API_KEY or OPENAI_API_KEY, start a local server, or configure tiers in keel.config.json',
    );
  } else if (tiers.every((t) => t.degraded)) {
    problems.push(
      'ONLY OFFLINE: answers will be extracted from the request, not generated; set ANTHROPIC_API_KEY or OPENAI_API_KEY, or start a local server',
    );
  }
  return problems;
}

/** 0 when every tier but the degraded one answered; 1 when one failed or there is no tier. */
export function doctorExitCode(report: DoctorReport): number {
  if (report.tiers.length === 0) return 1;
  return report.tiers.every((t) => t.reachable || t.degraded) ? 0 : 1;
}

/** The report as text: notes, the table, then what to fix. */
export function formatDoctor(report: DoctorReport): string {
  const lines = ['notes:', ...report.notes.map((n) => `  ${n}`), ''];
  if (report.tiers.length) {
    const rows = report.tiers.map((t) => [
      t.tier,
      t.provider,
      t.model,
      t.reachable ? 'yes' : 'no',
      t.latencyMs === null ? '-' : String(t.latencyMs),
      t.errorClass ?? '',
      t.reason ?? '',
    ]);
    lines.push(
      table(['tier', 'provider', 'model', 'reachable', 'latency ms', 'error', 'reason'], rows),
      '',
    );
  }
  lines.push(...report.problems);
  const failed = report.tiers.filter((t) => !t.reachable && !t.degraded).length;
  if (report.tiers.length) {
    lines.push(
      failed === 0
        ? `ok: every tier answered`
        : `${failed} of ${report.tiers.length} tiers did not answer`,
    );
  }
  return lines.join('\n');
}

function timeoutArgument(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) {
    throw new InvalidArgumentError(
      `--timeout takes a whole number of milliseconds, got "${value}".`,
    );
  }
  return n;
}

/**
 * Adds `keel doctor` to the program. `done` receives the exit status (the command's errors, such as
 * a bad configuration, are thrown and become status 2 in the caller).
 */
export function registerDoctor(root: Command, done: (exitCode: number) => void): void {
  root
    .command('doctor')
    .description('check that every LLM tier is configured and answers')
    .option('--config <file>', 'configuration file (default: $KEEL_CONFIG or keel.config.json)')
    .option(
      '--timeout <ms>',
      'how long each tier has to answer',
      timeoutArgument,
      DEFAULT_TIMEOUT_MS,
    )
    .option('--reset', "clear the database's breakers and cooldowns of every tier")
    .action(
      async (opts: { config?: string; timeout: number; reset?: boolean }, command: Command) => {
        const { json, db } = command.optsWithGlobals<{ json?: boolean; db?: string }>();
        const report = await runDoctor({
          cwd: process.cwd(),
          env: process.env,
          timeoutMs: opts.timeout,
          ...(opts.config === undefined ? {} : { config: opts.config }),
        });
        const shared = await sharedTierState(
          resolve(db ?? process.env.KEEL_DB ?? DEFAULT_DB),
          opts.reset === true,
        );
        const text = `${formatDoctor(report)}${formatShared(shared)}`;
        process.stdout.write(`${json ? JSON.stringify({ ...report, shared }, null, 2) : text}\n`);
        done(doctorExitCode(report));
      },
    );
}

/** The tier state every process on a database shares (breakers, quota cooldowns), if it exists. */
type SharedState = { database: string; reset: boolean; tiers: TierState[] } | null;

async function sharedTierState(database: string, reset: boolean): Promise<SharedState> {
  if (!existsSync(database)) return null;
  const store = openSqliteStore(database);
  try {
    const now = Date.now();
    if (reset) {
      for (const t of await store.listTierStates()) {
        await store.updateTierState(t.tier, () => ({
          ...initialTierState(t.tier),
          updatedAt: now,
        }));
      }
    }
    return { database, reset, tiers: await store.listTierStates() };
  } finally {
    await store.close();
  }
}

function formatShared(shared: SharedState): string {
  if (!shared || shared.tiers.length === 0) return '';
  const now = Date.now();
  const until = (at: number) => (at > now ? new Date(at).toISOString() : '-');
  const rows = shared.tiers.map((t) => [
    t.tier,
    t.breaker,
    String(t.failures),
    t.breaker === 'open' ? until(t.openUntil) : '-',
    until(t.downUntil),
    t.misconfigured ?? '',
  ]);
  return [
    '',
    '',
    `shared state in ${shared.database}${shared.reset ? ' (just reset)' : ''}: every process on it skips a tier while its breaker is open or it is down`,
    table(['tier', 'breaker', 'failures', 'open until', 'down until', 'last misconfigured'], rows),
    shared.reset ? '' : 'clear it with `keel doctor --reset`',
  ].join('\n');
}
