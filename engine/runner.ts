/**
 * Executes a held run from its cursor until it ends, fails, or loses its lease.
 *
 * Each step execution ends in one milestone: the step's record, its patches and the new cursor (and
 * for an effect step, the effect's result) are committed together. A crash before that commit runs
 * the step again from the state of its last checkpoint; a crash after it never does.
 */
import { stateMilestone } from './checkpoint.ts';
import type { EngineDeps } from './deps.ts';
import { checkKey, performEffect, retryPolicy } from './effects.ts';
import {
  DefinitionError,
  KeelError,
  ErrorCode,
  hasCode,
  isDefinitionError,
  isEffectOutcomeUnknownError,
  isLeaseError,
  isStateError,
  isTerminalError,
  serializeError,
  StateError,
  WaitTimeoutError,
} from './errors.ts';
import type { HeldRun } from './held-run.ts';
import { journaledLlm } from './llm/journal.ts';
import { rollbackHeld, type RollbackReport } from './rollback.ts';
import type { StateTracker } from './state.ts';
import {
  RunStatus,
  type DeadLetterReason,
  type EffectRecord,
  type Milestone,
  type QueueEntry,
  type RunUpdate,
  type StepRecord,
  type WaitRecord,
} from './store.ts';
import { decode } from './codec.ts';
import { curableWait, deadLetter, isCurable, maxWaitMs, parkEntry, queueEntry } from './queue.ts';
import { backoffMs, toMs, type Duration } from './time.ts';
import {
  END,
  type EffectNode,
  type InlineEffect,
  type StepContext,
  type StepNode,
} from './workflow.ts';

export const DEFAULT_MAX_STEPS = 1_000;

export type Execution = {
  deps: EngineDeps;
  held: HeldRun;
  tracker: StateTracker;
  /** The highest completion order among the run's effects. */
  effectOrder: number;
  /** Set when the run failed and rolled itself back (`rollbackOnFailure`). */
  rollback?: RollbackReport;
};

export async function execute(ex: Execution): Promise<void> {
  const { held } = ex;
  const maxSteps = held.workflow.options.maxSteps ?? DEFAULT_MAX_STEPS;
  while (held.run.status === RunStatus.running && held.run.cursor !== null) {
    const node = held.workflow.node(held.run.cursor);
    if (!node) {
      const error = new DefinitionError(
        `Run ${held.id} is at step "${held.run.cursor}", which workflow "${held.workflow.name}" no longer declares.`,
        { runId: held.id, hint: 'Restore the step, or roll the run back.' },
      );
      await fail(ex, held.run.cursor, error, 0, ex.deps.clock.now());
      return;
    }
    if (held.run.stepCount >= maxSteps) {
      const error = new KeelError(
        ErrorCode.stepLimit,
        `Run ${held.id} reached its limit of ${maxSteps} step executions at step "${node.name}".`,
        {
          runId: held.id,
          step: node.name,
          hint: 'A route probably loops for ever; fix its condition, or raise maxSteps in the workflow options.',
        },
      );
      await fail(ex, node.name, error, 0, ex.deps.clock.now());
      return;
    }
    if (node.kind === 'step') await runStep(ex, node);
    else await runEffectStep(ex, node);
  }
}

