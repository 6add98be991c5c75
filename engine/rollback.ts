/**
 * Rollback: the compensations of a run's applied effects, newest first.
 *
 * Each compensation is recorded before it is called (`compensating`) and after it returns
 * (`compensated`), under a key of its own, so a rollback that crashes is continued by the next one
 * without compensating anything twice. A compensation that keeps failing stops the rollback and
 * leaves the run `compensation_failed`, listing what is still applied.
 */
import { decode, parseStored } from './codec.ts';
import type { EngineDeps } from './deps.ts';
import { performEffect, retryPolicy } from './effects.ts';
import {
  CompensationError,
  isLeaseError,
  isTerminalError,
  serializeError,
  type SerializedError,
} from './errors.ts';
import type { HeldRun } from './held-run.ts';
import { EffectStatus, RunStatus, type EffectRecord } from './store.ts';
import { backoffMs } from './time.ts';
import type { CompensationInfo, InlineCompensation } from './workflow.ts';

const DEFAULT_COMPENSATION_ATTEMPTS = 3;

type Handlers = InlineCompensation;

export type RollbackReport = {
  compensated: string[];
  /** Effects that declare no compensation: they stay applied, by the workflow's design. */
  skipped: string[];
  /** Effects still applied because the rollback stopped. */
  remaining: string[];
};

/** Keys of effects whose compensation is still to run, newest completion first. */
const PENDING: readonly string[] = [
  EffectStatus.started,
  EffectStatus.unknown,
  EffectStatus.done,
  EffectStatus.reconciled,
  EffectStatus.compensating,
  EffectStatus.compensationFailed,
];

export async function rollbackHeld(
  deps: EngineDeps,
  held: HeldRun,
  state: object,
): Promise<RollbackReport> {
  const report: RollbackReport = { compensated: [], skipped: [], remaining: [] };
  if (held.run.status !== RunStatus.compensating) {
    await held.commit({ run: { status: RunStatus.compensating } }, 'rollback');
  }
  const effects = (await deps.store.listEffects(held.id))
    .filter((e) => PENDING.includes(e.status))
    .sort(newestFirst);
  let order = Math.max(0, ...effects.map((e) => e.completionOrder ?? 0));
  for (const [i, listed] of effects.entries()) {
    const handlers = handlersFor(held, listed.name);
    let effect = listed;
    try {
      if (effect.status === EffectStatus.started) {
        effect = await settleInFlight(deps, held, effect, handlers, state, () => ++order);
        if (effect.status === EffectStatus.notApplied) continue;
      }
      if (effect.status === EffectStatus.unknown) {
        throw new Error(
          `its outcome is unknown: it was started, does not honour keys and has no reconcile()`,
        );
      }
      if (!handlers?.compensate) {
        if (effect.compensable) {
          throw new Error(
            `it declared its compensation inline in ctx.effect(), which this process cannot reach; register it with .compensation("${effect.name}", fn) on the workflow`,
          );
        }
        report.skipped.push(effect.name);
        continue;
      }
      await compensateOne(deps, held, effect, handlers);
      report.compensated.push(effect.name);
    } catch (error) {
      if (isLeaseError(error) || held.signal.aborted) throw error;
      report.remaining = effects.slice(i).map((e) => e.name);
      const original = failureBefore(held);
      const after = original
        ? ` It was rolling back after: ${(parseStored(original) as SerializedError).message.split('\n')[0]}`
        : '';
      const reason = (error as Error).message.replace(/\.$/, '');
      const failure = new CompensationError(
        `Rollback of run ${held.id} stopped at effect "${effect.name}" (key "${effect.key}"): ${reason}. Still applied: ${report.remaining.join(', ')}.${after}`,
        {
          runId: held.id,
          step: effect.step,
          remaining: report.remaining,
          ...(original ? { failure: original } : {}),
          cause: error,
          hint: `Fix the compensation, then run \`keel rollback ${held.id}\` again: it continues at "${effect.name}".`,
        },
      );
      await held.commit(
        {
          run: {
            status: RunStatus.compensationFailed,
            error: JSON.stringify(serializeError(failure)),
            lease: null,
          },
        },
        'rollback',
      );
      return report;
    }
  }
  await held.commit(
    {
      run: {
        status: RunStatus.rolledBack,
        cursor: null,
        endedAt: deps.clock.now(),
        // A stopped rollback's error is over; the failure that started it, if any, stays.
        error: failureBefore(held),
        lease: null,
      },
    },
    'rollback',
  );
  return report;
}

