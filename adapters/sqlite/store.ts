/**
 * The SQLite store: keel's embedded default, over better-sqlite3 and drizzle.
 *
 * better-sqlite3 is synchronous, so a milestone is one synchronous `BEGIN IMMEDIATE` transaction with
 * no await inside it: either all of its rows are committed or none (an async function inside a
 * better-sqlite3 transaction would commit before its awaits finish). Statements are prepared once
 * and reused; the run update is prepared per set of columns it touches.
 */
import type Database from 'better-sqlite3';
import { and, asc, desc, eq, getTableColumns, gte, inArray, sql, type SQL } from 'drizzle-orm';
import { drizzle, type BetterSQLite3Database } from 'drizzle-orm/better-sqlite3';
import { LeaseError } from '../../engine/errors.ts';
import type {
  CheckpointRecord,
  CommitHooks,
  EffectRecord,
  LeaseClaim,
  Milestone,
  RunFilter,
  RunRecord,
  RunStatus,
  RunUpdate,
  StepRecord,
  Store,
  EffectStatus,
} from '../../engine/store.ts';
import { openDatabase, translate, type SqliteOptions } from './open.ts';
import * as schema from './schema.ts';

const { runs, runSpecs, checkpoints, steps, effects } = schema;
type RunRow = typeof runs.$inferSelect & Omit<typeof runSpecs.$inferSelect, 'runId'>;
const RUN_SELECTION = {
  ...getTableColumns(runs),
  graph: runSpecs.graph,
  input: runSpecs.input,
  options: runSpecs.options,
};

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
    };
    this.commitTx = sqlite.transaction(
      (id: string, epoch: number, milestone: Milestone, now: number, hooks?: CommitHooks) => {
        const changed = this.updateRun(id, epoch, milestone.run ?? {}, now);
        if (changed === 0) throw leaseLost(id, epoch);
        if (milestone.run?.graph !== undefined)
          this.statements.updateGraph.run(milestone.run.graph, id);
        hooks?.inside?.();
        if (milestone.checkpoint) this.insertCheckpoint(milestone.checkpoint);
        if (milestone.step) this.insertStep(milestone.step, epoch);
        if (milestone.effect) this.upsertEffect(milestone.effect);
        if (milestone.run?.lease === null) this.statements.releaseLease.run(id);
      },
    );
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

  async getRun(id: string): Promise<RunRecord | undefined> {
    const row = this.guard(() => this.selectRuns().where(eq(runs.id, id)).get());
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
      this.db
        .update(runs)
        .set({
          epoch: sql`${runs.epoch} + 1`,
          leaseOwner: claim.owner,
          leasePid: claim.pid,
          leaseHost: claim.host,
          leaseExpiresAt: claim.expiresAt,
        })
        .where(and(eq(runs.id, id), eq(runs.epoch, expectedEpoch)))
        .run(),
    );
    return result.changes === 1 ? expectedEpoch + 1 : null;
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
    const rows = this.guard(() =>
      this.db
        .select()
        .from(checkpoints)
        .where(and(eq(checkpoints.runId, id), gte(checkpoints.seq, fromSeq)))
        .orderBy(asc(checkpoints.seq))
        .all(),
    );
    return rows;
  }

  async listSteps(id: string): Promise<StepRecord[]> {
    return this.guard(() =>
      this.db
        .select()
        .from(steps)
        .where(eq(steps.runId, id))
        .orderBy(asc(steps.index), asc(steps.epoch))
        .all(),
    ).map(({ epoch: _epoch, ...step }) => step);
  }

  async listEffects(id: string): Promise<EffectRecord[]> {
    const rows = this.guard(() =>
      this.db
        .select()
        .from(effects)
        .where(eq(effects.runId, id))
        .orderBy(asc(effects.startedAt))
        .all(),
    );
    return rows.map((r) => ({ ...r, status: r.status as EffectStatus }));
  }

  async getEffect(id: string, key: string): Promise<EffectRecord | undefined> {
    const row = this.guard(() =>
      this.db
        .select()
        .from(effects)
        .where(and(eq(effects.runId, id), eq(effects.key, key)))
        .get(),
    );
    return row && { ...row, status: row.status as EffectStatus };
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

function toRow(
  run: RunRecord,
): typeof runs.$inferInsert & Omit<typeof runSpecs.$inferInsert, 'runId'> {
  const { lease, ...rest } = run;
  return {
    ...rest,
    leaseOwner: lease?.owner ?? null,
    leasePid: lease?.pid ?? null,
    leaseHost: lease?.host ?? null,
    leaseExpiresAt: lease?.expiresAt ?? null,
  };
}

function fromRow(row: RunRow): RunRecord {
  const { leaseOwner, leasePid, leaseHost, leaseExpiresAt, ...rest } = row;
  return {
    ...rest,
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