async function runStep(ex: Execution, node: StepNode): Promise<void> {
  const { deps, held, tracker } = ex;
  const policy = retryPolicy(node.options.retry, 1);
  const index = held.run.stepCount + 1;
  const startedAt = deps.clock.now();
  for (;;) {
    const attempt = held.run.cursorAttempts + 1;
    deps.emit({ type: 'step-started', runId: held.id, step: node.name, index, attempt });
    const draft = tracker.begin();
    try {
      held.signal.throwIfAborted();
      const ctx = stepContext(ex, node.name, index, attempt, draft);
      // A durable wait leaves the step without an exception the step's code could catch: the
      // step's promise is abandoned, and the run waits.
      const suspended = await Promise.race([
        (async () => {
          await node.run(draft, ctx);
        })().then(() => undefined),
        suspensions.get(ctx)!,
      ]);
      if (suspended) {
        tracker.restart(false);
        await suspend(ex, node.name, suspended);
        return;
      }
      if (tracker.poisoned) throw tracker.poisoned;
      const { patches, next } = tracker.finish();
      const target = decide(ex, node.name, next);
      const state = stateMilestone(deps, held.run, node.name, patches, next);
      await held.commit(
        {
          ...dequeue(ex),
          checkpoint: state.checkpoint,
          run: { ...state.run, ...advance(ex, index, target) },
          step: stepRecord(
            held.id,
            index,
            node.name,
            'completed',
            attempt,
            target,
            startedAt,
            deps.clock.now(),
          ),
        } satisfies Milestone,
        'step',
      );
      tracker.adopt(next, false);
      deps.emit({ type: 'step-completed', runId: held.id, step: node.name, index, next: target });
      return;
    } catch (thrown) {
      tracker.restart(false);
      if (held.signal.aborted || isLeaseError(thrown)) throw held.signal.reason ?? thrown;
      const error = explainStale(thrown, node.name, held.id);
      held.failures.push({
        at: deps.clock.now(),
        step: node.name,
        attempt,
        error: String((error as Error)?.message ?? error).split('\n')[0]!,
      });
      if (isCurable(error)) {
        // An outage: wait it out, without spending the step's attempts, up to the wait limit.
        const now = deps.clock.now();
        const waitMs = curableWait(deps, deps.park, held.queued?.parks ?? 0, error);
        const waited = now - (held.queued?.waitingSince ?? now);
        if (waited + waitMs > maxWaitMs(held.workflow.options.maxWait)) {
          await fail(ex, node.name, error, attempt, startedAt, {}, 'wait_limit');
          return;
        }
        held.queued = parkEntry(held, now, node.name, error, waitMs);
        if (waitMs >= deps.park.parkAfterMs) {
          await park(ex, node.name, error, waitMs, {});
          return;
        }
        retrying(ex, node.name, attempt, waitMs, error);
        await deps.clock.sleep(waitMs, held.signal);
        continue;
      }
      if (!isRetryable(error) || attempt >= policy.attempts) {
        await fail(ex, node.name, error, attempt, startedAt);
        return;
      }
      const delayMs = backoffMs(attempt, policy.backoffMs, policy.maxBackoffMs, deps.random);
      if (delayMs >= deps.park.parkAfterMs) {
        held.queued = parkEntry(held, deps.clock.now(), node.name, error, delayMs);
        await park(ex, node.name, error, delayMs, { cursorAttempts: attempt });
        return;
      }
      await held.commit({ run: { cursorAttempts: attempt } }, 'attempt');
      retrying(ex, node.name, attempt, delayMs, error);
      await deps.clock.sleep(delayMs, held.signal);
    }
  }
}

function retrying(ex: Execution, step: string, attempt: number, delayMs: number, error: unknown) {
  const { deps, held } = ex;
  deps.emit({
    type: 'step-retrying',
    runId: held.id,
    step,
    attempt,
    delayMs,
    error: String(error),
  });
  deps.logger.warn('step failed; retrying', {
    runId: held.id,
    step,
    attempt,
    delayMs,
    error: String(error),
  });
}

/** Leaves the run `waiting` until its queue entry is due, holding no lease. */
async function park(
  ex: Execution,
  step: string,
  error: unknown,
  waitMs: number,
  run: Pick<RunUpdate, 'cursorAttempts'>,
) {
  const { deps, held } = ex;
  await held.commit(
    { run: { ...run, status: RunStatus.waiting, lease: null }, queue: held.queued! },
    'park',
  );
  deps.emit({ type: 'run-parked', runId: held.id, step, dueAt: held.queued!.dueAt!, waitMs });
  deps.logger.warn('run parked', {
    runId: held.id,
    step,
    waitMs,
    due: new Date(held.queued!.dueAt!).toISOString(),
    error: String(error),
  });
}

/**
 * What `ctx.sleep` and `ctx.waitFor` hand the runner to leave the step: the run waits in the queue,
 * holding no lease, and the step runs again from its start when the wait is over (and then passes
 * it at once).
 */
type Suspended = { wait: WaitRecord; entry: QueueEntry };

/** Each step context's suspension, resolved when one of its waits leaves the step. */
const suspensions = new WeakMap<object, Promise<Suspended>>();

