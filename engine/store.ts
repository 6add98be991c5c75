/**
 * The one interface through which the engine reaches storage. Every method is atomic on its own;
 * `commit` is the milestone: all of its rows land together or none do, and only while the caller's
 * lease epoch is still the run's current one.
 *
 * Implementations: `adapters/sqlite` (embedded default). `tests/store-conformance.ts` holds the suite
 * every implementation must pass.
 */

import type { TierStateStore } from './llm/tier-state.ts';

export const RunStatus = {
  running: 'running',
  waiting: 'waiting',
  completed: 'completed',
  failed: 'failed',
  compensating: 'compensating',
  rolledBack: 'rolled_back',
  compensationFailed: 'compensation_failed',
  /** Enqueued, not started yet: a worker starts it when it is due. */
  queued: 'queued',
  cancelled: 'cancelled',
} as const;
export type RunStatus = (typeof RunStatus)[keyof typeof RunStatus];

export const EffectStatus = {
  /** Intent recorded, `run` called; its outcome is not recorded. */
  started: 'started',
  done: 'done',
  /** Confirmed by `reconcile` after its outcome went unrecorded. */
  reconciled: 'reconciled',
  failed: 'failed',
  /** Started, then neither key support nor `reconcile` can tell whether it happened. */
  unknown: 'unknown',
  notApplied: 'not_applied',
  compensating: 'compensating',
  compensated: 'compensated',
  compensationFailed: 'compensation_failed',
} as const;
export type EffectStatus = (typeof EffectStatus)[keyof typeof EffectStatus];

/** Who holds a run. The epoch lives on the run itself and only grows, so a released lease keeps it. */
export type Lease = { owner: string; expiresAt: number; pid: number; host: string };

export type RunRecord = {
  id: string;
  workflow: string;
  version: number;
  fingerprint: string;
  /** JSON of the workflow's graph shape when the run started (or was last migrated). */
  graph: string;
  /** The file the workflow was loaded from, for `resume --all`. */
  module: string | null;
  status: RunStatus;
  /** Encoded input, as given to `start`. */
  input: string;
  /** The step to execute next; null once the run has ended. */
  cursor: string | null;
  /** Failed attempts of the cursor's step so far (crashes do not count). */
  cursorAttempts: number;
  /** Step executions so far, retries not counted. */
  stepCount: number;
  /** The newest checkpoint's sequence number. */
  seq: number;
  /** The sequence number of the newest full snapshot. */
  snapshotSeq: number;
  /** Encoded size of the newest snapshot, and what patches added since. */
  snapshotBytes: number;
  patchBytes: number;
  patchCount: number;
  error: string | null;
  options: string;
  /** Raised by every claim; each write names the epoch it was made under. */
  epoch: number;
  lease: Lease | null;
  createdAt: number;
  updatedAt: number;
  endedAt: number | null;
  /** `cancel` was asked for: the holder stops the run at its next milestone. */
  cancelRequested: boolean;
};

export type RunUpdate = Partial<
  Pick<
    RunRecord,
    | 'status'
    | 'cursor'
    | 'cursorAttempts'
    | 'stepCount'
    | 'seq'
    | 'snapshotSeq'
    | 'snapshotBytes'
    | 'patchBytes'
    | 'patchCount'
    | 'error'
    | 'endedAt'
    | 'version'
    | 'fingerprint'
    | 'graph'
    | 'module'
  >
> & { lease?: null; leaseExpiresAt?: number };

export type CheckpointRecord = {
  runId: string;
  seq: number;
  kind: 'snapshot' | 'patch';
  /** The step whose milestone wrote it. */
  step: string | null;
  data: string;
  createdAt: number;
};

/**
 * One step execution. A run records at most one execution of a step index per lease epoch (a failure
 * ends the epoch's work; a resume claims the next), so a store may key them by (run, index, epoch).
 */
export type StepRecord = {
  runId: string;
  /** 1 for the run's first step execution, and so on. */
  index: number;
  name: string;
  status: 'completed' | 'failed';
  attempts: number;
  /** Where the run went next. */
  next: string | null;
  startedAt: number;
  endedAt: number;
  error: string | null;
};

