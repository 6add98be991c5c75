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