/** A promise that never settles: the abandoned step's code stays parked on it until collected. */
const never = <T>(): Promise<T> => new Promise<T>(() => {});

async function suspend(ex: Execution, step: string, s: Suspended) {
  const { deps, held } = ex;
  held.queued = s.entry;
  await held.commit(
    { run: { status: RunStatus.waiting, lease: null }, queue: s.entry, wait: s.wait },
    'wait',
  );
  deps.emit({ type: 'run-waiting', runId: held.id, step, wait: s.wait.name, dueAt: s.wait.dueAt });
}

function checkWaitName(name: unknown, what: string, runId: string, step: string): string {
  if (typeof name !== 'string' || name === '') {
    throw new DefinitionError(`${what} needs a non-empty name, got ${JSON.stringify(name)}.`, {
      runId,
      step,
      hint: 'Name each wait, uniquely within the run: e.g. ctx.sleep("cool-down", "20m").',
    });
  }
  return name;
}

/** The queue entry's removal, when the run had one: it made progress, so it no longer waits. */
function dequeue(ex: Execution): Pick<Milestone, 'queue'> {
  if (!ex.held.queued) return {};
  ex.held.queued = undefined;
  return { queue: null };
}

async function runEffectStep(ex: Execution, node: EffectNode): Promise<void> {
  const { deps, held, tracker } = ex;
  const index = held.run.stepCount + 1;
  const startedAt = deps.clock.now();
  deps.emit({ type: 'step-started', runId: held.id, step: node.name, index, attempt: 1 });
  let applied: EffectRecord | null = null;
  try {
    const key = checkKey(node.effect.key(tracker.base), node.name, held.id);
    const outcome = await performEffect(deps, held, {
      name: node.name,
      step: node.name,
      key,
      effect: node.effect,
      state: tracker.base,
      nextOrder: () => ++ex.effectOrder,
    });
    applied = outcome.record;
    let state: Pick<Milestone, 'checkpoint' | 'run'> = { run: {} };
    let next = tracker.base;
    if (node.effect.save) {
      node.effect.save(tracker.begin(), outcome.result);
      const finished = tracker.finish();
      next = finished.next;
      state = stateMilestone(deps, held.run, node.name, finished.patches, next);
    }
    const target = decide(ex, node.name, next);
    const attempts = outcome.record?.attempts ?? 1;
    await held.commit(
      {
        ...dequeue(ex),
        checkpoint: state.checkpoint,
        run: { ...state.run, ...advance(ex, index, target) },
        step: stepRecord(
          held.id,
          index,
          node.name,
          'completed',
          attempts,
          target,
          startedAt,
          deps.clock.now(),
        ),
        ...(outcome.record ? { effect: outcome.record } : {}),
      },
      'step',
    );
    tracker.adopt(next, false);
    deps.emit({
      type: outcome.record ? 'effect-applied' : 'effect-reused',
      runId: held.id,
      step: node.name,
      effect: node.name,
      key,
    });
    deps.emit({ type: 'step-completed', runId: held.id, step: node.name, index, next: target });
  } catch (error) {
    tracker.restart(false);
    if (held.signal.aborted || isLeaseError(error)) throw held.signal.reason ?? error;
    if (isCurable(error)) {
      // The database stayed locked: no record was written, so the effect step runs again after
      // the wait, and an effect whose run was called meets its own intent and its key again.
      held.failures.push({
        at: deps.clock.now(),
        step: node.name,
        attempt: 1,
        error: String((error as Error).message).split('\n')[0]!,
      });
      const waitMs = curableWait(deps, deps.park, held.queued?.parks ?? 0, error);
      held.queued = parkEntry(held, deps.clock.now(), node.name, error, waitMs);
      if (waitMs >= deps.park.parkAfterMs) {
        await park(ex, node.name, error, waitMs, {});
        return;
      }
      retrying(ex, node.name, 1, waitMs, error);
      await deps.clock.sleep(waitMs, held.signal);
      return runEffectStep(ex, node);
    }
    // An effect that happened is recorded even when saving its result failed.
    await fail(ex, node.name, error, 1, startedAt, applied ? { effect: applied } : {});
  }
}

