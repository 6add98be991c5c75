/**
 * The SQLite store: keel's embedded default, over better-sqlite3 and drizzle.
 *
 * better-sqlite3 is synchronous, so a milestone is one synchronous `BEGIN IMMEDIATE` transaction with
 * no await inside it: either all of its rows are committed or none (an async function inside a
 * better-sqlite3 transaction would commit before its awaits finish). Statements are prepared once
 * and reused; the run update is prepared per set of columns it touches.
 */
import type Database from 'better-sqlite3';
import {
  and,
  asc,
  desc,
  eq,
  getTableColumns,
  getTableName,
  inArray,
  sql,
  type SQL,
} from 'drizzle-orm';
import type { SQLiteColumn } from 'drizzle-orm/sqlite-core';
import { drizzle, type BetterSQLite3Database } from 'drizzle-orm/better-sqlite3';
import { LeaseError } from '../../engine/errors.ts';
import type {
  CheckpointRecord,
  CommitHooks,
  DeadLetter,
  EffectRecord,
  LeaseClaim,
  LlmCallRecord,
  Milestone,
  QueueEntry,
  RunFilter,
  SignalRecord,
  WaitRecord,
  RunRecord,
  RunStatus,
  RunUpdate,
  StepRecord,
  Store,
  EffectStatus,
} from '../../engine/store.ts';
import { initialTierState, type TierState } from '../../engine/llm/tier-state.ts';
import { openDatabase, translate, type SqliteOptions } from './open.ts';
import * as schema from './schema.ts';

const { runs, runSpecs, checkpoints, steps, effects, llmCalls, llmTiers, queue, deadLetters } =
  schema;
type RunRow = typeof runs.$inferSelect & Omit<typeof runSpecs.$inferSelect, 'runId' | 'queueKey'>;
const RUN_SELECTION = {
  ...getTableColumns(runs),
  graph: runSpecs.graph,
  input: runSpecs.input,
  options: runSpecs.options,
};

/**
 * `"table"."column" AS "field"` for each field: a plain prepared statement then returns rows shaped
 * as drizzle's query builder would, without building the query (and preparing it) on every call,
 * which cost more than the query itself on the worker's path.
 */
function selectList(fields: Record<string, SQLiteColumn>): string {
  return Object.entries(fields)
    .map(([field, column]) => `"${getTableName(column.table)}"."${column.name}" AS "${field}"`)
    .join(', ');
}

/**
 * The worker's look at the queue: due entries in claim order, read from queue_ready_idx in index
 * order and stopped at the limit. Named, because with two partial indexes on the queue the planner
 * may pick the due-time one and sort every due entry on every look (a millisecond at 3,000).
 */
export const DUE_RUNS_SQL = `SELECT * FROM queue INDEXED BY queue_ready_idx
  WHERE due_at IS NOT NULL AND due_at <= ?
  ORDER BY priority DESC, due_at ASC, created_at ASC LIMIT ?`;

const RUN_COLUMNS: Record<string, string> = {
  status: 'status',
  cursor: 'cursor',
  cursorAttempts: 'cursor_attempts',
  stepCount: 'step_count',
  seq: 'seq',
  snapshotSeq: 'snapshot_seq',
  snapshotBytes: 'snapshot_bytes',
  patchBytes: 'patch_bytes',
  patchCount: 'patch_count',
  error: 'error',
  endedAt: 'ended_at',
  version: 'version',
  fingerprint: 'fingerprint',
  module: 'module',
  leaseExpiresAt: 'lease_expires_at',
};

export class SqliteStore implements Store {
  readonly sqlite: Database.Database;
  readonly db: BetterSQLite3Database<typeof schema>;
  private readonly file: string;
  private readonly runUpdates = new Map<string, Database.Statement>();
  private readonly statements;
  private readonly commitTx;
  private readonly claimIdleTx;
  private readonly recordLlmTx;
  private readonly updateTierTx;

