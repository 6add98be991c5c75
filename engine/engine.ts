/**
 * The engine: starts, resumes and rolls back runs over a {@link Store}. Adapters open it with a
 * concrete store (`openEngine` in the package entry); the engine itself does no I/O of its own.
 */
import { lazyRouter, type LlmSource } from './llm/journal.ts';
import { nanoid } from 'nanoid';
import { decode, encode } from './codec.ts';
import { snapshotData } from './checkpoint.ts';
import type { AnyWorkflow, EngineDeps, HostInfo, RunEvent, WorkflowLoader } from './deps.ts';
import {
  DefinitionError,
  ErrorCode,
  InputError,
  KeelError,
  LeaseError,
  serializeError,
  type SerializedError,
} from './errors.ts';
import { HeldRun } from './held-run.ts';
import { silentLogger, type Logger } from './logger.ts';
import { rollbackHeld, type RollbackReport } from './rollback.ts';
import { execute, type Execution } from './runner.ts';
import { StateTracker, replay, type Draftable } from './state.ts';
import { RunStatus, type RunFilter, type RunRecord, type RunUpdate, type Store } from './store.ts';
import { systemClock, type Clock } from './time.ts';
import { checkVersion, fingerprint } from './versioning.ts';
import { isWorkflow, type CheckRoutes, type Workflow } from './workflow.ts';
import { planResume, viewRun, type ResumePlan, type RunSummary, type RunView } from './views.ts';

export type EngineOptions = {
  store: Store;
  host: HostInfo;
  clock?: Clock;
  logger?: Logger;
  /** Lease length; a live owner renews it every third of it (default 30 s). */
  leaseMs?: number;
  /** Largest encoded state a checkpoint may write (default 32 MiB). */
  maxStateBytes?: number;
  /** A full snapshot at least every this many patches (default 200). */
  snapshotEvery?: number;
  /** Finds a stored run's workflow when it was not passed in or registered. */
  loadWorkflow?: WorkflowLoader;
  crashPoint?: (name: string) => void;
  onEvent?: (event: RunEvent) => void;
  /** The program's entry script: never recorded as a run's module (resuming would re-run it). */
  entryScript?: string;
  random?: () => number;
  /** The LLM router behind `ctx.llm` (or a function that builds it on first use). */
  llm?: LlmSource;
};

export type StartOptions = {
  /** The run id (default: a new nanoid). */
  id?: string;
  /** The file to load the workflow from on resume (default: the file that called `workflow()`). */
  module?: string;
};

export type ResumeOptions = {
  /** The definition to resume with; otherwise a registered one, or the run's recorded module. */
  workflow?: AnyWorkflow;
  /** Carry the run on under a changed graph whose version was raised. */
  allowVersionChange?: boolean;
  /** Where the workflow's file is now (it moved): recorded for later resumes. */
  module?: string;
};

/** How a run stands when the call that drove it returns. */
export type RunResult<S = unknown> = {
  id: string;
  workflow: string;
  status: RunStatus;
  state: S;
  error: SerializedError | null;
  /** Set by rollback. */
  rollback?: RollbackReport;
};

/**
 * Definitions started in this process, by name and graph fingerprint: another engine in the same
 * process resumes such a run with the very definition, without importing its file again (which,
 * for a script that starts runs at its top level, would run that script again).
 */
const started = new Map<string, AnyWorkflow>();

export class Engine {
  private readonly deps: EngineDeps;
  private readonly entryScript: string | undefined;
  private readonly owner: string;
  private readonly registry = new Map<string, AnyWorkflow>();
  private readonly held = new Set<HeldRun>();

  constructor(options: EngineOptions) {
    const emit = options.onEvent ?? (() => {});
    this.deps = {
      store: options.store,
      clock: options.clock ?? systemClock,
      logger: options.logger ?? silentLogger,
      host: options.host,
      leaseMs: options.leaseMs ?? 30_000,
      maxStateBytes: options.maxStateBytes ?? 32 * 1024 * 1024,
      snapshotEvery: options.snapshotEvery ?? 200,
      loadWorkflow:
        options.loadWorkflow ??
        (async (run) => {
          throw new InputError(
            `No definition of workflow "${run.workflow}" is loaded for run ${run.id}.`,
            {
              runId: run.id,
              hint: 'Pass it with resume(id, { workflow }) or engine.register(workflow).',
            },
          );
        }),
      crashPoint: options.crashPoint ?? (() => {}),
      emit: (event) => {
        try {
          emit(event);
        } catch {
          // a progress display must never break a run
        }
      },
      random: options.random ?? Math.random,
      llm: lazyRouter(options.llm),
    };
    this.owner = `${options.host.name}:${options.host.pid}:${nanoid(8)}`;
    this.entryScript = options.entryScript;
  }

