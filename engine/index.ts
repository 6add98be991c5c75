/**
 * keel's deterministic core. It reaches storage only through {@link Store} and imports nothing from
 * `adapters/`; everything that touches a disk, a network or a terminal lives there.
 */
export { workflow, isWorkflow, Workflow, END } from './workflow.ts';
export type {
  CheckRoutes,
  CompleteWorkflow,
  CompensationInfo,
  EffectDefinition,
  EffectInfo,
  GraphShape,
  InlineEffect,
  Reconciled,
  RetryOptions,
  RouteFn,
  StepContext,
  StepFn,
  StepOptions,
  WorkflowOptions,
} from './workflow.ts';
export { Engine } from './engine.ts';
export type { EngineOptions, ResumeOptions, RunResult, StartOptions } from './engine.ts';
export type { ResumePlan, RunSummary, RunView, StepView, EffectView } from './views.ts';
export type { AnyWorkflow, HostInfo, RunEvent, WorkflowLoader } from './deps.ts';
export * from './errors.ts';
export { encode, decode, toDisplayJson } from './codec.ts';
export { systemClock, toMs, type Clock, type Duration } from './time.ts';
export { silentLogger, type Logger, type LogFields } from './logger.ts';
export { RunStatus, EffectStatus } from './store.ts';
export type * from './store.ts';
export type { RollbackReport } from './rollback.ts';
export {
  createRouter,
  LlmRejectedError,
  LlmUnavailableError,
  type Attempt,
  type BreakerState,
  type RoutedResponse,
  type RoutedStreamEvent,
  type Router,
  type RouterOptions,
  type RouterTier,
  type RouterTimeouts,
} from './llm/router.ts';
export {
  costOf,
  LlmJournalMismatchError,
  requestHash,
  type LlmCall,
  type LlmSource,
} from './llm/journal.ts';
export { classifyFailure } from './llm/classify.ts';
export { memoryTierStates, type TierState, type TierStateStore } from './llm/tier-state.ts';
export type * from './llm/types.ts';
export { FailureClass } from './llm/types.ts';
export type { EnqueueOptions, WorkOptions, WorkReport } from './engine.ts';
export { WorkerStopping } from './engine.ts';
export type { DeadLetterView } from './engine.ts';
export { stem, textTerms } from './llm/degraded.ts';
