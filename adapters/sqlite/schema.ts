/**
 * keel's tables. Migrations in `migrations/` are generated from this file by drizzle-kit
 * (`npm run db:generate`) and applied when a database is opened.
 *
 * `checkpoints`, `steps`, `effects` and `queue` are WITHOUT ROWID tables (see the migrations): a
 * milestone then writes one b-tree per row instead of a row b-tree plus its primary-key index.
 * drizzle-kit does not emit that clause, so a generated migration that creates or rebuilds them
 * must have it added.
 *
 * Foreign keys have no ON DELETE CASCADE on purpose: a migration that rebuilds a parent table must
 * never take child rows with it (see `migrate.ts`).
 */

import { sql } from 'drizzle-orm';
import { index, integer, primaryKey, real, sqliteTable, text } from 'drizzle-orm/sqlite-core';

export const runs = sqliteTable(
  'runs',
  {
    id: text('id').primaryKey(),
    workflow: text('workflow').notNull(),
    version: integer('version').notNull(),
    fingerprint: text('fingerprint').notNull(),
    module: text('module'),
    status: text('status').notNull(),
    cursor: text('cursor'),
    cursorAttempts: integer('cursor_attempts').notNull().default(0),
    stepCount: integer('step_count').notNull().default(0),
    seq: integer('seq').notNull(),
    snapshotSeq: integer('snapshot_seq').notNull(),
    snapshotBytes: integer('snapshot_bytes').notNull(),
    patchBytes: integer('patch_bytes').notNull().default(0),
    patchCount: integer('patch_count').notNull().default(0),
    error: text('error'),
    epoch: integer('epoch').notNull().default(1),
    leaseOwner: text('lease_owner'),
    leasePid: integer('lease_pid'),
    leaseHost: text('lease_host'),
    leaseExpiresAt: integer('lease_expires_at'),
    createdAt: integer('created_at').notNull(),
    updatedAt: integer('updated_at').notNull(),
    endedAt: integer('ended_at'),
    /** Set by `cancel`: the holder stops the run at its next milestone or heartbeat. */
    cancelRequested: integer('cancel_requested').notNull().default(0),
  },
  (t) => [
    index('runs_status_idx').on(t.status),
    index('runs_workflow_idx').on(t.workflow, t.createdAt),
  ],
);

/**
 * What a run was started with. Kept apart from `runs` because SQLite rewrites a whole row on every
 * update, and `runs` is updated at every milestone while these never change (the graph only on an
 * explicit version change).
 */
export const runSpecs = sqliteTable('run_specs', {
  runId: text('run_id')
    .primaryKey()
    .references(() => runs.id),
  graph: text('graph').notNull(),
  input: text('input').notNull(),
  options: text('options').notNull().default('{}'),
  /** The enqueue key: a second enqueue with the same key adds nothing. */
  queueKey: text('queue_key').unique(),
});

export const checkpoints = sqliteTable(
  'checkpoints',
  {
    runId: text('run_id')
      .notNull()
      .references(() => runs.id),
    seq: integer('seq').notNull(),
    kind: text('kind', { enum: ['snapshot', 'patch'] }).notNull(),
    step: text('step'),
    data: text('data').notNull(),
    createdAt: integer('created_at').notNull(),
  },
  (t) => [primaryKey({ columns: [t.runId, t.seq] })],
);

export const steps = sqliteTable(
  'steps',
  {
    runId: text('run_id')
      .notNull()
      .references(() => runs.id),
    index: integer('idx').notNull(),
    /**
     * The lease epoch the execution ran under. A run executes a step index at most once per epoch
     * (a failure ends the epoch's work), so (run, index, epoch) names one execution.
     */
    epoch: integer('epoch').notNull(),
    name: text('name').notNull(),
    status: text('status', { enum: ['completed', 'failed'] }).notNull(),
    attempts: integer('attempts').notNull(),
    next: text('next'),
    startedAt: integer('started_at').notNull(),
    endedAt: integer('ended_at').notNull(),
    error: text('error'),
  },
  (t) => [primaryKey({ columns: [t.runId, t.index, t.epoch] })],
);

export const effects = sqliteTable(
  'effects',
  {
    runId: text('run_id')
      .notNull()
      .references(() => runs.id),
    key: text('key').notNull(),
    name: text('name').notNull(),
    step: text('step').notNull(),
    status: text('status').notNull(),
    result: text('result'),
    error: text('error'),
    attempts: integer('attempts').notNull().default(0),
    startedAt: integer('started_at').notNull(),
    completedAt: integer('completed_at'),
    completionOrder: integer('completion_order'),
    compensationAttempts: integer('compensation_attempts').notNull().default(0),
    compensatedAt: integer('compensated_at'),
    compensable: integer('compensable', { mode: 'boolean' }).notNull().default(false),
  },
  (t) => [primaryKey({ columns: [t.runId, t.key] })],
);

/**
 * The LLM journal: one row per `ctx.llm` call, keyed by the step execution and the call's position
 * in it, so that a step run again after a crash gets its completed calls back without paying again.
 * A failed call keeps its attempts; a later success at the same position replaces it.
 */