  /** Makes a definition available to `resume` and `rollback` by its workflow name. */
  register(wf: AnyWorkflow): this {
    this.registry.set(wf.name, wf);
    return this;
  }

  /**
   * Starts a run and drives it until it completes, fails, or is rolled back. A failed run resolves
   * (with `status: 'failed'` and its error); only problems of the engine itself reject.
   * @example
   * const { id, status, state } = await engine.start(brief, { topic: 'leases', sources: [], notes: [] });
   */
  async start<S, N extends string, P extends string>(
    wf: Workflow<S, N, P> & CheckRoutes<P>,
    input: S,
    options: StartOptions = {},
  ): Promise<RunResult<S>> {
    const definition = asWorkflow(wf);
    definition.validate();
    started.set(`${definition.name}:${fingerprint(definition.shape())}`, definition);
    if (
      typeof input !== 'object' ||
      input === null ||
      Array.isArray(input) ||
      input instanceof Map
    ) {
      throw new InputError(
        `The input of workflow "${definition.name}" must be an object, got ${describe(input)}.`,
        {
          hint: 'Pass a JSON object, e.g. --input \'{"topic": "leases"}\'.',
        },
      );
    }
    const { clock, store, host } = this.deps;
    const id = options.id ?? newRunId();
    if (options.id !== undefined && (await store.getRun(id))) {
      throw new InputError(`A run with id "${id}" already exists.`, {
        hint: 'Resume it with engine.resume(id), or start with another id (or none: keel makes one).',
      });
    }
    const now = clock.now();
    const encodedInput = encode(input);
    const state = decode<Draftable>(encodedInput);
    let snapshot: string;
    try {
      snapshot = snapshotData(this.deps, id, null, state);
    } catch (error) {
      // No run exists yet: an input over the limit is the caller's to fix.
      throw new InputError(
        `The input of workflow "${definition.name}" is too large to start a run: ${(error as Error).message.split('\n')[0]}`,
        { code: ErrorCode.stateTooLarge, cause: error, hint: (error as KeelError).hint ?? '' },
      );
    }
    const shape = definition.shape();
    const run: RunRecord = {
      id,
      workflow: definition.name,
      version: definition.options.version,
      fingerprint: fingerprint(shape),
      graph: JSON.stringify(shape),
      module: options.module ?? this.recordableModule(definition),
      status: RunStatus.running,
      input: encodedInput,
      cursor: definition.nodes[0]!.name,
      cursorAttempts: 0,
      stepCount: 0,
      seq: 1,
      snapshotSeq: 1,
      snapshotBytes: snapshot.length,
      patchBytes: 0,
      patchCount: 0,
      error: null,
      options: JSON.stringify({ rollbackOnFailure: definition.options.rollbackOnFailure ?? false }),
      epoch: 1,
      lease: {
        owner: this.owner,
        pid: host.pid,
        host: host.name,
        expiresAt: now + this.deps.leaseMs,
      },
      createdAt: now,
      updatedAt: now,
      endedAt: null,
    };
    await store.createRun(run, {
      runId: id,
      seq: 1,
      kind: 'snapshot',
      step: null,
      data: snapshot,
      createdAt: now,
    });
    this.deps.emit({ type: 'run-started', runId: id, workflow: run.workflow, cursor: run.cursor });
    const held = new HeldRun(this.deps, run, definition, 1);
    return (await this.drive(held, new StateTracker(state), 0)) as RunResult<S>;
  }

  /**
   * Continues an interrupted (or failed) run from its last checkpoint. Effects recorded as done are
   * not run again; one whose outcome was not recorded is reconciled or run again with the same key.
   */
  async resume(runId: string, options: ResumeOptions = {}): Promise<RunResult> {
    const run = await this.mustGet(runId);
    if (run.status === RunStatus.compensating) return this.rollback(runId, options);
    if (run.status !== RunStatus.running && run.status !== RunStatus.failed) {
      throw new KeelError(
        ErrorCode.notResumable,
        `Run ${runId} is ${run.status}; there is nothing to resume.`,
        {
          runId,
          hint:
            run.status === RunStatus.compensationFailed
              ? `Its rollback stopped; fix the compensation and run \`keel rollback ${runId}\`.`
              : 'Start a new run instead.',
        },
      );
    }
    const wf = await this.definitionFor(run, options);
    const update: RunUpdate = checkVersion(run, wf, options.allowVersionChange === true);
    if (options.module !== undefined && options.module !== run.module)
      update.module = options.module;
    const held = await this.claim(run, wf);
    if (run.status === RunStatus.failed)
      Object.assign(update, {
        status: RunStatus.running,
        cursorAttempts: 0,
        error: null,
        endedAt: null,
      });
    if (Object.keys(update).length > 0) await held.commit({ run: update }, 'resume');
    this.deps.emit({ type: 'run-resumed', runId, workflow: run.workflow, cursor: run.cursor });
    // Read after the claim: a stalled owner may have committed until the moment it lost the run.
    const tracker = new StateTracker(await this.loadState(held.run));
    return this.drive(held, tracker, await this.effectOrder(runId));
  }