/** The run's error from before any rollback stopped (as stored), through any number of them. */
function failureBefore(held: HeldRun): string | null {
  if (!held.run.error) return null;
  const previous = parseStored(held.run.error) as SerializedError;
  if (previous.name !== 'CompensationError') return held.run.error;
  return typeof previous.failure === 'string' ? previous.failure : null;
}

async function compensateOne(
  deps: EngineDeps,
  held: HeldRun,
  effect: EffectRecord,
  handlers: Handlers,
) {
  const policy = retryPolicy(handlers.compensateRetry, DEFAULT_COMPENSATION_ATTEMPTS);
  const result =
    effect.result === null ? undefined : decode(effect.result, { secrets: deps.secrets });
  let attempts = effect.compensationAttempts;
  for (let attempt = 1; ; attempt++) {
    attempts += 1;
    await held.commit(
      { effect: { ...effect, status: EffectStatus.compensating, compensationAttempts: attempts } },
      'compensation-intent',
    );
    const info: CompensationInfo = {
      key: effect.key,
      compensationKey: `compensate:${effect.key}`,
      runId: held.id,
      attempt,
    };
    try {
      await handlers.compensate!(result, info);
    } catch (error) {
      const failed = {
        ...effect,
        status: EffectStatus.compensationFailed,
        compensationAttempts: attempts,
        error: JSON.stringify(serializeError(error)),
      };
      if (attempt >= policy.attempts || isTerminalError(error)) {
        await held.commit({ effect: failed }, 'compensation-record');
        throw error;
      }
      const delayMs = backoffMs(attempt, policy.backoffMs, policy.maxBackoffMs, deps.random);
      deps.logger.warn('compensation failed; retrying', {
        runId: held.id,
        effect: effect.name,
        attempt,
        delayMs,
      });
      await deps.clock.sleep(delayMs);
      continue;
    }
    deps.crashPoint('compensation:after-run');
    await held.commit(
      {
        effect: {
          ...effect,
          status: EffectStatus.compensated,
          compensationAttempts: attempts,
          compensatedAt: deps.clock.now(),
        },
      },
      'compensation-record',
    );
    deps.emit({ type: 'compensated', runId: held.id, effect: effect.name, key: effect.key });
    return;
  }
}

/**
 * An effect that was running when its process died. Reconcile says whether it happened; an idempotent
 * one is completed with its key (the outside system applies it at most once) so that its compensation
 * has a result to undo; any other is left as outcome unknown.
 */
async function settleInFlight(
  deps: EngineDeps,
  held: HeldRun,
  effect: EffectRecord,
  handlers: Handlers | undefined,
  state: object,
  nextOrder: () => number,
): Promise<EffectRecord> {
  if (handlers?.reconcile) {
    const checked = await handlers.reconcile(effect.key);
    if (!checked.applied) {
      const settled = { ...effect, status: EffectStatus.notApplied };
      await held.commit({ effect: settled }, 'effect-record');
      return settled;
    }
  }
  const run = handlers?.run;
  if (!handlers || !run || (handlers.idempotent === false && !handlers.reconcile)) {
    const settled = { ...effect, status: EffectStatus.unknown };
    await held.commit({ effect: settled }, 'effect-record');
    return settled;
  }
  const outcome = await performEffect(deps, held, {
    name: effect.name,
    step: effect.step,
    key: effect.key,
    effect: { ...handlers, run },
    state,
    nextOrder,
  });
  const settled = outcome.record ?? effect;
  if (outcome.record) await held.commit({ effect: outcome.record }, 'effect-record');
  return settled;
}

/** Effect steps carry their handlers; effects started with `ctx.effect` register theirs by name. */
function handlersFor(held: HeldRun, name: string): Handlers | undefined {
  const node = held.workflow.node(name);
  if (node?.kind === 'effect') return node.effect;
  return held.inlineEffects.get(name) ?? held.workflow.effectHandlers(name);
}

function newestFirst(a: EffectRecord, b: EffectRecord): number {
  const order = (e: EffectRecord) => e.completionOrder ?? Number.MAX_SAFE_INTEGER;
  return order(b) - order(a) || b.startedAt - a.startedAt;
}
