/**
 * Effects: side effects recorded in a per-run ledger under their idempotency key.
 *
 * Crash semantics, in order of the writes:
 * 1. intent (`started`, with the key) is committed before `run` is called;
 * 2. `run` is called;
 * 3. the result is committed as `done`, together with the milestone that follows it (the effect step's
 *    cursor, or the enclosing step's state), so that no reader ever sees one without the other.
 * A crash between 1 and 3 leaves the effect `started`: on resume, `reconcile(key)` is asked when the
 * effect has one; otherwise an idempotent effect is run again with the same key, and a non-idempotent
 * one is reported as outcome unknown and never run again silently.
 */
import { decode, encode } from './codec.ts';
import type { EngineDeps } from './deps.ts';
import {
  DefinitionError,
  EffectOutcomeUnknownError,
  ErrorCode,
  StateError,
  StepFailedError,
  hasCode,
  isTerminalError,
  serializeError,
} from './errors.ts';
import type { HeldRun } from './held-run.ts';
import { EffectStatus, type EffectRecord } from './store.ts';
import { backoffMs, toMs } from './time.ts';
import type { InlineEffect, RetryOptions } from './workflow.ts';

export type EffectCall = {
  name: string;
  step: string;
  key: string;
  effect: Omit<InlineEffect<unknown, unknown>, 'key'>;
  state: unknown;
  /** The next position in the run's order of completion. */
  nextOrder: () => number;
};

export type EffectOutcome = {
  result: unknown;
  /** The record to commit with the next milestone; null when the ledger already had the result. */
  record: EffectRecord | null;
};

const DEFAULT_EFFECT_ATTEMPTS = 3;

export function checkKey(key: unknown, name: string, runId: string): string {
  if (typeof key !== 'string' || key.length === 0 || key.length > 1024) {
    throw new DefinitionError(`Effect "${name}" computed an invalid key ${JSON.stringify(key)}.`, {
      runId,
      hint: 'An effect key is a non-empty string of at most 1,024 characters, derived from the state so that it is the same on every attempt.',
    });
  }
  return key;
}

export async function performEffect(
  deps: EngineDeps,
  held: HeldRun,
  call: EffectCall,
): Promise<EffectOutcome> {
  const { store, clock, crashPoint } = deps;
  const runId = held.id;
  const existing = await store.getEffect(runId, call.key);
  if (existing && existing.name !== call.name) {
    throw new DefinitionError(
      `Effect "${call.name}" uses key "${call.key}", which effect "${existing.name}" already used in this run.`,
      {
        runId,
        step: call.step,
        hint: "Derive each effect's key from what makes it unique, e.g. `publish:${topic}`.",
      },
    );
  }
  if (existing?.status === EffectStatus.done || existing?.status === EffectStatus.reconciled) {
    const result =
      existing.result === null ? undefined : decode(existing.result, { secrets: deps.secrets });
    return { result, record: null };
  }
  if (
    existing &&
    existing.status !== EffectStatus.started &&
    existing.status !== EffectStatus.failed
  ) {
    if (existing.status === EffectStatus.unknown) throw unknownOutcome(call, runId);
    throw new DefinitionError(`Effect "${call.name}" (key "${call.key}") is ${existing.status}.`, {
      runId,
      hint: 'A run that was rolled back cannot apply its effects again; start a new run.',
    });
  }
  const base: EffectRecord = existing ?? {
    runId,
    key: call.key,
    name: call.name,
    step: call.step,
    status: EffectStatus.started,
    result: null,
    error: null,
    attempts: 0,
    startedAt: clock.now(),
    completedAt: null,
    completionOrder: null,
    compensationAttempts: 0,
    compensatedAt: null,
    compensable: typeof call.effect.compensate === 'function',
  };

  if (existing?.status === EffectStatus.started) {
    const recovered = await recoverInFlight(deps, held, call, base);
    if (recovered) return recovered;
  }

  const retry = retryPolicy(call.effect.retry, DEFAULT_EFFECT_ATTEMPTS);
  let attempts = base.attempts;
  for (let attempt = 1; ; attempt++) {
    attempts += 1;
    crashPoint('effect:before-intent');
    await held.commit(
      { effect: { ...base, status: EffectStatus.started, attempts, error: null } },
      'effect-intent',
    );
    try {
      held.signal.throwIfAborted();
      const result = await call.effect.run(call.state, {
        key: call.key,
        runId,
        attempt,
        signal: held.signal,
      });
      crashPoint('effect:after-run');
      return { result, record: doneRecord(deps, base, attempts, result, call) };
    } catch (error) {
      if (held.signal.aborted) throw held.signal.reason;
      const failed = { ...base, attempts, error: JSON.stringify(serializeError(error)) };
      if (call.effect.idempotent === false && !call.effect.reconcile) {
        await held.commit({ effect: { ...failed, status: EffectStatus.unknown } }, 'effect-record');
        throw unknownOutcome(call, runId, error);
      }
      if (call.effect.reconcile) {
        const checked = await call.effect.reconcile(call.key);
        if (checked.applied) {
          return {
            result: checked.result,
            record: doneRecord(deps, base, attempts, checked.result, call, true),
          };
        }
      }
      if (hasCode(error, ErrorCode.secretKeyMissing)) {
        // Its result holds a secret and no key is set: running it again would only repeat that.
        await held.commit({ effect: { ...failed, status: EffectStatus.failed } }, 'effect-record');
        throw error;
      }
      if (attempt >= retry.attempts || isTerminalError(error)) {
        await held.commit({ effect: { ...failed, status: EffectStatus.failed } }, 'effect-record');
        throw new StepFailedError(
          `Effect "${call.name}" (key "${call.key}") failed after ${attempts} attempt(s).`,
          { runId, step: call.step, attempts, cause: error },
        );
      }
      const delayMs = backoffMs(attempt, retry.backoffMs, retry.maxBackoffMs, deps.random);
      deps.logger.warn('effect failed; retrying with the same key', {
        runId,
        step: call.step,
        effect: call.name,
        attempt,
        delayMs,
        error: String(error),
      });
      await clock.sleep(delayMs, held.signal);
    }
  }
}