export type EffectRecord = {
  runId: string;
  /** The key as the workflow computed it; unique within the run. */
  key: string;
  name: string;
  /** The step that ran it: the effect step itself, or the step that called `ctx.effect`. */
  step: string;
  status: EffectStatus;
  result: string | null;
  error: string | null;
  attempts: number;
  startedAt: number;
  completedAt: number | null;
  /** Position in the order of completion, which rollback reverses. */
  completionOrder: number | null;
  compensationAttempts: number;
  compensatedAt: number | null;
  /** The effect declared a compensation when it ran (inline ones must be registered to be reached). */
  compensable: boolean;
};

/** One `ctx.llm` call in the run's journal, keyed by its step execution and its position in it. */
export type LlmCallRecord = {
  runId: string;
  stepIndex: number;
  position: number;
  step: string;
  requestHash: string;
  status: 'completed' | 'failed';
  streamed: boolean;
  /** The unified response as JSON (null while failed). */
  response: string | null;
  /** The serialized error of a failed call. */
  error: string | null;
  tier: string | null;
  provider: string | null;
  model: string | null;
  degraded: boolean;
  /** JSON array of the router's attempts. */
  attempts: string;
  inputTokens: number;
  outputTokens: number;
  cacheReadTokens: number;
  cacheWriteTokens: number;
  costUsd: number | null;
  latencyMs: number;
  replays: number;
  createdAt: number;
  updatedAt: number;
};

/** Why a run sits in the queue. */
export type QueueReason = 'queued' | 'parked' | 'sleep' | 'signal';

/** A run waiting for a worker. */
export type QueueEntry = {
  runId: string;
  workflow: string;
  /** When it is due; null for a wait that only a signal ends. */
  dueAt: number | null;
  /** Higher first. */
  priority: number;
  /** Times parked since it last made progress. */
  parks: number;
  /** When the current stretch of waiting began. */
  waitingSince: number | null;
  reason: QueueReason;
  lastError: string | null;
  /** JSON array of {@link ParkRecord}. */
  history: string;
  createdAt: number;
};

/** One park, as the history of a queue entry and a dead letter keeps it. */
export type ParkRecord = { at: number; step: string; error: string; waitMs: number };

/** A durable wait: `ctx.sleep` or `ctx.waitFor`, by name within a run. */
export type WaitRecord = {
  runId: string;
  name: string;
  kind: 'sleep' | 'signal';
  step: string;
  status: 'waiting' | 'fired' | 'timed_out';
  /** When a sleep ends or a wait for a signal times out; null when only a signal ends it. */
  dueAt: number | null;
  /** The delivered signal's payload, encoded. */
  payload: string | null;
  createdAt: number;
  firedAt: number | null;
};

export type SignalRecord = {
  id: number;
  runId: string;
  name: string;
  /** Encoded payload. */
  payload: string | null;
  sentAt: number;
  consumedAt: number | null;
};

export type DeadLetterReason = 'attempts' | 'wait_limit' | 'not_retryable';

export type DeadLetter = {
  runId: string;
  workflow: string;
  step: string | null;
  reason: DeadLetterReason;
  /** The serialized error, with its causes. */
  error: string;
  /** JSON array of the step's attempts and the run's parks, with their times. */
  history: string;
  createdAt: number;
  droppedAt: number | null;
};

/** What one milestone writes. */
export type Milestone = {
  run?: RunUpdate;
  checkpoint?: CheckpointRecord;
  step?: StepRecord;
  effect?: EffectRecord;
  /** The run's queue entry: written (it waits), or null (removed: it no longer waits). */
  queue?: QueueEntry | null;
  /** A dead letter for the run, or null to remove its dead letter (it was resumed). */
  deadLetter?: DeadLetter | null;
  wait?: WaitRecord;
  /** A signal taken by a wait. */
  consumeSignal?: { id: number; at: number };
};

export type RunFilter = {
  status?: RunStatus | readonly RunStatus[];
  workflow?: string;
  limit?: number;
};

/** Test seams: `inside` runs within the transaction, after the run row is written. */
export type CommitHooks = { inside?: () => void };

export type LeaseClaim = { owner: string; pid: number; host: string; expiresAt: number };