  /** Resumes every run left `running` or `compensating` by a process that is gone. */
  async resumeAll(
    options: Omit<ResumeOptions, 'workflow'> = {},
  ): Promise<Array<RunResult | { id: string; error: SerializedError }>> {
    const runs = await this.deps.store.listRuns({
      status: [RunStatus.running, RunStatus.compensating],
    });
    const results: Array<RunResult | { id: string; error: SerializedError }> = [];
    for (const run of runs) {
      if (this.leaseIsLive(run)) continue;
      try {
        results.push(await this.resume(run.id, options));
      } catch (error) {
        if (error instanceof LeaseError) continue; // another resumer won the race
        results.push({ id: run.id, error: serializeError(error) });
      }
    }
    return results;
  }

  /** What `resume` would do, without changing anything. */
  async plan(runId: string, options: ResumeOptions = {}): Promise<ResumePlan> {
    const run = await this.mustGet(runId);
    const wf = await this.definitionFor(run, options).catch(() => undefined);
    return planResume(
      run,
      wf,
      await this.deps.store.listSteps(runId),
      await this.deps.store.listEffects(runId),
      {
        now: this.deps.clock.now(),
        live: this.leaseIsLive(run),
        allowVersionChange: options.allowVersionChange === true,
      },
    );
  }

  /**
   * Runs the compensations of the run's applied effects, newest first. Resumable: a second call after a
   * crash or a failed compensation continues where the first stopped, and compensates nothing twice.
   */
  async rollback(runId: string, options: ResumeOptions = {}): Promise<RunResult> {
    const run = await this.mustGet(runId);
    if (run.status === RunStatus.rolledBack) return this.result(run, await this.loadState(run));
    const wf = await this.definitionFor(run, options);
    const held = await this.claim(run, wf);
    this.held.add(held);
    held.startHeartbeat();
    try {
      const state = await this.loadState(held.run);
      const report = await rollbackHeld(this.deps, held, state);
      this.deps.emit({ type: 'run-ended', runId, status: held.run.status });
      return { ...this.result(held.run, state), rollback: report };
    } finally {
      held.stopHeartbeat();
      this.held.delete(held);
    }
  }

  /** A run with its state, steps and effects. Throws when no run has that id. */
  async get(runId: string): Promise<RunView> {
    const run = await this.mustGet(runId);
    const { store } = this.deps;
    const state = await this.loadState(run);
    return viewRun(run, state, await store.listSteps(runId), await store.listEffects(runId), {
      live: this.leaseIsLive(run),
      llmCalls: await store.listLlmCalls(runId),
    });
  }

  /** Runs, newest first, without their state. */
  async list(filter: RunFilter = {}): Promise<RunSummary[]> {
    const runs = await this.deps.store.listRuns(filter);
    return runs.map((run) => ({
      id: run.id,
      workflow: run.workflow,
      version: run.version,
      status: run.status,
      cursor: run.cursor,
      stepCount: run.stepCount,
      live: this.leaseIsLive(run),
      error: run.error ? (JSON.parse(run.error) as SerializedError) : null,
      createdAt: run.createdAt,
      updatedAt: run.updatedAt,
      endedAt: run.endedAt,
    }));
  }

  /** Stops the runs this engine drives at their next milestone, hands back their leases, closes the store. */
  async close(): Promise<void> {
    for (const held of this.held) {
      held.abort(new KeelError(ErrorCode.cancelled, 'The engine is closing.', { runId: held.id }));
      await held.release().catch(() => undefined);
    }
    await this.deps.store.close();
  }