function stepContext(
  ex: Execution,
  step: string,
  stepIndex: number,
  attempt: number,
  root: object,
): StepContext {
  const { deps, held, tracker } = ex;
  let writes = Promise.resolve();
  let leave!: (s: Suspended) => void;
  let left = false;
  const suspension = new Promise<Suspended>((resolve) => (leave = resolve));
  /** Leaves the step for a wait; its code never gets past the await that asked. */
  const suspendStep = <T>(wait: WaitRecord, entry: QueueEntry): Promise<T> => {
    left = true;
    leave({ wait, entry });
    return never<T>();
  };
  // Milestones from one step are written one at a time, in the order they were asked for; once the
  // step has left for a wait, nothing more of it is written.
  const serial = <T>(work: () => Promise<T>): Promise<T> => {
    if (left) return never<T>();
    const result = writes.then(() => (left ? never<T>() : work()));
    writes = result.then(
      () => undefined,
      () => undefined,
    );
    return result;
  };
  const commitDraft = async (extra: Pick<Milestone, 'effect'>, label: string) => {
    const { patches, next } = tracker.finish();
    let state;
    try {
      state = stateMilestone(deps, held.run, step, patches, next);
    } catch (error) {
      tracker.restart(true);
      tracker.poisoned = error as Error;
      if (extra.effect) await held.commit(extra, label);
      throw error;
    }
    try {
      await held.commit({ ...state, ...extra }, label);
    } catch (error) {
      tracker.restart(true);
      throw error;
    }
    tracker.adopt(next, true);
  };
  const ctx: StepContext = {
    runId: held.id,
    step,
    attempt,
    signal: held.signal,
    // Most steps never log: build the scoped logger on first use, not on every step.
    get log() {
      const log = deps.logger.child({ runId: held.id, step, attempt });
      Object.defineProperty(this, 'log', { value: log });
      return log;
    },
    // Built on first use, like `log`: most steps never call an LLM.
    get llm() {
      const llm = journaledLlm({ deps, held, step, stepIndex, router: deps.llm });
      Object.defineProperty(this, 'llm', { value: llm });
      return llm;
    },
    // A checkpoint is a milestone: a run asked to stop (cancelled, shutting down) stops here, with
    // the progress it checkpointed saved.
    checkpoint: () =>
      serial(async () => {
        await commitDraft({}, 'checkpoint');
        held.signal.throwIfAborted();
      }),
    sleep: (name: string, duration: Duration) =>
      serial(async () => {
        checkWaitName(name, 'ctx.sleep', held.id, step);
        const ms = toMs(duration, `duration of ctx.sleep("${name}")`);
        const now = deps.clock.now();
        const known = await deps.store.getWait(held.id, name);
        if (known && known.kind !== 'sleep') throw waitKindClash(held.id, step, name);
        if (known?.status === 'fired') return;
        const wait: WaitRecord = known ?? {
          runId: held.id,
          name,
          kind: 'sleep',
          step,
          status: 'waiting',
          dueAt: now + ms,
          payload: null,
          createdAt: now,
          firedAt: null,
        };
        const remaining = wait.dueAt! - now;
        if (remaining > 0) {
          if (remaining >= deps.park.parkAfterMs) {
            return suspendStep<void>(
              wait,
              queueEntry(held, now, { reason: 'sleep', dueAt: wait.dueAt }),
            );
          }
          // Short: wait here, with the due time recorded so that a crash does not re-arm it.
          if (!known) await held.commit({ wait }, 'wait');
          await deps.clock.sleep(remaining, held.signal);
        }
        await held.commit(
          { wait: { ...wait, status: 'fired', firedAt: deps.clock.now() } },
          'wait',
        );
      }),
    waitFor: <T = unknown>(name: string, options: { timeout?: Duration } = {}) =>
      serial(async (): Promise<T> => {
        checkWaitName(name, 'ctx.waitFor', held.id, step);
        const timeoutMs =
          options.timeout === undefined
            ? undefined
            : toMs(options.timeout, `timeout of ctx.waitFor("${name}")`);
        const now = deps.clock.now();
        const known = await deps.store.getWait(held.id, name);
        if (known && known.kind !== 'signal') throw waitKindClash(held.id, step, name);
        if (known?.status === 'fired') return decodePayload<T>(deps, known.payload);
        const wait: WaitRecord = known ?? {
          runId: held.id,
          name,
          kind: 'signal',
          step,
          status: 'waiting',
          dueAt: timeoutMs === undefined ? null : now + timeoutMs,
          payload: null,
          createdAt: now,
          firedAt: null,
        };
        const timedOut = () =>
          new WaitTimeoutError(held.id, step, name, (wait.dueAt ?? now) - wait.createdAt);
        if (wait.status === 'timed_out') throw timedOut();
        const signal = await deps.store.nextSignal(held.id, name);
        if (signal) {
          await held.commit(
            {
              wait: { ...wait, status: 'fired', payload: signal.payload, firedAt: now },
              consumeSignal: { id: signal.id, at: now },
            },
            'wait',
          );
          return decodePayload<T>(deps, signal.payload);
        }
        if (wait.dueAt !== null && wait.dueAt <= now) {
          await held.commit({ wait: { ...wait, status: 'timed_out', firedAt: now } }, 'wait');
          throw timedOut();
        }
        return suspendStep<T>(wait, queueEntry(held, now, { reason: 'signal', dueAt: wait.dueAt }));
      }),
    effect: <R>(name: string, effect: InlineEffect<unknown, R>) =>
      serial(async () => {
        const key = checkKey(
          typeof effect.key === 'function' ? effect.key(root) : effect.key,
          name,
          held.id,
        );
        const spec = withRegistered(effect as InlineEffect<unknown, unknown>, held, name);
        held.inlineEffects.set(name, spec);
        const outcome = await performEffect(deps, held, {
          name,
          step,
          key,
          effect: spec,
          state: root,
          nextOrder: () => ++ex.effectOrder,
        });
        if (outcome.record) {
          await commitDraft({ effect: outcome.record }, 'effect-record');
          deps.emit({ type: 'effect-applied', runId: held.id, step, effect: name, key });
        } else {
          deps.emit({ type: 'effect-reused', runId: held.id, step, effect: name, key });
        }
        return outcome.result as R;
      }),
  };
  suspensions.set(ctx, suspension);
  return ctx;
}

