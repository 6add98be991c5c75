/** Read models of a run for `get`, `list` and `resume --plan`: what a person or a script looks at. */
import { decode, parseStored } from './codec.ts';
import type { AnyWorkflow } from './deps.ts';
import type { SerializedError } from './errors.ts';
import {
  EffectStatus,
  RunStatus,
  type EffectRecord,
  type LlmCallRecord,
  type RunRecord,
  type StepRecord,
} from './store.ts';
import { checkVersion } from './versioning.ts';

export type RunSummary = {
  id: string;
  workflow: string;
  version: number;
  status: RunStatus;
  cursor: string | null;
  /** Step executions completed. */
  stepCount: number;
  /** A live process holds the run now. */
  live: boolean;
  error: SerializedError | null;
  createdAt: number;
  updatedAt: number;
  endedAt: number | null;
};

export type StepView = {
  index: number;
  name: string;
  status: 'completed' | 'failed' | 'running' | 'interrupted';
  attempts: number;
  next: string | null;
  startedAt: number | null;
  endedAt: number | null;
  durationMs: number | null;
  error: SerializedError | null;
};

export type EffectView = {
  name: string;
  key: string;
  step: string;
  status: EffectStatus;
  attempts: number;
  result: unknown;
  error: SerializedError | null;
  startedAt: number;
  completedAt: number | null;
  compensationAttempts: number;
  compensatedAt: number | null;
  compensable: boolean;
};

/** One `ctx.llm` call, as `keel show` lists it. */
export type LlmCallView = {
  step: string;
  stepIndex: number;
  position: number;
  status: 'completed' | 'failed';
  /** The tier that answered (null when none did). */
  tier: string | null;
  provider: string | null;
  model: string | null;
  degraded: boolean;
  streamed: boolean;
  attempts: {
    tier: string;
    class: string | null;
    status: number | null;
    waitMs: number | null;
    latencyMs: number | null;
    cancelled: boolean;
    hedge: boolean;
  }[];
  /** How many times the call moved from one tier to another. */
  failovers: number;
  inputTokens: number;
  outputTokens: number;
  cacheReadTokens: number;
  cacheWriteTokens: number;
  costUsd: number | null;
  latencyMs: number;
  /** True when the answer was served from the journal at least once, instead of a provider. */
  replayed: boolean;
  replays: number;
  error: SerializedError | null;
};

/** Token and cost totals over a run's LLM calls. */
export type LlmUsageView = {
  calls: number;
  inputTokens: number;
  outputTokens: number;
  /** US dollars; null when a call's tier has no price. */
  costUsd: number | null;
};

export type RunView = RunSummary & {
  module: string | null;
  input: unknown;
  state: unknown;
  lease: { owner: string; pid: number; host: string; expiresAt: number } | null;
  steps: StepView[];
  effects: EffectView[];
  llmCalls: LlmCallView[];
  llmUsage: LlmUsageView;
};

const parseError = (text: string | null) => (text ? (parseStored(text) as SerializedError) : null);

export function viewRun(
  run: RunRecord,
  state: unknown,
  steps: StepRecord[],
  effects: EffectRecord[],
  { live, llmCalls = [] }: { live: boolean; llmCalls?: LlmCallRecord[] },
): RunView {
  const stepViews: StepView[] = steps.map((s) => ({
    index: s.index,
    name: s.name,
    status: s.status,
    attempts: s.attempts,
    next: s.next,
    startedAt: s.startedAt,
    endedAt: s.endedAt,
    durationMs: s.endedAt - s.startedAt,
    error: parseError(s.error),
  }));
  const inProgress =
    run.cursor !== null && (run.status === RunStatus.running || run.status === RunStatus.waiting);
  if (inProgress) {
    stepViews.push({
      index: run.stepCount + 1,
      name: run.cursor!,
      status: live ? 'running' : 'interrupted',
      attempts: run.cursorAttempts + 1,
      next: null,
      startedAt: null,
      endedAt: null,
      durationMs: null,
      error: null,
    });
  }
  return {
    id: run.id,
    workflow: run.workflow,
    version: run.version,
    status: run.status,
    cursor: run.cursor,
    steps: stepViews,
    stepCount: run.stepCount,
    live,
    error: parseError(run.error),
    createdAt: run.createdAt,
    updatedAt: run.updatedAt,
    endedAt: run.endedAt,
    module: run.module,
    // Read-only: secrets stay encrypted, and show as [secret].
    input: decode(run.input, { secrets: 'redacted' }),
    state,
    lease: run.lease,
    effects: effects.map((e) => ({
      name: e.name,
      key: e.key,
      step: e.step,
      status: e.status,
      attempts: e.attempts,
      result: e.result === null ? null : decode(e.result, { secrets: 'redacted' }),
      error: parseError(e.error),
      startedAt: e.startedAt,
      completedAt: e.completedAt,
      compensationAttempts: e.compensationAttempts,
      compensatedAt: e.compensatedAt,
      compensable: e.compensable,
    })),
    llmCalls: llmCalls.map(viewLlmCall),
    llmUsage: {
      calls: llmCalls.length,
      inputTokens: llmCalls.reduce((sum, c) => sum + c.inputTokens, 0),
      outputTokens: llmCalls.reduce((sum, c) => sum + c.outputTokens, 0),
      costUsd: llmCalls.some((c) => c.costUsd === null)
        ? null
        : llmCalls.reduce((sum, c) => sum + (c.costUsd ?? 0), 0),
    },
  };
}