  private async drive(
    held: HeldRun,
    tracker: StateTracker,
    effectOrder: number,
  ): Promise<RunResult> {
    this.held.add(held);
    held.startHeartbeat();
    const execution: Execution = { deps: this.deps, held, tracker, effectOrder };
    try {
      await execute(execution);
    } finally {
      held.stopHeartbeat();
      this.held.delete(held);
    }
    this.deps.emit({ type: 'run-ended', runId: held.id, status: held.run.status });
    const result = this.result(held.run, tracker.base);
    return execution.rollback ? { ...result, rollback: execution.rollback } : result;
  }

  private result(run: RunRecord, state: object): RunResult {
    return {
      id: run.id,
      workflow: run.workflow,
      status: run.status,
      state,
      error: run.error ? (JSON.parse(run.error) as SerializedError) : null,
    };
  }

  private async claim(run: RunRecord, wf: AnyWorkflow): Promise<HeldRun> {
    const { clock, host, leaseMs, store } = this.deps;
    if (this.leaseIsLive(run)) {
      const lease = run.lease!;
      throw new LeaseError(
        ErrorCode.leaseHeld,
        `Run ${run.id} is owned by process ${lease.pid} on ${lease.host} (lease until ${new Date(lease.expiresAt).toISOString()}).`,
        {
          runId: run.id,
          hint: 'It is being worked on; wait for it, or for its lease to expire if that process hangs.',
        },
      );
    }
    const epoch = await store.claimLease(run.id, run.epoch, {
      owner: this.owner,
      pid: host.pid,
      host: host.name,
      expiresAt: clock.now() + leaseMs,
    });
    if (epoch === null) {
      throw new LeaseError(
        ErrorCode.leaseHeld,
        `Run ${run.id} was claimed by another process at the same moment.`,
        {
          runId: run.id,
          hint: 'That process carries it on; see `keel show` for its progress.',
        },
      );
    }
    const claimed = (await store.getRun(run.id))!;
    return new HeldRun(this.deps, claimed, wf, epoch);
  }

  /**
   * The file to record for `resume --all`: where the workflow was defined, unless that is the
   * program's entry script, which resuming would run again from the top (starting new runs).
   */
  private recordableModule(definition: AnyWorkflow): string | null {
    const module = definition.module;
    if (!module || module === this.entryScript) return null;
    return module;
  }

  /** True while another live owner holds the run's lease. */
  private leaseIsLive(run: RunRecord): boolean {
    const lease = run.lease;
    if (!lease || lease.expiresAt <= this.deps.clock.now()) return false;
    const { host } = this.deps;
    return !(lease.host === host.name && !host.isAlive(lease.pid));
  }

  private async definitionFor(run: RunRecord, options: ResumeOptions): Promise<AnyWorkflow> {
    const wf =
      options.workflow ??
      this.registry.get(run.workflow) ??
      started.get(`${run.workflow}:${run.fingerprint}`) ??
      (await this.deps.loadWorkflow(run));
    if (wf.name !== run.workflow) {
      throw new DefinitionError(
        `Run ${run.id} is of workflow "${run.workflow}", not "${wf.name}".`,
        { runId: run.id },
      );
    }
    wf.validate();
    return wf;
  }

  private async loadState(run: RunRecord): Promise<Draftable> {
    return replay(await this.deps.store.loadCheckpoints(run.id, run.snapshotSeq));
  }

  private async effectOrder(runId: string): Promise<number> {
    const effects = await this.deps.store.listEffects(runId);
    return Math.max(0, ...effects.map((e) => e.completionOrder ?? 0));
  }

  private async mustGet(runId: string): Promise<RunRecord> {
    const run = await this.deps.store.getRun(runId);
    if (!run) {
      throw new InputError(`No run with id "${runId}" in this database.`, {
        code: ErrorCode.notFound,
        hint: 'List runs with `keel ls`; check --db (or KEEL_DB) points at the database the run was started in.',
      });
    }
    return run;
  }
}

/** A nanoid that does not begin with '-', which a command line would read as an option. */
function newRunId(): string {
  for (;;) {
    const id = nanoid();
    if (!id.startsWith('-')) return id;
  }
}

function asWorkflow(value: unknown): AnyWorkflow {
  if (!isWorkflow(value)) {
    throw new DefinitionError(`Expected a workflow, got ${describe(value)}.`, {
      hint: "Build one with workflow<State>('name', { version: 1 }).step(...).",
    });
  }
  return value;
}

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (value instanceof Map) return 'a Map';
  if (typeof value === 'object' || typeof value === 'function') return `a ${typeof value}`;
  return `${typeof value} ${JSON.stringify(value) ?? 'undefined'}`;
}
