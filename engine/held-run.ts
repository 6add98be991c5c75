/**
 * A run this process holds: its lease, heartbeat and the one way to write a milestone.
 *
 * Every write names the epoch the lease was claimed at; the store refuses it once another process has
 * claimed the run, and then the run's AbortSignal fires so that the step can stop early.
 */
import type { EngineDeps, AnyWorkflow } from './deps.ts';
import { CancelledError, LeaseError, isLeaseError } from './errors.ts';
import type { Milestone, QueueEntry, RunRecord } from './store.ts';
import type { InlineCompensation } from './workflow.ts';

export class HeldRun {
  readonly run: RunRecord;
  readonly workflow: AnyWorkflow;
  readonly epoch: number;
  /** Handlers given to `ctx.effect` in this process, by effect name, for an in-process rollback. */
  readonly inlineEffects = new Map<string, InlineCompensation>();
  /** The failed attempts of steps under this hold, for a dead letter's history. */
  readonly failures: { at: number; step: string; attempt: number; error: string }[] = [];
  /** The run's queue entry while it has one: its parks so far, and since when it waits. */
  queued: QueueEntry | undefined;
  private readonly controller = new AbortController();
  private heartbeat: ReturnType<typeof setInterval> | undefined;
  private readonly deps: EngineDeps;

  constructor(deps: EngineDeps, run: RunRecord, workflow: AnyWorkflow, epoch: number) {
    this.deps = deps;
    this.run = run;
    this.workflow = workflow;
    this.epoch = epoch;
  }

  get id(): string {
    return this.run.id;
  }

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  startHeartbeat(): void {
    const every = Math.max(50, Math.floor(this.deps.leaseMs / 3));
    this.heartbeat = setInterval(() => void this.renew(), every);
    this.heartbeat.unref();
    // `cancel` from another process is a flag on the run: look for it every second or so.
    this.cancelPoll = setInterval(() => void this.checkCancel(), Math.min(1_000, every));
    this.cancelPoll.unref();
  }

  stopHeartbeat(): void {
    clearInterval(this.heartbeat);
    clearInterval(this.cancelPoll);
    this.heartbeat = undefined;
    this.cancelPoll = undefined;
  }

  private cancelPoll: ReturnType<typeof setInterval> | undefined;

  private async checkCancel(): Promise<void> {
    try {
      const mode = await this.deps.store.cancelRequest(this.run.id);
      if (mode !== 0) this.abort(new CancelledError(this.run.id, mode === 2));
    } catch {
      // the heartbeat reports a database that cannot be read
    }
  }

  /** Aborts work in progress, e.g. on shutdown. */
  abort(reason: Error): void {
    if (!this.controller.signal.aborted) this.controller.abort(reason);
  }

  /** Writes a milestone under this lease and applies its run fields to {@link run}. */
  async commit(milestone: Milestone, label: string): Promise<void> {
    const { crashPoint } = this.deps;
    crashPoint(`${label}:before-commit`);
    const update = milestone.run ?? {};
    const expiresAt = this.deps.clock.now() + this.deps.leaseMs;
    const withLease = update.lease === null ? update : { ...update, leaseExpiresAt: expiresAt };
    try {
      await this.deps.store.commit(
        this.run.id,
        this.epoch,
        { ...milestone, run: withLease },
        { inside: () => crashPoint(`${label}:inside-commit`) },
      );
    } catch (error) {
      if (isLeaseError(error)) this.lose(error);
      throw error;
    }
    const { lease, leaseExpiresAt: _ignored, ...fields } = withLease;
    Object.assign(this.run, fields);
    if (lease === null) this.run.lease = null;
    else if (this.run.lease) this.run.lease.expiresAt = expiresAt;
    this.run.updatedAt = this.deps.clock.now();
    crashPoint(`${label}:after-commit`);
  }

  /** Lets another process claim the run at once, e.g. when this one shuts down mid-run. */
  async release(): Promise<void> {
    this.stopHeartbeat();
    await this.deps.store.renewLease(this.run.id, this.epoch, 0);
  }

  private async renew(): Promise<void> {
    try {
      const expiresAt = this.deps.clock.now() + this.deps.leaseMs;
      const held = await this.deps.store.renewLease(this.run.id, this.epoch, expiresAt);
      if (!held) {
        this.lose(
          new LeaseError('LEASE_LOST', `Run ${this.run.id} was taken over by another process.`, {
            runId: this.run.id,
            hint: 'This process stops working on it; the new owner carries on from the last checkpoint.',
          }),
        );
      }
    } catch (error) {
      this.deps.logger.warn('lease heartbeat failed', { runId: this.run.id, error: String(error) });
    }
  }

  private lose(error: LeaseError): void {
    this.stopHeartbeat();
    this.abort(error);
  }
}