type StoredAttempt = {
  tier: string;
  class?: string;
  status?: number;
  waitMs?: number;
  latencyMs?: number;
  cancelled?: boolean;
  hedge?: boolean;
};

function viewLlmCall(c: LlmCallRecord): LlmCallView {
  const attempts = (parseStored(c.attempts) as StoredAttempt[]).map((a) => ({
    tier: a.tier,
    class: a.class ?? null,
    status: a.status ?? null,
    waitMs: a.waitMs ?? null,
    latencyMs: a.latencyMs ?? null,
    cancelled: a.cancelled === true,
    hedge: a.hedge === true,
  }));
  return {
    step: c.step,
    stepIndex: c.stepIndex,
    position: c.position,
    status: c.status,
    tier: c.tier,
    provider: c.provider,
    model: c.model,
    degraded: c.degraded,
    streamed: c.streamed,
    attempts,
    failovers: attempts.filter((a, i) => i > 0 && a.tier !== attempts[i - 1]!.tier).length,
    inputTokens: c.inputTokens,
    outputTokens: c.outputTokens,
    cacheReadTokens: c.cacheReadTokens,
    cacheWriteTokens: c.cacheWriteTokens,
    costUsd: c.costUsd,
    latencyMs: c.latencyMs,
    replayed: c.replays > 0,
    replays: c.replays,
    error: parseError(c.error),
  };
}

export type ResumePlan = {
  runId: string;
  workflow: string;
  status: RunStatus;
  /** Whether `resume` would proceed now, and if not, why. */
  resumable: boolean;
  reason: string | null;
  /** The step execution restarts at (null when nothing is left to run). */
  restartAt: string | null;
  completedSteps: string[];
  /** Effects whose recorded result will be returned instead of running them. */
  reused: { name: string; key: string }[];
  /** Effects whose outcome was not recorded and will be run again with the same key. */
  rerun: { name: string; key: string }[];
  /** Effects whose outcome will be asked of reconcile() first. */
  reconcile: { name: string; key: string }[];
  /** Effects that will stop the run: outcome unknown. */
  unknown: { name: string; key: string }[];
};

export function planResume(
  run: RunRecord,
  wf: AnyWorkflow | undefined,
  steps: StepRecord[],
  effects: EffectRecord[],
  context: { now: number; live: boolean; allowVersionChange: boolean },
): ResumePlan {
  const pick = (e: EffectRecord) => ({ name: e.name, key: e.key });
  const handlers = (name: string) => wf?.effectHandlers(name);
  const inFlight = effects.filter(
    (e) => e.status === EffectStatus.started || e.status === EffectStatus.failed,
  );
  const plan: ResumePlan = {
    runId: run.id,
    workflow: run.workflow,
    status: run.status,
    resumable: true,
    reason: null,
    restartAt: run.cursor,
    completedSteps: steps.filter((s) => s.status === 'completed').map((s) => s.name),
    reused: effects
      .filter((e) => e.status === EffectStatus.done || e.status === EffectStatus.reconciled)
      .map(pick),
    rerun: inFlight
      .filter((e) => !handlers(e.name)?.reconcile && handlers(e.name)?.idempotent !== false)
      .map(pick),
    reconcile: inFlight.filter((e) => handlers(e.name)?.reconcile).map(pick),
    unknown: effects
      .filter(
        (e) =>
          e.status === EffectStatus.unknown ||
          (e.status === EffectStatus.started &&
            handlers(e.name)?.idempotent === false &&
            !handlers(e.name)?.reconcile),
      )
      .map(pick),
  };
  const refuse = (reason: string) => Object.assign(plan, { resumable: false, reason });
  if (
    run.status !== RunStatus.running &&
    run.status !== RunStatus.failed &&
    run.status !== RunStatus.compensating
  ) {
    refuse(`the run is ${run.status}`);
  } else if (context.live) {
    refuse(`process ${run.lease?.pid} on ${run.lease?.host} holds the run`);
  } else if (!wf) {
    refuse(`the definition of workflow "${run.workflow}" could not be loaded`);
  } else {
    try {
      checkVersion(run, wf, context.allowVersionChange);
    } catch (error) {
      refuse((error as Error).message.split('\n')[0]!);
    }
  }
  return plan;
}