  constructor(sqlite: Database.Database, file: string) {
    this.sqlite = sqlite;
    this.file = file;
    this.db = drizzle(sqlite, { schema });
    const p = (text: string) => sqlite.prepare(text);
    this.statements = {
      insertCheckpoint: p(
        'INSERT INTO checkpoints (run_id, seq, kind, step, data, created_at) VALUES (?, ?, ?, ?, ?, ?)',
      ),
      insertStep: p(
        'INSERT INTO steps (run_id, idx, epoch, name, status, attempts, next, started_at, ended_at, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
      ),
      upsertEffect: p(
        `INSERT INTO effects (run_id, key, name, step, status, result, error, attempts, started_at, completed_at, completion_order, compensation_attempts, compensated_at, compensable)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (run_id, key) DO UPDATE SET status = excluded.status, result = excluded.result,
           error = excluded.error, attempts = excluded.attempts, completed_at = excluded.completed_at,
           completion_order = excluded.completion_order, compensation_attempts = excluded.compensation_attempts,
           compensated_at = excluded.compensated_at`,
      ),
      releaseLease: p(
        'UPDATE runs SET lease_owner = NULL, lease_pid = NULL, lease_host = NULL, lease_expires_at = NULL WHERE id = ?',
      ),
      updateGraph: p('UPDATE run_specs SET graph = ? WHERE run_id = ?'),
      renewLease: p(
        'UPDATE runs SET lease_expires_at = ? WHERE id = ? AND epoch = ? AND lease_owner IS NOT NULL',
      ),
      heldAt: p('SELECT 1 FROM runs WHERE id = ? AND epoch = ?'),
      deleteQueue: p('DELETE FROM queue WHERE run_id = ?'),
      deleteDeadLetter: p('DELETE FROM dead_letters WHERE run_id = ?'),
      upsertWait: p(
        `INSERT OR REPLACE INTO waits (run_id, name, kind, step, status, due_at, payload, created_at,
           fired_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      ),
      getWait: p('SELECT * FROM waits WHERE run_id = ? AND name = ?'),
      listWaits: p('SELECT * FROM waits WHERE run_id = ? ORDER BY created_at, name'),
      nextSignal: p(
        'SELECT * FROM signals WHERE run_id = ? AND name = ? AND consumed_at IS NULL ORDER BY id LIMIT 1',
      ),
      insertSignal: p('INSERT INTO signals (run_id, name, payload, sent_at) VALUES (?, ?, ?, ?)'),
      consumeSignal: p('UPDATE signals SET consumed_at = ? WHERE id = ?'),
      wakeWaiting: p(
        `UPDATE queue SET due_at = ? WHERE run_id = ? AND reason = 'signal'
           AND EXISTS (SELECT 1 FROM waits WHERE run_id = ? AND name = ? AND status = 'waiting')`,
      ),
      wakeIfSignalled: p(
        `UPDATE queue SET due_at = ? WHERE run_id = ? AND EXISTS
           (SELECT 1 FROM signals WHERE run_id = ? AND name = ? AND consumed_at IS NULL)`,
      ),
      requestCancel: p('UPDATE runs SET cancel_requested = ? WHERE id = ?'),
      cancelRequest: p('SELECT cancel_requested AS c FROM runs WHERE id = ?'),
      // An upsert updates the row in place: only the indexes whose columns change are written,
      // where INSERT OR REPLACE deletes and inserts it again, touching every index.
      upsertQueue: p(
        `INSERT INTO queue (run_id, workflow, due_at, priority, parks, waiting_since, reason,
           last_error, history, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (run_id) DO UPDATE SET workflow = excluded.workflow, due_at = excluded.due_at,
           priority = excluded.priority, parks = excluded.parks,
           waiting_since = excluded.waiting_since, reason = excluded.reason,
           last_error = excluded.last_error, history = excluded.history,
           created_at = excluded.created_at`,
      ),
      dueRuns: p(DUE_RUNS_SQL),
      upsertDeadLetter: p(
        `INSERT OR REPLACE INTO dead_letters (run_id, workflow, step, reason, error, history, created_at,
           dropped_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
      ),
      runByKey: p('SELECT run_id FROM run_specs WHERE queue_key = ?'),
      upsertLlmCall: p(
        `INSERT OR REPLACE INTO llm_calls (run_id, step_index, position, step, request_hash, status, streamed,
           response, error, tier, provider, model, degraded, attempts, input_tokens, output_tokens,
           cache_read_tokens, cache_write_tokens, cost_usd, latency_ms, replays, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      ),
      getLlmCall: p('SELECT * FROM llm_calls WHERE run_id = ? AND step_index = ? AND position = ?'),
      markLlmReplayed: p(
        'UPDATE llm_calls SET replays = replays + 1, updated_at = ? WHERE run_id = ? AND step_index = ? AND position = ?',
      ),
      getTier: p('SELECT * FROM llm_tiers WHERE tier = ?'),
      getRun: p(
        `SELECT ${selectList(RUN_SELECTION)} FROM runs
         JOIN run_specs ON run_specs.run_id = runs.id WHERE runs.id = ?`,
      ),
      claimIdle: p(
        `UPDATE runs SET epoch = epoch + 1, lease_owner = ?, lease_pid = ?, lease_host = ?,
           lease_expires_at = ? WHERE id = ? AND epoch = ? AND lease_owner IS NULL AND seq = ?
           AND updated_at = ? AND cancel_requested = 0`,
      ),
      claimLease: p(
        `UPDATE runs SET epoch = epoch + 1, lease_owner = ?, lease_pid = ?, lease_host = ?,
           lease_expires_at = ? WHERE id = ? AND epoch = ?`,
      ),
      getQueueEntry: p(`SELECT ${selectList(getTableColumns(queue))} FROM queue WHERE run_id = ?`),
      nextDueAt: p('SELECT min(due_at) AS next FROM queue WHERE due_at IS NOT NULL'),
      queueSize: p('SELECT count(*) AS n FROM queue'),
      loadCheckpoints: p(
        `SELECT ${selectList(getTableColumns(checkpoints))} FROM checkpoints
         WHERE run_id = ? AND seq >= ? ORDER BY seq`,
      ),
      listSteps: p(
        `SELECT ${selectList(getTableColumns(steps))} FROM steps
         WHERE run_id = ? ORDER BY idx, epoch`,
      ),
      // Start times are milliseconds, and effects a few steps apart often share one: ties go by the
      // order the effects completed (those still open last), then by key, never by scan order.
      listEffects: p(
        `SELECT ${selectList(getTableColumns(effects))} FROM effects WHERE run_id = ?
         ORDER BY started_at, completion_order IS NULL, completion_order, key`,
      ),
      getEffect: p(
        `SELECT ${selectList(getTableColumns(effects))} FROM effects WHERE run_id = ? AND key = ?`,
      ),
      putTier: p(
        `INSERT OR REPLACE INTO llm_tiers (tier, breaker, failures, open_until, probe_owner, probe_until,
           down_until, misconfigured, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      ),
    };
    this.recordLlmTx = sqlite.transaction((epoch: number, c: LlmCallRecord) => {
      if (this.statements.heldAt.get(c.runId, epoch) === undefined) throw leaseLost(c.runId, epoch);
      this.statements.upsertLlmCall.run(
        c.runId,
        c.stepIndex,
        c.position,
        c.step,
        c.requestHash,
        c.status,
        c.streamed ? 1 : 0,
        c.response,
        c.error,
        c.tier,
        c.provider,
        c.model,
        c.degraded ? 1 : 0,
        c.attempts,
        c.inputTokens,
        c.outputTokens,
        c.cacheReadTokens,
        c.cacheWriteTokens,
        c.costUsd,
        c.latencyMs,
        c.replays,
        c.createdAt,
        c.updatedAt,
      );
    });
    this.updateTierTx = sqlite.transaction(
      (tier: string, change: (current: TierState) => TierState): TierState => {
        const row = this.statements.getTier.get(tier) as TierRow | undefined;
        const next = change(row ? fromTierRow(row) : initialTierState(tier));
        this.statements.putTier.run(
          tier,
          next.breaker,
          next.failures,
          next.openUntil,
          next.probeOwner,
          next.probeUntil,
          next.downUntil,
          next.misconfigured,
          next.updatedAt,
        );
        return next;
      },
    );
    this.commitTx = sqlite.transaction(
      (id: string, epoch: number, milestone: Milestone, now: number, hooks?: CommitHooks) =>
        this.writeMilestone(id, epoch, milestone, now, hooks),
    );
    this.claimIdleTx = sqlite.transaction(
      (
        id: string,
        expected: Pick<RunRecord, 'epoch' | 'seq' | 'updatedAt' | 'cancelRequested'>,
        claim: LeaseClaim,
        milestone: Milestone,
        now: number,
        hooks?: CommitHooks,
      ): number | null => {
        const claimed = this.statements.claimIdle.run(
          claim.owner,
          claim.pid,
          claim.host,
          claim.expiresAt,
          id,
          expected.epoch,
          expected.seq,
          expected.updatedAt,
        );
        if (claimed.changes !== 1) return null;
        this.writeMilestone(id, expected.epoch + 1, milestone, now, hooks);
        return expected.epoch + 1;
      },
    );
  }

  /** One milestone's rows, inside the caller's transaction. */
  private writeMilestone(
    id: string,
    epoch: number,
    milestone: Milestone,
    now: number,
    hooks?: CommitHooks,
  ): void {
    const changed = this.updateRun(id, epoch, milestone.run ?? {}, now);
    if (changed === 0) throw leaseLost(id, epoch);
    if (milestone.run?.graph !== undefined)
      this.statements.updateGraph.run(milestone.run.graph, id);
    hooks?.inside?.();
    if (milestone.checkpoint) this.insertCheckpoint(milestone.checkpoint);
    if (milestone.step) this.insertStep(milestone.step, epoch);
    if (milestone.effect) this.upsertEffect(milestone.effect);
    if (milestone.queue === null) this.statements.deleteQueue.run(id);
    else if (milestone.queue) this.upsertQueue(milestone.queue);
    if (milestone.wait) this.upsertWait(milestone.wait);
    // A signal sent while the run was deciding to wait for it: due at once, not never.
    if (milestone.queue && milestone.wait?.kind === 'signal' && milestone.wait.status === 'waiting')
      this.statements.wakeIfSignalled.run(now, id, id, milestone.wait.name);
    if (milestone.consumeSignal)
      this.statements.consumeSignal.run(milestone.consumeSignal.at, milestone.consumeSignal.id);
    if (milestone.deadLetter === null) this.statements.deleteDeadLetter.run(id);
    else if (milestone.deadLetter) this.upsertDeadLetter(milestone.deadLetter);
    if (milestone.run?.lease === null) this.statements.releaseLease.run(id);
  }

  async createRun(run: RunRecord, snapshot: CheckpointRecord): Promise<void> {
    this.guard(() =>
      this.sqlite
        .transaction(() => {
          const { graph, input, options, ...row } = toRow(run);
          this.db.insert(runs).values(row).run();
          this.db.insert(runSpecs).values({ runId: run.id, graph, input, options }).run();
          this.insertCheckpoint(snapshot);
        })
        .immediate(),
    );
  }

  async enqueueRun(
    run: RunRecord,
    snapshot: CheckpointRecord,
    entry: QueueEntry,
    key?: string,
  ): Promise<{ runId: string; created: boolean }> {
    return this.guard(() =>
      this.sqlite
        .transaction(() => {
          if (key !== undefined) {
            const existing = this.statements.runByKey.get(key) as { run_id: string } | undefined;
            if (existing) return { runId: existing.run_id, created: false };
          }
          const { graph, input, options, ...row } = toRow(run);
          this.db.insert(runs).values(row).run();
          this.db
            .insert(runSpecs)
            .values({ runId: run.id, graph, input, options, queueKey: key ?? null })
            .run();
          this.insertCheckpoint(snapshot);
          this.upsertQueue(entry);
          return { runId: run.id, created: true };
        })
        .immediate(),
    );
  }

  async getWait(runId: string, name: string): Promise<WaitRecord | undefined> {
    const row = this.guard(() => this.statements.getWait.get(runId, name) as WaitRow | undefined);
    return row && fromWaitRow(row);
  }

  async listWaits(runId: string): Promise<WaitRecord[]> {
    return this.guard(() => this.statements.listWaits.all(runId) as WaitRow[]).map(fromWaitRow);
  }

  async nextSignal(runId: string, name: string): Promise<SignalRecord | undefined> {
    const row = this.guard(
      () =>
        this.statements.nextSignal.get(runId, name) as
          | {
              id: number;
              run_id: string;
              name: string;
              payload: string | null;
              sent_at: number;
              consumed_at: number | null;
            }
          | undefined,
    );
    return (
      row && {
        id: row.id,
        runId: row.run_id,
        name: row.name,
        payload: row.payload,
        sentAt: row.sent_at,
        consumedAt: row.consumed_at,
      }
    );
  }

  async sendSignal(
    runId: string,
    name: string,
    payload: string | null,
    at: number,
  ): Promise<boolean> {
    return this.guard(() =>
      this.sqlite
        .transaction(() => {
          this.statements.insertSignal.run(runId, name, payload, at);
          return this.statements.wakeWaiting.run(at, runId, runId, name).changes === 1;
        })
        .immediate(),
    );
  }

  async requestCancel(runId: string, mode: 1 | 2): Promise<void> {
    this.guard(() => this.statements.requestCancel.run(mode, runId));
  }

  async cancelRequest(runId: string): Promise<0 | 1 | 2> {
    const row = this.guard(
      () => this.statements.cancelRequest.get(runId) as { c: number } | undefined,
    );
    return (row?.c ?? 0) as 0 | 1 | 2;
  }

  async dueRuns(now: number, limit: number): Promise<QueueEntry[]> {
    const rows = this.guard(() => this.statements.dueRuns.all(now, limit) as QueueRow[]);
    return rows.map(fromQueueRow);
  }

  async getQueueEntry(runId: string): Promise<QueueEntry | undefined> {
    const row = this.guard(
      () => this.statements.getQueueEntry.get(runId) as typeof queue.$inferSelect | undefined,
    );
    return row && { ...row, reason: row.reason as QueueEntry['reason'] };
  }

  async queueStats(): Promise<{ waiting: number; nextDueAt: number | null }> {
    return this.guard(() => {
      const { n } = this.statements.queueSize.get() as { n: number };
      const { next } = this.statements.nextDueAt.get() as { next: number | null };
      return { waiting: n, nextDueAt: next };
    });
  }

  async nextDueAt(): Promise<number | null> {
    return this.guard(() => (this.statements.nextDueAt.get() as { next: number | null }).next);
  }

  async listDeadLetters(options: { includeDropped?: boolean } = {}): Promise<DeadLetter[]> {
    const rows = this.guard(() =>
      this.db
        .select()
        .from(deadLetters)
        .where(options.includeDropped ? undefined : sql`${deadLetters.droppedAt} IS NULL`)
        .orderBy(desc(deadLetters.createdAt), desc(deadLetters.runId))
        .all(),
    );
    return rows.map((r) => ({ ...r, reason: r.reason as DeadLetter['reason'] }));
  }

  async getDeadLetter(runId: string): Promise<DeadLetter | undefined> {
    const row = this.guard(() =>
      this.db.select().from(deadLetters).where(eq(deadLetters.runId, runId)).get(),
    );
    return row && { ...row, reason: row.reason as DeadLetter['reason'] };
  }

  async dropDeadLetter(runId: string, at: number): Promise<boolean> {
    const result = this.guard(() =>
      this.db
        .update(deadLetters)
        .set({ droppedAt: at })
        .where(and(eq(deadLetters.runId, runId), sql`${deadLetters.droppedAt} IS NULL`))
        .run(),
    );
    return result.changes === 1;
  }

  async requeueDeadLetter(runId: string, entry: QueueEntry): Promise<boolean> {
    return this.guard(() =>
      this.sqlite
        .transaction(() => {
          const removed = this.db.delete(deadLetters).where(eq(deadLetters.runId, runId)).run();
          if (removed.changes !== 1) return false;
          this.db
            .update(runs)
            .set({
              status: 'waiting',
              cursorAttempts: 0,
              error: null,
              endedAt: null,
              updatedAt: entry.createdAt,
            })
            .where(eq(runs.id, runId))
            .run();
          this.upsertQueue(entry);
          return true;
        })
        .immediate(),
    );
  }

  async getRun(id: string): Promise<RunRecord | undefined> {
    const row = this.guard(() => this.statements.getRun.get(id) as RunRow | undefined);
    return row && fromRow(row);
  }

  async listRuns(filter: RunFilter = {}): Promise<RunRecord[]> {
    const conditions: SQL[] = [];
    if (filter.status !== undefined) {
      const statuses = (
        typeof filter.status === 'string' ? [filter.status] : filter.status
      ) as string[];
      conditions.push(inArray(runs.status, statuses));
    }
    if (filter.workflow !== undefined) conditions.push(eq(runs.workflow, filter.workflow));
    const rows = this.guard(() =>
      this.selectRuns()
        .where(conditions.length ? and(...conditions) : undefined)
        .orderBy(desc(runs.createdAt), desc(runs.id))
        .limit(filter.limit ?? -1)
        .all(),
    );
    return rows.map(fromRow);
  }

  private selectRuns() {
    return this.db
      .select(RUN_SELECTION)
      .from(runs)
      .innerJoin(runSpecs, eq(runSpecs.runId, runs.id));
  }

  async claimLease(id: string, expectedEpoch: number, claim: LeaseClaim): Promise<number | null> {
    const result = this.guard(() =>
      this.statements.claimLease.run(
        claim.owner,
        claim.pid,
        claim.host,
        claim.expiresAt,
        id,
        expectedEpoch,
      ),
    );
    return result.changes === 1 ? expectedEpoch + 1 : null;
  }

  async claimIdle(
    id: string,
    expected: Pick<RunRecord, 'epoch' | 'seq' | 'updatedAt' | 'cancelRequested'>,
    claim: LeaseClaim,
    milestone: Milestone,
    hooks?: CommitHooks,
  ): Promise<number | null> {
    return this.guard(() =>
      this.claimIdleTx.immediate(id, expected, claim, milestone, Date.now(), hooks),
    );
  }

  async renewLease(id: string, epoch: number, expiresAt: number): Promise<boolean> {
    return this.guard(() => this.statements.renewLease.run(expiresAt, id, epoch).changes === 1);
  }

  async commit(
    id: string,
    epoch: number,
    milestone: Milestone,
    hooks?: CommitHooks,
  ): Promise<void> {
    this.guard(() => this.commitTx.immediate(id, epoch, milestone, Date.now(), hooks));
  }

  async loadCheckpoints(id: string, fromSeq: number): Promise<CheckpointRecord[]> {
    return this.guard(() => this.statements.loadCheckpoints.all(id, fromSeq) as CheckpointRecord[]);
  }

  async listSteps(id: string): Promise<StepRecord[]> {
    return this.guard(() => this.statements.listSteps.all(id) as (typeof steps.$inferSelect)[]).map(
      ({ epoch: _epoch, ...step }) => step,
    );
  }

  async listEffects(id: string): Promise<EffectRecord[]> {
    const rows = this.guard(() => this.statements.listEffects.all(id) as EffectRow[]);
    return rows.map(fromEffectRow);
  }

  async getEffect(id: string, key: string): Promise<EffectRecord | undefined> {
    const row = this.guard(() => this.statements.getEffect.get(id, key) as EffectRow | undefined);
    return row && fromEffectRow(row);
  }

  async recordLlmCall(epoch: number, call: LlmCallRecord): Promise<void> {
    this.guard(() => this.recordLlmTx.immediate(epoch, call));
  }

  async getLlmCall(
    id: string,
    stepIndex: number,
    position: number,
  ): Promise<LlmCallRecord | undefined> {
    const row = this.guard(
      () => this.statements.getLlmCall.get(id, stepIndex, position) as LlmCallRow | undefined,
    );
    return row && fromLlmCallRow(row);
  }

  async markLlmReplayed(id: string, stepIndex: number, position: number, at: number) {
    this.guard(() => this.statements.markLlmReplayed.run(at, id, stepIndex, position));
  }

  async listLlmCalls(id: string): Promise<LlmCallRecord[]> {
    return this.guard(() =>
      this.db
        .select()
        .from(llmCalls)
        .where(eq(llmCalls.runId, id))
        .orderBy(asc(llmCalls.stepIndex), asc(llmCalls.position))
        .all(),
    ).map((r) => ({ ...r, status: r.status }));
  }

  async readTierState(tier: string): Promise<TierState | undefined> {
    const row = this.guard(() => this.statements.getTier.get(tier) as TierRow | undefined);
    return row && fromTierRow(row);
  }

  async updateTierState(
    tier: string,
    change: (current: TierState) => TierState,
  ): Promise<TierState> {
    return this.guard(() => this.updateTierTx.immediate(tier, change));
  }

  async listTierStates(): Promise<TierState[]> {
    return this.guard(() => this.db.select().from(llmTiers).orderBy(asc(llmTiers.tier)).all());
  }

  async close(): Promise<void> {
    if (this.sqlite.open) this.sqlite.close();
  }

  private updateRun(id: string, epoch: number, update: RunUpdate, now: number): number {
    const fields = Object.keys(update).filter(
      (k) => k !== 'lease' && k in RUN_COLUMNS && update[k as keyof RunUpdate] !== undefined,
    );
    const shape = fields.join(',');
    let statement = this.runUpdates.get(shape);
    if (!statement) {
      const sets = fields.map((f) => `${RUN_COLUMNS[f]} = ?`);
      sets.push('updated_at = ?');
      statement = this.sqlite.prepare(
        `UPDATE runs SET ${sets.join(', ')} WHERE id = ? AND epoch = ?`,
      );
      this.runUpdates.set(shape, statement);
    }
    const values = fields.map((f) => update[f as keyof RunUpdate] as unknown);
    return statement.run(...values, now, id, epoch).changes;
  }

  private insertCheckpoint(c: CheckpointRecord): void {
    this.statements.insertCheckpoint.run(c.runId, c.seq, c.kind, c.step, c.data, c.createdAt);
  }

  private insertStep(s: StepRecord, epoch: number): void {
    this.statements.insertStep.run(
      s.runId,
      s.index,
      epoch,
      s.name,
      s.status,
      s.attempts,
      s.next,
      s.startedAt,
      s.endedAt,
      s.error,
    );
  }

  private upsertWait(w: WaitRecord): void {
    this.statements.upsertWait.run(
      w.runId,
      w.name,
      w.kind,
      w.step,
      w.status,
      w.dueAt,
      w.payload,
      w.createdAt,
      w.firedAt,
    );
  }

  private upsertQueue(q: QueueEntry): void {
    this.statements.upsertQueue.run(
      q.runId,
      q.workflow,
      q.dueAt,
      q.priority,
      q.parks,
      q.waitingSince,
      q.reason,
      q.lastError,
      q.history,
      q.createdAt,
    );
  }

  private upsertDeadLetter(d: DeadLetter): void {
    this.statements.upsertDeadLetter.run(
      d.runId,
      d.workflow,
      d.step,
      d.reason,
      d.error,
      d.history,
      d.createdAt,
      d.droppedAt,
    );
  }

  private upsertEffect(e: EffectRecord): void {
    this.statements.upsertEffect.run(
      e.runId,
      e.key,
      e.name,
      e.step,
      e.status,
      e.result,
      e.error,
      e.attempts,
      e.startedAt,
      e.completedAt,
      e.completionOrder,
      e.compensationAttempts,
      e.compensatedAt,
      e.compensable ? 1 : 0,
    );
  }

  private guard<T>(work: () => T): T {
    try {
      return work();
    } catch (error) {
      throw translate(error, this.file);
    }
  }
}

function leaseLost(id: string, epoch: number): LeaseError {
  return new LeaseError(
    'LEASE_LOST',
    `Run ${id} is no longer held at epoch ${epoch}: another process took it over.`,
    {
      runId: id,
      hint: 'This write was refused; the new owner carries the run on from its last checkpoint.',
    },
  );
}

type WaitRow = {
  run_id: string;
  name: string;
  kind: WaitRecord['kind'];
  step: string;
  status: WaitRecord['status'];
  due_at: number | null;
  payload: string | null;
  created_at: number;
  fired_at: number | null;
};

const fromWaitRow = (r: WaitRow): WaitRecord => ({
  runId: r.run_id,
  name: r.name,
  kind: r.kind,
  step: r.step,
  status: r.status,
  dueAt: r.due_at,
  payload: r.payload,
  createdAt: r.created_at,
  firedAt: r.fired_at,
});

type QueueRow = {
  run_id: string;
  workflow: string;
  due_at: number | null;
  priority: number;
  parks: number;
  waiting_since: number | null;
  reason: QueueEntry['reason'];
  last_error: string | null;
  history: string;
  created_at: number;
};

const fromQueueRow = (r: QueueRow): QueueEntry => ({
  runId: r.run_id,
  workflow: r.workflow,
  dueAt: r.due_at,
  priority: r.priority,
  parks: r.parks,
  waitingSince: r.waiting_since,
  reason: r.reason,
  lastError: r.last_error,
  history: r.history,
  createdAt: r.created_at,
});

type TierRow = {
  tier: string;
  breaker: TierState['breaker'];
  failures: number;
  open_until: number;
  probe_owner: string | null;
  probe_until: number;
  down_until: number;
  misconfigured: string | null;
  updated_at: number;
};

const fromTierRow = (r: TierRow): TierState => ({
  tier: r.tier,
  breaker: r.breaker,
  failures: r.failures,
  openUntil: r.open_until,
  probeOwner: r.probe_owner,
  probeUntil: r.probe_until,
  downUntil: r.down_until,
  misconfigured: r.misconfigured,
  updatedAt: r.updated_at,
});

type LlmCallRow = {
  run_id: string;
  step_index: number;
  position: number;
  step: string;
  request_hash: string;
  status: LlmCallRecord['status'];
  streamed: number;
  response: string | null;
  error: string | null;
  tier: string | null;
  provider: string | null;
  model: string | null;
  degraded: number;
  attempts: string;
  input_tokens: number;
  output_tokens: number;
  cache_read_tokens: number;
  cache_write_tokens: number;
  cost_usd: number | null;
  latency_ms: number;
  replays: number;
  created_at: number;
  updated_at: number;
};

const fromLlmCallRow = (r: LlmCallRow): LlmCallRecord => ({
  runId: r.run_id,
  stepIndex: r.step_index,
  position: r.position,
  step: r.step,
  requestHash: r.request_hash,
  status: r.status,
  streamed: r.streamed === 1,
  response: r.response,
  error: r.error,
  tier: r.tier,
  provider: r.provider,
  model: r.model,
  degraded: r.degraded === 1,
  attempts: r.attempts,
  inputTokens: r.input_tokens,
  outputTokens: r.output_tokens,
  cacheReadTokens: r.cache_read_tokens,
  cacheWriteTokens: r.cache_write_tokens,
  costUsd: r.cost_usd,
  latencyMs: r.latency_ms,
  replays: r.replays,
  createdAt: r.created_at,
  updatedAt: r.updated_at,
});

function toRow(
  run: RunRecord,
): typeof runs.$inferInsert & Omit<typeof runSpecs.$inferInsert, 'runId'> {
  const { lease, cancelRequested, ...rest } = run;
  return {
    ...rest,
    cancelRequested: cancelRequested ? 1 : 0,
    leaseOwner: lease?.owner ?? null,
    leasePid: lease?.pid ?? null,
    leaseHost: lease?.host ?? null,
    leaseExpiresAt: lease?.expiresAt ?? null,
  };
}

/** An effect row as a plain statement returns it: its flag is SQLite's 0 or 1. */
type EffectRow = Omit<typeof effects.$inferSelect, 'compensable'> & { compensable: number };
const fromEffectRow = (r: EffectRow): EffectRecord => ({
  ...r,
  status: r.status as EffectStatus,
  compensable: r.compensable === 1,
});

function fromRow(row: RunRow): RunRecord {
  const { leaseOwner, leasePid, leaseHost, leaseExpiresAt, cancelRequested, ...rest } = row;
  return {
    ...rest,
    cancelRequested: cancelRequested !== 0,
    status: rest.status as RunStatus,
    lease:
      leaseOwner === null
        ? null
        : {
            owner: leaseOwner,
            pid: leasePid ?? 0,
            host: leaseHost ?? '',
            expiresAt: leaseExpiresAt ?? 0,
          },
  };
}

/** Opens (creating and migrating as needed) a SQLite store at `path`. */
export function openSqliteStore(path: string, options: SqliteOptions = {}): SqliteStore {
  return new SqliteStore(openDatabase(path, options), path);
}