/**
 * An inline effect with what `.compensation(name, ...)` registered on the workflow for it, where
 * the call itself gave none: the process that ran the effect must compensate it exactly as another
 * process would, which finds only the registered one.
 */
function withRegistered(
  effect: InlineEffect<unknown, unknown>,
  held: HeldRun,
  name: string,
): InlineEffect<unknown, unknown> {
  const registered = held.workflow.effectHandlers(name);
  if (!registered || effect.compensate) return effect;
  const merged: InlineEffect<unknown, unknown> = { ...effect };
  if (registered.compensate) merged.compensate = registered.compensate;
  if (registered.compensateRetry && !effect.compensateRetry) {
    merged.compensateRetry = registered.compensateRetry;
  }
  if (registered.reconcile && !effect.reconcile) merged.reconcile = registered.reconcile;
  if (registered.idempotent !== undefined && effect.idempotent === undefined) {
    merged.idempotent = registered.idempotent;
  }
  return merged;
}

function waitKindClash(runId: string, step: string, name: string): DefinitionError {
  return new DefinitionError(
    `The wait name "${name}" is used both by ctx.sleep and by ctx.waitFor in run ${runId}.`,
    { runId, step, hint: 'Give every wait of a run its own name.' },
  );
}

const decodePayload = <T>(deps: EngineDeps, payload: string | null): T =>
  (payload === null ? undefined : decode(payload, { secrets: deps.secrets })) as T;

/** Where the run goes after `from`, checked against the graph. */
function decide(ex: Execution, from: string, state: unknown): string {
  const wf = ex.held.workflow;
  const route = wf.routes.get(from);
  if (!route) return wf.nextInOrder(from);
  let target: unknown;
  try {
    target = route.decide(state as Readonly<unknown>);
  } catch (error) {
    throw new DefinitionError(`The route after step "${from}" threw: ${String(error)}`, {
      runId: ex.held.id,
      step: from,
      cause: error,
    });
  }
  const known = target === END || (typeof target === 'string' && wf.node(target) !== undefined);
  const allowed = !route.targets || route.targets.includes(target as string);
  if (!known || !allowed) {
    throw new DefinitionError(
      `The route after step "${from}" returned ${describeTarget(target)}, which is not ${known ? 'among its declared targets' : 'a declared step'}.`,
      {
        runId: ex.held.id,
        step: from,
        hint: `Return one of: ${[...(route.targets ?? wf.nodes.map((n) => n.name)), 'END'].join(', ')}.`,
      },
    );
  }
  return target as string;
}

