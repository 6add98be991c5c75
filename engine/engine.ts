/**
 * The engine: starts, resumes and rolls back runs over a {@link Store}. Adapters open it with a
 * concrete store (`openEngine` in the package entry); the engine itself does no I/O of its own.
 */
import { nanoid } from 'nanoid';
import { decode, encode, parseStored } from './codec.ts';
import { snapshotData } from './checkpoint.ts';
import type { AnyWorkflow, EngineDeps, HostInfo, RunEvent, WorkflowLoader } from './deps.ts';
import {
  DefinitionError,
  ErrorCode,
  InputError,
  KeelError,
  CancelledError,
  LeaseError,
  isLeaseError,
  isKeelError,
  serializeError,
  type SerializedError,
} from './errors.ts';
import { HeldRun } from './held-run.ts';
import { queueEntry } from './queue.ts';
import { lazyRouter, type LlmSource } from './llm/journal.ts';
import { silentLogger, type Logger } from './logger.ts';
import { rollbackHeld, type RollbackReport } from './rollback.ts';
import { EMPTY_KEYRING, type Keyring } from './secret.ts';
import { execute, type Execution } from './runner.ts';
import { StateTracker, replay, type Draftable } from './state.ts';
import {
  RunStatus,
  type CheckpointRecord,
  type DeadLetter,
  type Milestone,
  type RunFilter,
  type RunRecord,
  type RunUpdate,
  type Store,
} from './store.ts';
import { systemClock, toMs, type Clock, type Duration } from './time.ts';
import { checkVersion, fingerprint } from './versioning.ts';
import { isWorkflow, type CheckRoutes, type Workflow } from './workflow.ts';
import { planResume, viewRun, type ResumePlan, type RunSummary, type RunView } from './views.ts';

/** How long a worker leaves a run it could not carry on before it tries again, doubling to the max. */
const HOLD_BACK_FIRST_MS = 1_000;
const HOLD_BACK_MAX_MS = 5 * 60_000;

/** Causes that trying again cannot remove: a changed or broken definition, a missing key. */
const LASTING: ReadonlySet<string> = new Set([
  ErrorCode.definition,
  ErrorCode.input,
  ErrorCode.versionMismatch,
  ErrorCode.state,
  ErrorCode.secretKeyMissing,
  ErrorCode.secretDamaged,
]);

const needsAPerson = (error: unknown): boolean => isKeelError(error) && LASTING.has(error.code);

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
  /**
   * A failing step whose next attempt is at least this far off parks the run (`waiting`, no lease
   * held) instead of sleeping in the process (default 60 s; a worker parks every wait).
   */
  parkAfterMs?: number;
  /** Backoff of the parks of a run waiting out an LLM outage: first ceiling, and the cap. */
  parkBackoffMs?: number;
  maxParkBackoffMs?: number;
  /**
   * The keys that `secret(...)` values are encrypted with (the current one) and read back with (it,
   * and the old ones). Without a current key, storing a secret fails.
   */
  secrets?: Keyring;
};

export type StartOptions = {
  /** The run id (default: a new nanoid). */
  id?: string;
  /** The file to load the workflow from on resume (default: the file that called `workflow()`). */
  module?: string;
};

export type WorkOptions = {
  /** Runs carried on at once (default 4). */
  concurrency?: number;
  /** Aborting it stops the worker: no new claims, then the shutdown described at {@link Engine.work}. */
  signal?: AbortSignal;
  /** Longest sleep between looks at the queue (default 1 s); a finished run wakes it sooner. */
  pollMs?: number;
  /** How often to look for runs abandoned by dead processes (default: a third of the lease). */
  abandonedScanMs?: number;
  /** Stop when nothing is running and nothing is waiting for a due time (batch jobs, tests). */
  untilIdle?: boolean;
  /** On stop, how long runs in progress may take to finish before they are handed back (10 s). */
  graceMs?: number;
  /** Waits at least this long park the run rather than sleep in the worker (default 1 s). */
  parkAfterMs?: number;
};

/** What a worker did, by how each run it carried on ended. */
export type WorkReport = {
  completed: number;
  failed: number;
  waiting: number;
  other: number;
  /** Runs that could not be carried on (their definition did not load, say). */
  errors: number;
};