/** An effect whose intent was recorded but not its outcome: the process died while it ran. */
async function recoverInFlight(
  deps: EngineDeps,
  held: HeldRun,
  call: EffectCall,
  base: EffectRecord,
): Promise<EffectOutcome | null> {
  const { reconcile, idempotent } = call.effect;
  if (reconcile) {
    const checked = await reconcile(call.key);
    if (checked.applied) {
      const record = doneRecord(deps, base, base.attempts, checked.result, call, true);
      return { result: checked.result, record };
    }
    return null;
  }
  if (idempotent === false) {
    await held.commit({ effect: { ...base, status: EffectStatus.unknown } }, 'effect-record');
    throw unknownOutcome(call, held.id);
  }
  deps.logger.info('effect outcome was not recorded; running it again with the same key', {
    runId: held.id,
    step: call.step,
    effect: call.name,
  });
  return null;
}

function doneRecord(
  deps: EngineDeps,
  base: EffectRecord,
  attempts: number,
  result: unknown,
  call: EffectCall,
  reconciled = false,
): EffectRecord {
  let encoded: string;
  try {
    encoded = encode(result, { secrets: deps.secrets });
  } catch (error) {
    if (hasCode(error, ErrorCode.secretKeyMissing)) {
      throw new StateError(
        `Effect "${call.name}" (key "${call.key}") returned a secret, and no key is set to encrypt it; its result was not recorded.`,
        {
          code: ErrorCode.secretKeyMissing,
          runId: base.runId,
          step: call.step,
          cause: error,
          hint: (error as StateError).hint ?? '',
        },
      );
    }
    throw new StateError(
      `Effect "${call.name}" (key "${call.key}") returned a result keel cannot record: ${(error as Error).message}`,
      {
        runId: base.runId,
        step: call.step,
        cause: error,
        hint: 'Return plain data from run(): ids, paths, receipts.',
      },
    );
  }
  return {
    ...base,
    status: reconciled ? EffectStatus.reconciled : EffectStatus.done,
    attempts,
    result: encoded,
    error: null,
    completedAt: deps.clock.now(),
    completionOrder: call.nextOrder(),
  };
}

function unknownOutcome(call: EffectCall, runId: string, cause?: unknown) {
  return new EffectOutcomeUnknownError(
    `Effect "${call.name}" (key "${call.key}") was started but whether it happened is unknown: it does not honour keys and has no reconcile().`,
    {
      runId,
      step: call.step,
      key: call.key,
      cause,
      hint: 'Check the outside system by hand, then add reconcile() to the effect (or make it honour the key) before resuming.',
    },
  );
}

export type RetryPolicy = { attempts: number; backoffMs: number; maxBackoffMs: number };

export function retryPolicy(
  options: RetryOptions | undefined,
  defaultAttempts: number,
): RetryPolicy {
  const attempts = options?.attempts ?? defaultAttempts;
  if (!Number.isInteger(attempts) || attempts < 1) {
    throw new DefinitionError(
      `retry.attempts must be a whole number >= 1, got ${String(attempts)}.`,
    );
  }
  return {
    attempts,
    backoffMs: toMs(options?.backoff ?? 200, 'retry.backoff'),
    maxBackoffMs: toMs(options?.maxBackoff ?? '30s', 'retry.maxBackoff'),
  };
}