/**
 * What a route returned, for its error: a string quoted, any other value as it would be written in
 * code (JSON would write NaN as null, -0 as 0, and throw on a BigInt), an object by its kind.
 */
function describeTarget(target: unknown): string {
  if (typeof target === 'string') return JSON.stringify(target);
  if (typeof target === 'number') return Object.is(target, -0) ? '-0' : String(target);
  if (typeof target === 'bigint') return `${target}n`;
  if (typeof target === 'function') return 'a function';
  if (Array.isArray(target)) return 'an array';
  if (typeof target === 'object' && target !== null) return 'an object';
  return String(target);
}

function advance(ex: Execution, index: number, target: string): Milestone['run'] {
  const ended = target === END;
  return {
    cursor: ended ? null : target,
    stepCount: index,
    cursorAttempts: 0,
    ...(ended ? { status: RunStatus.completed, endedAt: ex.deps.clock.now(), lease: null } : {}),
  };
}

async function fail(
  ex: Execution,
  step: string,
  error: unknown,
  attempts: number,
  startedAt: number,
  extra: Pick<Milestone, 'effect'> = {},
  reason: DeadLetterReason = isRetryable(error) ? 'attempts' : 'not_retryable',
) {
  const { deps, held } = ex;
  const serialized = JSON.stringify({ ...serializeError(error), step });
  const rollback = held.workflow.options.rollbackOnFailure === true;
  const letter = deadLetter(held, deps.clock.now(), step, error, reason, attempts);
  await held.commit(
    {
      ...extra,
      ...dequeue(ex),
      deadLetter: letter,
      run: {
        status: RunStatus.failed,
        error: serialized,
        cursorAttempts: attempts,
        endedAt: deps.clock.now(),
        ...(rollback ? {} : { lease: null }),
      },
      step: {
        ...stepRecord(
          held.id,
          held.run.stepCount + 1,
          step,
          'failed',
          attempts,
          null,
          startedAt,
          deps.clock.now(),
        ),
        error: serialized,
      },
    },
    'step',
  );
  deps.logger.error('run failed', { runId: held.id, step, error: String(error) });
  if (rollback) ex.rollback = await rollbackHeld(deps, held, ex.tracker.base);
}

/** Errors that another attempt of the same code on the same state would only repeat. */
export function isRetryable(error: unknown): boolean {
  return !(
    isStateError(error) ||
    isDefinitionError(error) ||
    isEffectOutcomeUnknownError(error) ||
    isTerminalError(error) ||
    hasCode(error, ErrorCode.llmRejected) ||
    hasCode(error, ErrorCode.waitTimeout) ||
    hasCode(error, ErrorCode.llmJournalMismatch)
  );
}

/**
 * immer revokes a draft's proxies when a milestone finishes it: a value read from `state` before
 * `ctx.checkpoint()` or `ctx.effect()` and used after it throws a bare TypeError. Name the mistake,
 * and do not retry it (a retry from the checkpoint would only hide it on short inputs).
 */
function explainStale(error: unknown, step: string, runId: string): unknown {
  if (!(error instanceof TypeError) || !/revoked/.test(error.message)) return error;
  return new StateError(
    `Step "${step}" used a value it read from \`state\` before a checkpoint, after the checkpoint.`,
    {
      code: ErrorCode.staleState,
      runId,
      step,
      cause: error,
      hint: 'ctx.checkpoint() and ctx.effect() commit the draft and start a new one: read objects and arrays from `state` again after them (primitives are fine), e.g. `state.items.push(x)` rather than a saved `items.push(x)`.',
    },
  );
}

function stepRecord(
  runId: string,
  index: number,
  name: string,
  status: StepRecord['status'],
  attempts: number,
  next: string | null,
  startedAt: number,
  endedAt: number,
): StepRecord {
  return {
    runId,
    index,
    name,
    status,
    attempts,
    next: next === END ? null : next,
    startedAt,
    endedAt,
    error: null,
  };
}
