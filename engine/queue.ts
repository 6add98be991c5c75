/**
 * Parking and dead letters: what happens to a run whose step failed.
 *
 * A failure that time can cure (no LLM tier could answer) parks the run: it becomes `waiting` with a
 * due time, holds no lease, and a worker carries it on when it is due. The wait grows by exponential
 * backoff with full jitter and is never shorter than what the providers asked for (`retry-after`) or
 * than the time the first tier's breaker or quota cooldown lets it be tried again. Other retryable
 * failures are retried by the step's retry policy, parked when the backoff is long. A run that runs
 * out of attempts or of waiting time, or fails with an error no retry can fix, ends `failed` with a
 * dead letter that says why, with the history of its parks.
 */
import type { EngineDeps } from './deps.ts';
import { ErrorCode, hasCode, isDatabaseBusy, serializeError } from './errors.ts';
import type { HeldRun } from './held-run.ts';
import { backoffMs as jitter, toMs, type Duration } from './time.ts';
import type { DeadLetter, DeadLetterReason, ParkRecord, QueueEntry, QueueReason } from './store.ts';
import { parseStored } from './codec.ts';

export const DEFAULT_MAX_WAIT = '24h';

export type ParkPolicy = {
  /** Waits at least this long are parked rather than slept in the process. */
  parkAfterMs: number;
  /** First park's backoff ceiling, doubled each time up to `maxParkBackoffMs`. */
  parkBackoffMs: number;
  maxParkBackoffMs: number;
};

/** How long an LLM outage makes the step wait before its next attempt. */
export function curableWait(
  deps: Pick<EngineDeps, 'clock' | 'random'>,
  policy: ParkPolicy,
  parks: number,
  error: unknown,
): number {
  const now = deps.clock.now();
  const { retryAfterMs, availableAt } = error as { retryAfterMs?: number; availableAt?: number };
  const backoff = jitter(parks + 1, policy.parkBackoffMs, policy.maxParkBackoffMs, deps.random);
  return Math.max(backoff, retryAfterMs ?? 0, availableAt !== undefined ? availableAt - now : 0);
}

/**
 * True for failures that waiting cures: every LLM tier was down, busy or cooling down, or the
 * database stayed locked past the busy timeout (a stalled process holding a write, say).
 */
export const isCurable = (error: unknown): boolean =>
  hasCode(error, ErrorCode.llmUnavailable) || isDatabaseBusy(error);

/** The longest a run of this workflow may wait in one stretch before it is dead-lettered. */
export function maxWaitMs(maxWait: Duration | undefined): number {
  return toMs(maxWait ?? DEFAULT_MAX_WAIT, 'maxWait');
}

/** A fresh queue entry for a run that is about to wait. */
export function queueEntry(
  held: Pick<HeldRun, 'run' | 'queued'>,
  now: number,
  fields: Partial<QueueEntry> & { reason: QueueReason; dueAt: number | null },
): QueueEntry {
  const prior = held.queued;
  return {
    runId: held.run.id,
    workflow: held.run.workflow,
    priority: prior?.priority ?? 0,
    parks: prior?.parks ?? 0,
    waitingSince: prior?.waitingSince ?? now,
    lastError: prior?.lastError ?? null,
    history: prior?.history ?? '[]',
    createdAt: prior?.createdAt ?? now,
    ...fields,
  };
}

/** The entry of a run parked at `step` for `waitMs` after `error`. */
export function parkEntry(
  held: Pick<HeldRun, 'run' | 'queued'>,
  now: number,
  step: string,
  error: unknown,
  waitMs: number,
): QueueEntry {
  const message = String((error as Error)?.message ?? error).split('\n')[0]!;
  const history = parseStored(held.queued?.history ?? '[]') as ParkRecord[];
  history.push({ at: now, step, error: message, waitMs });
  return queueEntry(held, now, {
    reason: 'parked',
    dueAt: now + waitMs,
    parks: (held.queued?.parks ?? 0) + 1,
    lastError: JSON.stringify(serializeError(error)),
    history: JSON.stringify(history),
  });
}

/** The dead letter of a run that failed at `step`. */
export function deadLetter(
  held: Pick<HeldRun, 'run' | 'queued' | 'failures'>,
  now: number,
  step: string,
  error: unknown,
  reason: DeadLetterReason,
  attempts: number,
): DeadLetter {
  // The parks (from the queue entry) and the failed attempts (this hold's), in time order; the
  // last failed attempt is the one that ends the run.
  const history = [
    ...(parseStored(held.queued?.history ?? '[]') as { at: number }[]),
    ...held.failures,
  ].sort((a, b) => a.at - b.at) as unknown[];
  const message = String((error as Error)?.message ?? error).split('\n')[0]!;
  const last = held.failures.at(-1);
  if (!last || last.step !== step || last.error !== message) {
    history.push({ at: now, step, attempt: attempts, error: message });
  }
  return {
    runId: held.run.id,
    workflow: held.run.workflow,
    step,
    reason,
    error: JSON.stringify({ ...serializeError(error), step }),
    history: JSON.stringify(history),
    createdAt: now,
    droppedAt: null,
  };
}