/** The reason a worker's runs are stopped when it shuts down. */
export class WorkerStopping extends KeelError {
  override name = 'WorkerStopping';
  constructor(runId: string) {
    super(ErrorCode.cancelled, 'The worker is shutting down; the run goes back to the queue.', {
      runId,
    });
  }
}

export type EnqueueOptions = StartOptions & {
  /** Higher runs first (default 0). */
  priority?: number;
  /** Deduplication: a second enqueue with the same key adds nothing. */
  key?: string;
  /** Not before this long from now (milliseconds, or a string such as "20m"). */
  delay?: Duration;
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
  /** Workflows' `concurrency` options, as their definitions are met. */
  private readonly limits = new Map<string, number>();

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
      park: {
        parkAfterMs: options.parkAfterMs ?? 60_000,
        parkBackoffMs: options.parkBackoffMs ?? 1_000,
        maxParkBackoffMs: options.maxParkBackoffMs ?? 300_000,
      },
      secrets: options.secrets ?? EMPTY_KEYRING,
    };
    this.owner = `${options.host.name}:${options.host.pid}:${nanoid(8)}`;
    this.entryScript = options.entryScript;
  }

  /** Makes a definition available to `resume` and `rollback` by its workflow name. */
  register(wf: AnyWorkflow): this {
    this.registry.set(wf.name, wf);
    if (wf.options.concurrency !== undefined) this.limits.set(wf.name, wf.options.concurrency);
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
    const { definition, run, snapshot, state } = await this.newRun(wf, input, options, 'start');
    await this.deps.store.createRun(run, snapshot);
    this.deps.emit({
      type: 'run-started',
      runId: run.id,
      workflow: run.workflow,
      cursor: run.cursor,
    });
    const held = new HeldRun(this.deps, run, definition, 1);
    return (await this.drive(held, new StateTracker(state), 0)) as RunResult<S>;
  }

  /**
   * Adds a run to the queue, for a worker (`keel worker`, {@link work}) to start when it is due.
   * With a `key` that an earlier enqueue used, adds nothing and returns that run's id.
   * @example
   * const { runId, created } = await engine.enqueue(brief, { topic: 'leases' }, { key: 'brief:leases' });
   */
  async enqueue<S, N extends string, P extends string>(
    wf: Workflow<S, N, P> & CheckRoutes<P>,
    input: S,
    options: EnqueueOptions = {},
  ): Promise<{ runId: string; created: boolean }> {
    if (options.key !== undefined && (typeof options.key !== 'string' || options.key === '')) {
      throw new InputError(
        `An enqueue key must be a non-empty string, got ${describe(options.key)}.`,
        {
          hint: 'Use a key that names the work, e.g. `brief:${topic}`, or leave it out.',
        },
      );
    }
    const priority = options.priority ?? 0;
    if (!Number.isInteger(priority)) {
      throw new InputError(`A priority must be an integer, got ${describe(priority)}.`, {
        hint: 'Higher runs first; the default is 0.',
      });
    }
    const { run, snapshot } = await this.newRun(wf, input, options, 'enqueue');
    const now = run.createdAt;
    const dueAt = now + (options.delay === undefined ? 0 : toMs(options.delay, 'delay'));
    return this.deps.store.enqueueRun(
      run,
      snapshot,
      {
        runId: run.id,
        workflow: run.workflow,
        dueAt,
        priority,
        parks: 0,
        waitingSince: null,
        reason: 'queued',
        lastError: null,
        history: '[]',
        createdAt: now,
      },
      options.key,
    );
  }

  /** A new run record (held by this engine for `start`, by nobody for `enqueue`) and its snapshot. */
  private async newRun(
    wf: unknown,
    input: unknown,
    options: StartOptions,
    purpose: 'start' | 'enqueue',
  ) {
    const definition = asWorkflow(wf);
    definition.validate();
    if (definition.options.concurrency !== undefined)
      this.limits.set(definition.name, definition.options.concurrency);
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
    const secrets = this.deps.secrets;
    const encodedInput = encode(input, { secrets });
    const state = decode<Draftable>(encodedInput, { secrets });
    let data: string;
    try {
      data = snapshotData(this.deps, id, null, state);
    } catch (error) {
      // No run exists yet: an input over the limit is the caller's to fix.
      throw new InputError(
        `The input of workflow "${definition.name}" is too large to ${purpose} a run: ${(error as Error).message.split('\n')[0]}`,
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
      status: purpose === 'start' ? RunStatus.running : RunStatus.queued,
      input: encodedInput,
      cursor: definition.nodes[0]!.name,
      cursorAttempts: 0,
      stepCount: 0,
      seq: 1,
      snapshotSeq: 1,
      snapshotBytes: data.length,
      patchBytes: 0,
      patchCount: 0,
      error: null,
      options: JSON.stringify({ rollbackOnFailure: definition.options.rollbackOnFailure ?? false }),
      epoch: 1,
      lease:
        purpose === 'start'
          ? {
              owner: this.owner,
              pid: host.pid,
              host: host.name,
              expiresAt: now + this.deps.leaseMs,
            }
          : null,
      createdAt: now,
      updatedAt: now,
      endedAt: null,
      cancelRequested: false,
    };
    const snapshot: CheckpointRecord = {
      runId: id,
      seq: 1,
      kind: 'snapshot',
      step: null,
      data,
      createdAt: now,
    };
    return { definition, run, snapshot, state };
  }

  /**
   * Continues an interrupted (or failed) run from its last checkpoint. Effects recorded as done are
   * not run again; one whose outcome was not recorded is reconciled or run again with the same key.
   */
  async resume(
    runId: string,
    options: ResumeOptions & { onlyIfDue?: boolean } = {},
  ): Promise<RunResult> {
    const run = await this.mustGet(runId);
    if (run.status === RunStatus.compensating) return this.rollback(runId, options);
    if (!RESUMABLE.has(run.status)) {
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
    if (
      (run.status === RunStatus.queued || run.status === RunStatus.waiting) &&
      run.lease === null &&
      !run.cancelRequested
    ) {
      return this.startIdle(run, wf, update, options.onlyIfDue === true);
    }
    const held = await this.claim(run, wf);
    if (held.run.cancelRequested) {
      const mode = await this.deps.store.cancelRequest(runId);
      const rollback = mode === 2;
      return this.finishCancel(held, rollback, await this.loadState(held.run, rollback));
    }
    const milestone: Milestone = { run: update };
    if (run.status === RunStatus.failed) {
      Object.assign(update, {
        status: RunStatus.running,
        cursorAttempts: 0,
        error: null,
        endedAt: null,
      });
      // Resumed by hand: no longer a dead letter.
      milestone.deadLetter = null;
    }
    // Queued, parked, waiting, or left running by a dead process with its entry: claimed, it is
    // not due again while this process works on it, and its parks so far are kept.
    held.queued = await this.deps.store.getQueueEntry(runId);
    if (
      options.onlyIfDue &&
      (run.status === RunStatus.queued || run.status === RunStatus.waiting) &&
      (held.queued?.dueAt ?? Infinity) > this.deps.clock.now()
    ) {
      // Another worker parked it again since this one read the queue: not due, hand it back.
      await held.release();
      return this.result(held.run, await this.loadState(held.run, false));
    }
    // Read after the claim, as a stalled owner may have committed until the moment it lost the run,
    // and before anything is written, so that a run whose state cannot be read stays as it was.
    const tracker = new StateTracker(await this.loadHeldState(held));
    if (run.status === RunStatus.queued || run.status === RunStatus.waiting) {
      update.status = RunStatus.running;
    }
    if (held.queued && held.queued.dueAt !== null)
      milestone.queue = { ...held.queued, dueAt: null };
    if (Object.keys(update).length > 0 || milestone.queue || milestone.deadLetter === null)
      await held.commit(milestone, 'resume');
    this.deps.emit({ type: 'run-resumed', runId, workflow: run.workflow, cursor: run.cursor });
    return this.drive(held, tracker, await this.effectOrder(runId));
  }

  /**
   * Carries on a queued or waiting run that nobody holds: its state is read first, then the claim
   * and the run's start (running, no longer due) are one write, made only if the run is still as it
   * was read. A run whose state cannot be read is left exactly as it was, not even claimed.
   */
  private async startIdle(
    run: RunRecord,
    wf: AnyWorkflow,
    update: RunUpdate,
    onlyIfDue: boolean,
  ): Promise<RunResult> {
    const { clock, crashPoint, host, leaseMs, store } = this.deps;
    const queued = await store.getQueueEntry(run.id);
    if (onlyIfDue && (queued?.dueAt ?? Infinity) > clock.now()) {
      // Started or parked again by another worker since the queue was read: in hand elsewhere.
      throw new LeaseError(ErrorCode.leaseHeld, `Run ${run.id} is no longer due here.`, {
        runId: run.id,
        hint: 'Another worker started it or parked it again; it is carried on when due.',
      });
    }
    const tracker = new StateTracker(await this.loadState(run, true));
    const effectOrder = await this.effectOrder(run.id);
    const fields: RunUpdate = { ...update, status: RunStatus.running };
    const milestone: Milestone = { run: fields };
    if (queued && queued.dueAt !== null) milestone.queue = { ...queued, dueAt: null };
    const lease = {
      owner: this.owner,
      pid: host.pid,
      host: host.name,
      expiresAt: clock.now() + leaseMs,
    };
    crashPoint('resume:before-commit');
    const epoch = await store.claimIdle(run.id, run, lease, milestone, {
      inside: () => crashPoint('resume:inside-commit'),
    });
    if (epoch === null) throw claimedElsewhere(run.id);
    const claimed: RunRecord = { ...run, ...fields, epoch, lease, updatedAt: clock.now() };
    const held = new HeldRun(this.deps, claimed, wf, epoch);
    held.queued = queued;
    crashPoint('resume:after-commit');
    this.deps.emit({
      type: 'run-resumed',
      runId: run.id,
      workflow: run.workflow,
      cursor: run.cursor,
    });
    return this.drive(held, tracker, effectOrder);
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
    if (run.status === RunStatus.rolledBack)
      return this.result(run, await this.loadState(run, false));
    const wf = await this.definitionFor(run, options);
    const held = await this.claim(run, wf);
    const state = await this.loadHeldState(held);
    this.held.add(held);
    held.startHeartbeat();
    try {
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
    const state = await this.loadState(run, false);
    return viewRun(run, state, await store.listSteps(runId), await store.listEffects(runId), {
      live: this.leaseIsLive(run),
      llmCalls: await store.listLlmCalls(runId),
    });
  }

  /**
   * Sends the signal `name` to a run, with an optional payload. A run waiting for it
   * (`ctx.waitFor`) becomes due at once; a run not there yet takes it when it gets there.
   */
  async signal(runId: string, name: string, payload?: unknown): Promise<{ woke: boolean }> {
    const run = await this.mustGet(runId);
    if (typeof name !== 'string' || name === '') {
      throw new InputError(`A signal needs a non-empty name, got ${describe(name)}.`, {
        hint: 'Use the name the workflow waits for, e.g. `keel signal RUN_ID approval`.',
      });
    }
    if (ENDED.has(run.status)) {
      throw new KeelError(
        ErrorCode.notResumable,
        `Run ${runId} is ${run.status}: no wait of it will take the signal "${name}".`,
        { runId, hint: 'Signal a run that is running, queued or waiting (`keel ls`).' },
      );
    }
    const encoded = payload === undefined ? null : encode(payload, { secrets: this.deps.secrets });
    const woke = await this.deps.store.sendSignal(runId, name, encoded, this.deps.clock.now());
    return { woke };
  }

  /**
   * Cancels a run: a waiting or queued one at once, a running one at its next milestone (its
   * AbortSignal fires; a wait ends at once). With `rollback`, its compensations run first, and are
   * not themselves cancelled. The run ends `cancelled` (or `compensation_failed` if a compensation
   * keeps failing). Resolves with the run as it stands then.
   */
  async cancel(
    runId: string,
    options: { rollback?: boolean; waitMs?: number } = {},
  ): Promise<RunResult> {
    const rollback = options.rollback === true;
    const run = await this.mustGet(runId);
    if (ENDED.has(run.status) && run.status !== RunStatus.failed) {
      return this.result(run, await this.loadState(run, false));
    }
    const mine = [...this.held].find((h) => h.id === runId);
    if (mine) {
      mine.abort(new CancelledError(runId, rollback));
    } else if (this.leaseIsLive(run)) {
      await this.deps.store.requestCancel(runId, rollback ? 2 : 1);
    } else {
      const wf = await this.definitionFor(run, {});
      const held = await this.claim(run, wf);
      return this.finishCancel(held, rollback, await this.loadState(held.run, rollback));
    }
    // The holder stops it at its next milestone, or its lease lapses and it is cancelled here.
    const deadline = this.deps.clock.now() + (options.waitMs ?? 3 * this.deps.leaseMs);
    for (;;) {
      const now = await this.mustGet(runId);
      if (now.status !== RunStatus.running && now.status !== RunStatus.compensating)
        return this.result(now, await this.loadState(now, false));
      if (!this.leaseIsLive(now) && !this.held.has(mine!)) return this.cancel(runId, options);
      if (this.deps.clock.now() >= deadline)
        return this.result(now, await this.loadState(now, false));
      await this.deps.clock.sleep(50);
    }
  }

  /** Ends a held run as cancelled, after its compensations when asked (those are not cancelled). */
  private async finishCancel(held: HeldRun, rollback: boolean, state: object): Promise<RunResult> {
    const now = this.deps.clock.now();
    // A fresh hold on the same lease: the cancelled one's signal is aborted, the rollback's is not.
    const holder = new HeldRun(this.deps, held.run, held.workflow, held.epoch);
    let report: RollbackReport | undefined;
    if (rollback) {
      this.held.add(holder);
      holder.startHeartbeat();
      try {
        report = await rollbackHeld(this.deps, holder, state);
      } finally {
        holder.stopHeartbeat();
        this.held.delete(holder);
      }
    }
    if (!rollback || holder.run.status === RunStatus.rolledBack) {
      await holder.commit(
        {
          run: { status: RunStatus.cancelled, endedAt: now, cursor: null, lease: null },
          queue: null,
          deadLetter: null,
        },
        'cancel',
      );
    } else if (holder.run.lease) {
      await holder.release().catch(() => undefined);
    }
    this.deps.emit({ type: 'run-ended', runId: holder.id, status: holder.run.status });
    const result = this.result(holder.run, state);
    return report ? { ...result, rollback: report } : result;
  }

  /** The dead-letter queue: runs that could not finish, newest first. */
  async deadLetters(options: { includeDropped?: boolean } = {}): Promise<DeadLetterView[]> {
    return (await this.deps.store.listDeadLetters(options)).map(viewDeadLetter);
  }

  /** One dead letter; throws NOT_FOUND when the run has none. */
  async deadLetter(runId: string): Promise<DeadLetterView> {
    const letter = await this.deps.store.getDeadLetter(runId);
    if (!letter) throw noDeadLetter(runId);
    return viewDeadLetter(letter);
  }

  /**
   * Puts a dead-lettered run back in the queue, due now, with its step's attempts reset: a worker
   * continues it from its last checkpoint (the steps before it do not run again).
   */
  async retryDeadLetter(runId: string): Promise<void> {
    const letter = await this.deps.store.getDeadLetter(runId);
    if (!letter || letter.droppedAt !== null) throw noDeadLetter(runId);
    const now = this.deps.clock.now();
    const requeued = await this.deps.store.requeueDeadLetter(runId, {
      runId,
      workflow: letter.workflow,
      dueAt: now,
      priority: 0,
      parks: 0,
      waitingSince: null,
      reason: 'queued',
      lastError: letter.error,
      history: '[]',
      createdAt: now,
    });
    if (!requeued) throw noDeadLetter(runId);
  }

  /** Removes a run from the dead-letter listing (the run and its record stay). */
  async dropDeadLetter(runId: string): Promise<void> {
    if (!(await this.deps.store.dropDeadLetter(runId, this.deps.clock.now())))
      throw noDeadLetter(runId);
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
      error: run.error ? (parseStored(run.error) as SerializedError) : null,
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
    } catch (error) {
      const reason: unknown = held.signal.reason;
      if (held.signal.aborted && reason instanceof CancelledError) {
        held.stopHeartbeat();
        this.held.delete(held);
        return this.finishCancel(held, reason.rollback, tracker.base);
      }
      if (!(await this.requeueStopped(held))) throw error;
    } finally {
      held.stopHeartbeat();
      this.held.delete(held);
    }
    this.deps.emit({ type: 'run-ended', runId: held.id, status: held.run.status });
    const result = this.result(held.run, tracker.base);
    return execution.rollback ? { ...result, rollback: execution.rollback } : result;
  }

  /**
   * A run stopped by a worker's shutdown goes back to the queue, due at once, so that it shows as
   * `waiting` and the next worker carries it on from its last checkpoint. True when it was requeued.
   */
  private async requeueStopped(held: HeldRun): Promise<boolean> {
    const reason: unknown = held.signal.reason;
    if (!held.signal.aborted || !(reason instanceof WorkerStopping)) return false;
    if (held.run.status !== RunStatus.running) return false;
    const now = this.deps.clock.now();
    // A fresh hold on the same lease: the stopped one refuses to write.
    const holder = new HeldRun(this.deps, held.run, held.workflow, held.epoch);
    try {
      await holder.commit(
        {
          run: { status: RunStatus.waiting, lease: null },
          queue: queueEntry(held, now, { reason: 'queued', dueAt: now, waitingSince: null }),
        },
        'requeue',
      );
      return true;
    } catch {
      return false;
    }
  }

  /**
   * Works the queue until `signal` aborts (or, with `untilIdle`, until nothing is left to do): claims
   * due runs (highest priority first) and runs abandoned by dead processes, at most `concurrency` at
   * once, and resumes each from its last checkpoint. Several workers may share a database: a run is
   * claimed by one of them only. On stop, runs in progress get `graceMs` to finish; those still
   * running are then stopped at their next milestone and put back in the queue.
   */
  async work(options: WorkOptions = {}): Promise<WorkReport> {
    const { clock, store } = this.deps;
    const concurrency = options.concurrency ?? 4;
    if (!Number.isInteger(concurrency) || concurrency < 1) {
      throw new InputError(
        `concurrency must be a positive integer, got ${describe(concurrency)}.`,
        {
          hint: 'For example --concurrency 4.',
        },
      );
    }
    // A worker holds no lease while a run waits, beyond a moment: longer waits are parks.
    this.deps.park.parkAfterMs = options.parkAfterMs ?? 1_000;
    const pollMs = options.pollMs ?? 1_000;
    const scanEveryMs = options.abandonedScanMs ?? Math.max(pollMs, this.deps.leaseMs / 3);
    const signal = options.signal;
    const report: WorkReport = { completed: 0, failed: 0, waiting: 0, other: 0, errors: 0 };
    const active = new Map<string, Promise<void>>();
    /** The workflow of each run this worker carries on, for the per-workflow limits. */
    const activeFlows = new Map<string, string>();
    let wake: (() => void) | undefined;
    const kick = () => wake?.();
    /**
     * Runs this worker could not carry on (a graph that changed, a secret it has no key for, a
     * workflow file that fails to load) and when it may try each again. They stay in the queue as
     * they are: retried with backoff, not in a loop; `--until-idle` does not wait for them.
     */
    const heldBack = new Map<string, { until: number; failures: number; lasting: boolean }>();
    const isHeldBack = (runId: string, now: number) => (heldBack.get(runId)?.until ?? 0) > now;
    /** Held back for good by `--until-idle`: a cause only a person can remove. */
    const givenUp = (runId: string) => heldBack.get(runId)?.lasting === true && options.untilIdle;
    const holdBack = (runId: string, error: unknown) => {
      const failures = (heldBack.get(runId)?.failures ?? 0) + 1;
      const lasting = needsAPerson(error);
      const waitMs =
        options.untilIdle && lasting
          ? Infinity
          : Math.min(HOLD_BACK_MAX_MS, HOLD_BACK_FIRST_MS * 2 ** (failures - 1));
      heldBack.set(runId, { until: clock.now() + waitMs, failures, lasting });
      report.errors += 1;
      this.deps.logger.error(
        waitMs === Infinity
          ? 'worker: a run could not be carried on; it stays as it is'
          : `worker: a run could not be carried on; it stays as it is, tried again in ${Math.round(waitMs / 1000)} s`,
        { runId, error: String(error) },
      );
    };
    const launch = (runId: string, work: () => Promise<RunResult>) => {
      const task = work()
        .then((result) => {
          heldBack.delete(runId);
          if (result.status === RunStatus.completed) report.completed += 1;
          else if (result.status === RunStatus.failed) report.failed += 1;
          else if (result.status === RunStatus.waiting) report.waiting += 1;
          else report.other += 1;
        })
        .catch((error: unknown) => {
          // Another worker got there first (it holds the run, or has already finished it): not an
          // error, the run is in hand.
          if (error instanceof LeaseError || isLeaseError(error)) return;
          if (isKeelError(error) && error.code === ErrorCode.notResumable) return;
          if (signal?.aborted) return;
          holdBack(runId, error);
        })
        .finally(() => {
          active.delete(runId);
          activeFlows.delete(runId);
          kick();
        });
      active.set(runId, task);
    };
    let lastScan = -Infinity;
    while (!signal?.aborted) {
      const now = clock.now();
      const before = active.size;
      if (active.size < concurrency) {
        // Enough for the free slots past the entries this worker holds or holds back, which come
        // first when due; each entry read costs a lookup, and a busy worker looks often.
        const due = await store.dueRuns(now, concurrency + Math.min(heldBack.size, 1_000));
        const busy = new Map<string, number>();
        for (const entry of due) {
          if (active.size >= concurrency) break;
          if (active.has(entry.runId) || isHeldBack(entry.runId, now)) continue;
          if (await this.atLimit(entry.workflow, busy, activeFlows)) continue;
          activeFlows.set(entry.runId, entry.workflow);
          launch(entry.runId, () => this.resume(entry.runId, { onlyIfDue: true }));
        }
      }
      if (active.size < concurrency && now - lastScan >= scanEveryMs) {
        lastScan = now;
        await this.launchAbandoned(active, concurrency, launch, isHeldBack);
      }
      const stats = { nextDueAt: await store.nextDueAt() };
      if (options.untilIdle && active.size === 0 && (await this.idle(stats, givenUp))) {
        // Before calling it a day, runs left running by dead processes are work too.
        if (await this.launchAbandoned(active, concurrency, launch, isHeldBack)) continue;
        break;
      }
      // Launched something: look again at once (more may be due). Otherwise sleep until the next
      // due time, a finished run, or the poll interval; a due time already past belongs to a run
      // in hand here or elsewhere, so it is no reason to look again at once.
      const untilDue = stats.nextDueAt === null ? pollMs : stats.nextDueAt - clock.now();
      const napMs =
        active.size > before && active.size < concurrency
          ? 0
          : untilDue > 0
            ? Math.min(pollMs, untilDue)
            : pollMs;
      const nap = new AbortController();
      const stop = () => nap.abort();
      signal?.addEventListener('abort', stop, { once: true });
      wake = stop;
      try {
        // Even a nap of 0 goes through the timers, so that I/O and signals get their turn.
        await clock.sleep(napMs, nap.signal);
      } catch {
        // woken: a run finished, or the worker is stopping
      } finally {
        wake = undefined;
        signal?.removeEventListener('abort', stop);
      }
    }
    await this.drain(active, options.graceMs ?? 10_000);
    return report;
  }

  /** Whether nothing in the queue has a due time, but for runs this worker gave up on. */
  private async idle(
    stats: { nextDueAt: number | null },
    givenUp: (runId: string) => boolean | undefined,
  ): Promise<boolean> {
    if (stats.nextDueAt === null) return true;
    const timed = await this.deps.store.dueRuns(Number.MAX_SAFE_INTEGER, 1_000);
    return timed.every((entry) => givenUp(entry.runId) === true);
  }

  /** Launches runs left running or compensating by dead processes; true when it launched any. */
  private async launchAbandoned(
    active: Map<string, Promise<void>>,
    concurrency: number,
    launch: (runId: string, work: () => Promise<RunResult>) => void,
    isHeldBack: (runId: string, now: number) => boolean,
  ): Promise<boolean> {
    const abandoned = await this.deps.store.listRuns({
      status: [RunStatus.running, RunStatus.compensating],
    });
    let launched = false;
    for (const run of abandoned) {
      if (active.size >= concurrency) break;
      if (active.has(run.id) || this.leaseIsLive(run) || this.isHeldHere(run.id)) continue;
      if (isHeldBack(run.id, this.deps.clock.now())) continue;
      launch(run.id, () => this.resume(run.id));
      launched = true;
    }
    return launched;
  }

  /**
   * Whether a workflow has as many runs going as its `concurrency` option allows: those this worker
   * carries on, or those held by live processes, whichever is more. `busy` caches the count for one
   * look at the queue, counting the runs launched during it.
   */
  private async atLimit(
    workflow: string,
    busy: Map<string, number>,
    activeFlows: Map<string, string>,
  ): Promise<boolean> {
    const limit = this.limits.get(workflow);
    if (limit === undefined) return false;
    let count = busy.get(workflow);
    if (count === undefined) {
      const running = await this.deps.store.listRuns({ status: RunStatus.running, workflow });
      const live = running.filter((r) => this.leaseIsLive(r) || this.isHeldHere(r.id)).length;
      const mine = [...activeFlows.values()].filter((w) => w === workflow).length;
      count = Math.max(live, mine);
    }
    if (count >= limit) return true;
    busy.set(workflow, count + 1);
    return false;
  }

  private isHeldHere(runId: string): boolean {
    for (const held of this.held) if (held.id === runId) return true;
    return false;
  }

  /** Lets runs in progress finish for `graceMs`, then stops the rest and puts them back in the queue. */
  private async drain(active: Map<string, Promise<void>>, graceMs: number): Promise<void> {
    if (active.size === 0) return;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const grace = new Promise<void>((resolve) => (timer = setTimeout(resolve, graceMs)));
    await Promise.race([Promise.allSettled([...active.values()]), grace]);
    clearTimeout(timer);
    for (const held of this.held) held.abort(new WorkerStopping(held.id));
    await Promise.allSettled([...active.values()]);
  }

  private result(run: RunRecord, state: object): RunResult {
    return {
      id: run.id,
      workflow: run.workflow,
      status: run.status,
      state,
      error: run.error ? (parseStored(run.error) as SerializedError) : null,
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
    if (epoch === null) throw claimedElsewhere(run.id);
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
    if (wf.options.concurrency !== undefined) this.limits.set(wf.name, wf.options.concurrency);
    return wf;
  }

  /**
   * A run's state. Its secrets are decrypted only when workflow code will run on it (`reveal`);
   * otherwise they are read back redacted, so that looking at a run never needs its key.
   */
  private async loadState(run: RunRecord, reveal: boolean): Promise<Draftable> {
    const checkpoints = await this.deps.store.loadCheckpoints(run.id, run.snapshotSeq);
    return replay(checkpoints, { secrets: reveal ? this.deps.secrets : 'redacted' });
  }

  /**
   * The state of a run this process just claimed, to carry it on. When it cannot be read (its
   * secrets' key is missing, say) the lease is handed back, so that a process given the key can
   * carry the run on at once.
   */
  private async loadHeldState(held: HeldRun): Promise<Draftable> {
    try {
      return await this.loadState(held.run, true);
    } catch (error) {
      await held.release().catch(() => undefined);
      throw error;
    }
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

/** A claim that lost the race for a run to another process. */
function claimedElsewhere(runId: string): LeaseError {
  return new LeaseError(
    ErrorCode.leaseHeld,
    `Run ${runId} was claimed by another process at the same moment.`,
    { runId, hint: 'That process carries it on; see `keel show` for its progress.' },
  );
}

/** A dead letter as `keel dlq` shows it. */
export type DeadLetterView = {
  runId: string;
  workflow: string;
  step: string | null;
  reason: DeadLetter['reason'];
  error: SerializedError;
  history: unknown[];
  createdAt: number;
  droppedAt: number | null;
};

const viewDeadLetter = (d: DeadLetter): DeadLetterView => ({
  runId: d.runId,
  workflow: d.workflow,
  step: d.step,
  reason: d.reason,
  error: parseStored(d.error) as SerializedError,
  history: parseStored(d.history) as unknown[],
  createdAt: d.createdAt,
  droppedAt: d.droppedAt,
});

const noDeadLetter = (runId: string) =>
  new InputError(`Run "${runId}" is not in the dead-letter queue.`, {
    code: ErrorCode.notFound,
    hint: 'List dead letters with `keel dlq ls`.',
  });

/** Statuses of a run that has ended (a failed run may still be resumed or cancelled). */
const ENDED: ReadonlySet<RunStatus> = new Set<RunStatus>([
  RunStatus.completed,
  RunStatus.failed,
  RunStatus.rolledBack,
  RunStatus.compensationFailed,
  RunStatus.cancelled,
]);

/** Statuses `resume` carries on from (`compensating` continues its rollback instead). */
const RESUMABLE: ReadonlySet<RunStatus> = new Set<RunStatus>([
  RunStatus.running,
  RunStatus.failed,
  RunStatus.queued,
  RunStatus.waiting,
]);

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