export const llmCalls = sqliteTable(
  'llm_calls',
  {
    runId: text('run_id')
      .notNull()
      .references(() => runs.id),
    /** The step execution's index (`steps.idx`), and the call's position within it. */
    stepIndex: integer('step_index').notNull(),
    position: integer('position').notNull(),
    step: text('step').notNull(),
    /** sha256 of the canonical request: a different request at this position is an error. */
    requestHash: text('request_hash').notNull(),
    status: text('status', { enum: ['completed', 'failed'] }).notNull(),
    streamed: integer('streamed', { mode: 'boolean' }).notNull().default(false),
    /** The unified response as JSON; null for a failed call. */
    response: text('response'),
    error: text('error'),
    tier: text('tier'),
    provider: text('provider'),
    model: text('model'),
    degraded: integer('degraded', { mode: 'boolean' }).notNull().default(false),
    /** JSON array of the router's attempts, failures, waits and cancelled hedges included. */
    attempts: text('attempts').notNull(),
    inputTokens: integer('input_tokens').notNull().default(0),
    outputTokens: integer('output_tokens').notNull().default(0),
    cacheReadTokens: integer('cache_read_tokens').notNull().default(0),
    cacheWriteTokens: integer('cache_write_tokens').notNull().default(0),
    /** US dollars over every attempt with a known usage; null when a tier has no price. */
    costUsd: real('cost_usd'),
    latencyMs: integer('latency_ms').notNull().default(0),
    /** How many times the recorded answer was served again instead of calling a provider. */
    replays: integer('replays').notNull().default(0),
    createdAt: integer('created_at').notNull(),
    updatedAt: integer('updated_at').notNull(),
  },
  (t) => [primaryKey({ columns: [t.runId, t.stepIndex, t.position] })],
);

/**
 * Each LLM tier's breaker, quota cooldown and misconfiguration, shared by every process on the
 * database so that one that sees a provider go down spares the others the timeouts.
 */
export const llmTiers = sqliteTable('llm_tiers', {
  tier: text('tier').primaryKey(),
  breaker: text('breaker', { enum: ['closed', 'open', 'half_open'] }).notNull(),
  failures: integer('failures').notNull(),
  openUntil: integer('open_until').notNull(),
  probeOwner: text('probe_owner'),
  probeUntil: integer('probe_until').notNull(),
  downUntil: integer('down_until').notNull(),
  misconfigured: text('misconfigured'),
  updatedAt: integer('updated_at').notNull(),
});

/**
 * Runs waiting for a worker: queued to start, parked until an outage passes, or asleep in a durable
 * wait. A row exists only while its run waits; the worker claims runs whose `due_at` has come, best
 * `priority` first. A run waiting for a signal with no timeout has no due time.
 */
export const queue = sqliteTable(
  'queue',
  {
    runId: text('run_id')
      .primaryKey()
      .references(() => runs.id),
    workflow: text('workflow').notNull(),
    dueAt: integer('due_at'),
    priority: integer('priority').notNull().default(0),
    /** Times the run was parked since it last made progress. */
    parks: integer('parks').notNull().default(0),
    /** When the current stretch of waiting began, for the limit on total waiting. */
    waitingSince: integer('waiting_since'),
    /** Why it waits: `queued`, `parked`, `sleep`, `signal`. */
    reason: text('reason').notNull(),
    lastError: text('last_error'),
    /** JSON array of the parks so far: when, at which step, why, for how long. */
    history: text('history').notNull().default('[]'),
    createdAt: integer('created_at').notNull(),
  },
  (t) => [
    // Partial, like the next: a run being worked on, or waiting for a signal with no timeout, has
    // no due time, and its queue row then changes without touching either index.
    index('queue_due_idx')
      .on(t.dueAt, t.priority)
      .where(sql`due_at IS NOT NULL`),
    // The worker's look at the queue, in the order it claims: read in index order and stopped at
    // its limit, instead of sorting every due entry on every look.
    index('queue_ready_idx')
      .on(sql`${t.priority} DESC`, t.dueAt, t.createdAt)
      .where(sql`due_at IS NOT NULL`),
  ],
);

/** Runs that could not finish: what failed, where, and the attempts that led there. */
export const deadLetters = sqliteTable('dead_letters', {
  runId: text('run_id')
    .primaryKey()
    .references(() => runs.id),
  workflow: text('workflow').notNull(),
  step: text('step'),
  /** `attempts` (the step's retries are spent), `wait_limit`, or `not_retryable`. */
  reason: text('reason').notNull(),
  /** The serialized error, with its chain of causes. */
  error: text('error').notNull(),
  /** JSON array of the attempts and parks with their timestamps. */
  history: text('history').notNull(),
  createdAt: integer('created_at').notNull(),
  /** Set by `keel dlq drop`; a dropped entry is kept for the record but no longer listed. */
  droppedAt: integer('dropped_at'),
});

/** Durable waits: `ctx.sleep` and `ctx.waitFor`, by name within a run. */
export const waits = sqliteTable(
  'waits',
  {
    runId: text('run_id')
      .notNull()
      .references(() => runs.id),
    name: text('name').notNull(),
    kind: text('kind', { enum: ['sleep', 'signal'] }).notNull(),
    step: text('step').notNull(),
    status: text('status', { enum: ['waiting', 'fired', 'timed_out'] }).notNull(),
    /** When a sleep ends or a wait for a signal times out; null for a wait with no timeout. */
    dueAt: integer('due_at'),
    /** The signal's payload, encoded, once delivered. */
    payload: text('payload'),
    createdAt: integer('created_at').notNull(),
    firedAt: integer('fired_at'),
  },
  (t) => [primaryKey({ columns: [t.runId, t.name] })],
);

/** Signals sent to runs, kept until a wait of the same name takes them, in the order sent. */
export const signals = sqliteTable(
  'signals',
  {
    id: integer('id').primaryKey({ autoIncrement: true }),
    runId: text('run_id')
      .notNull()
      .references(() => runs.id),
    name: text('name').notNull(),
    payload: text('payload'),
    sentAt: integer('sent_at').notNull(),
    consumedAt: integer('consumed_at'),
  },
  (t) => [index('signals_run_idx').on(t.runId, t.name, t.id)],
);