export interface Store extends TierStateStore {
  /** Inserts a run, held by `lease` at epoch 1, with its first snapshot. */
  createRun(run: RunRecord, snapshot: CheckpointRecord): Promise<void>;
  /**
   * Inserts a run that nobody holds, with its snapshot and its queue entry, all or nothing. With a
   * `key` already used by another run, inserts nothing and returns that run's id.
   */
  enqueueRun(
    run: RunRecord,
    snapshot: CheckpointRecord,
    entry: QueueEntry,
    key?: string,
  ): Promise<{ runId: string; created: boolean }>;
  /** Queue entries due at `now`, highest priority first, then oldest due. */
  dueRuns(now: number, limit: number): Promise<QueueEntry[]>;
  getQueueEntry(runId: string): Promise<QueueEntry | undefined>;
  /** How many entries are queued, and the earliest due time among them (null when none is timed). */
  queueStats(): Promise<{ waiting: number; nextDueAt: number | null }>;
  /** The earliest due time in the queue (what the worker sleeps until); one index lookup. */
  nextDueAt(): Promise<number | null>;
  listDeadLetters(options?: { includeDropped?: boolean }): Promise<DeadLetter[]>;
  getDeadLetter(runId: string): Promise<DeadLetter | undefined>;
  /** Marks an entry dropped (kept for the record); false when there is none to drop. */
  dropDeadLetter(runId: string, at: number): Promise<boolean>;
  getWait(runId: string, name: string): Promise<WaitRecord | undefined>;
  listWaits(runId: string): Promise<WaitRecord[]>;
  /** The oldest signal of that name the run has not taken yet. */
  nextSignal(runId: string, name: string): Promise<SignalRecord | undefined>;
  /**
   * Keeps a signal for the run; when the run waits in the queue for that name, makes it due at
   * once. Returns whether a waiting run was woken.
   */
  sendSignal(runId: string, name: string, payload: string | null, at: number): Promise<boolean>;
  /** Asks the run's holder to stop it (1), and to roll it back too (2). */
  requestCancel(runId: string, mode: 1 | 2): Promise<void>;
  /** 0 when nobody asked to cancel the run, else the mode asked for. */
  cancelRequest(runId: string): Promise<0 | 1 | 2>;
  /** Removes a dead letter and queues its run again, due `at` (for `dlq retry`). */
  requeueDeadLetter(runId: string, entry: QueueEntry): Promise<boolean>;
  getRun(id: string): Promise<RunRecord | undefined>;
  listRuns(filter?: RunFilter): Promise<RunRecord[]>;
  /**
   * Takes the lease if the run's epoch is still `expectedEpoch` (compare-and-set) and returns the new
   * epoch, or null when another claimant got there first.
   */
  claimLease(id: string, expectedEpoch: number, claim: LeaseClaim): Promise<number | null>;
  /**
   * Takes the lease of a run nobody holds and writes its first milestone under the new epoch, in
   * one transaction, if the run is still exactly as it was read (`expected`: epoch, seq, last
   * update, cancel flag, no lease); returns the new epoch, or null with nothing written. A worker
   * starts a queued run with one write instead of a claim and then a milestone.
   */
  claimIdle(
    id: string,
    expected: Pick<RunRecord, 'epoch' | 'seq' | 'updatedAt' | 'cancelRequested'>,
    claim: LeaseClaim,
    milestone: Milestone,
    hooks?: CommitHooks,
  ): Promise<number | null>;
  /** Extends a held lease; false when the epoch moved on (the lease was lost). */
  renewLease(id: string, epoch: number, expiresAt: number): Promise<boolean>;
  /**
   * Writes a milestone atomically if `epoch` is still the run's lease epoch; otherwise writes nothing
   * and throws a `LeaseError` with code `LEASE_LOST`.
   */
  commit(id: string, epoch: number, milestone: Milestone, hooks?: CommitHooks): Promise<void>;
  /** The checkpoints with `seq >= fromSeq`, in order. */
  loadCheckpoints(id: string, fromSeq: number): Promise<CheckpointRecord[]>;
  listSteps(id: string): Promise<StepRecord[]>;
  listEffects(id: string): Promise<EffectRecord[]>;
  getEffect(id: string, key: string): Promise<EffectRecord | undefined>;
  /**
   * Writes a call to the journal (replacing the row at its position) if `epoch` is still the run's
   * lease epoch; otherwise writes nothing and throws `LEASE_LOST`.
   */
  recordLlmCall(epoch: number, call: LlmCallRecord): Promise<void>;
  getLlmCall(id: string, stepIndex: number, position: number): Promise<LlmCallRecord | undefined>;
  /** Counts one more answer served from the journal. */
  markLlmReplayed(id: string, stepIndex: number, position: number, at: number): Promise<void>;
  listLlmCalls(id: string): Promise<LlmCallRecord[]>;
  close(): Promise<void>;
}
